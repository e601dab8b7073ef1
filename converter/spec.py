"""Load and validate the YAML mapping specs: a malformed spec fails with file, line and reason.

mappings/<family>/family.yaml   the family: canonical model, runtime model, config inference,
                                tensor roles, per-target extras
mappings/<family>/<source>.yaml one source format: how to unwrap, detect and map its keys
mappings/targets/<target>.yaml  a target layout: transforms by tensor role
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vidport.converter.checkpoint import EmaCopies
from vidport.converter.core.errors import VidportError
from vidport.converter.patterns import (Condition, Pattern, PatternError, Template, compile_condition, compile_expression,
                                compile_pattern, compile_template)
from vidport.converter.layouts import RoleFormat, TargetOption, parse_options, parse_role_format
from vidport.converter.transforms import Step, parse_step

MAPPINGS_DIR = Path(__file__).resolve().parent.parent / "mappings"


class SpecError(VidportError):
    """A spec file that does not follow the schema."""


# ---------------------------------------------------------------- schema checking

# A schema is: "str" | "int" | "bool" | "any" | "pattern" | "template" | "condition" | "transforms"
# | ["list", schema] | {"required": {...}, "optional": {...}} | ("either", schema, schema)


def _fail(path: Path, node: yaml.Node, reason: str) -> SpecError:
    return SpecError(f"{path}:{node.start_mark.line + 1}: {reason}")


def _check(path: Path, node: yaml.Node, schema: Any, where: str) -> None:
    if isinstance(schema, tuple) and schema[0] == "either":
        problems = []
        for option in schema[1:]:
            try:
                _check(path, node, option, where)
                return
            except SpecError as err:
                problems.append(str(err).split(": ", 1)[1])
        raise _fail(path, node, f"{where}: " + " / or: ".join(problems))
    if isinstance(schema, list):
        if not isinstance(node, yaml.SequenceNode):
            raise _fail(path, node, f"{where} must be a list")
        for index, item in enumerate(node.value):
            _check(path, item, schema[1], f"{where}[{index}]")
        return
    if isinstance(schema, dict):
        if not isinstance(node, yaml.MappingNode):
            raise _fail(path, node, f"{where} must be a mapping")
        allowed = {**schema.get("required", {}), **schema.get("optional", {})}
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key not in allowed and "*" not in allowed:
                raise _fail(path, key_node, f"unknown field '{key}' in {where}; allowed: {', '.join(sorted(allowed))}")
            seen.add(key)
            _check(path, value_node, allowed.get(key, allowed.get("*")), f"{where}.{key}")
        missing = set(schema.get("required", {})) - seen
        if missing:
            raise _fail(path, node, f"{where} lacks required field(s): {', '.join(sorted(missing))}")
        return
    if schema == "any":
        return
    if not isinstance(node, yaml.ScalarNode):
        raise _fail(path, node, f"{where} must be a {schema}")
    value = yaml.safe_load(yaml.serialize(node))
    if schema == "str" and not isinstance(value, str):
        raise _fail(path, node, f"{where} must be a string")
    if schema == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise _fail(path, node, f"{where} must be an integer")
    if schema == "bool" and not isinstance(value, bool):
        raise _fail(path, node, f"{where} must be true or false")
    try:
        if schema == "pattern":
            compile_pattern(str(value))
        if schema == "template":
            compile_template(str(value))
        if schema == "condition":
            compile_condition(str(value))
    except PatternError as err:
        raise _fail(path, node, f"{where}: {err}") from err


def _check_transforms(path: Path, node: yaml.Node, where: str) -> None:
    if not isinstance(node, yaml.SequenceNode):
        raise _fail(path, node, f"{where} must be a list of transforms")
    for index, item in enumerate(node.value):
        try:
            parse_step(yaml.safe_load(yaml.serialize(item)))
        except ValueError as err:
            raise _fail(path, item, f"{where}[{index}]: {err}") from err


RULE = {
    "required": {"from": "pattern"},
    "optional": {
        "to": ("either", "template", ["list", "template"]),
        "when": "condition",
        "drop": "bool",
        "why": "str",
        "transforms": "any",
        "gather": {"required": {"over": "str", "order": ["list", "str"]}, "optional": {"axis": "int"}},
    },
}
INFER = {"optional": {"shape": "pattern", "each": "pattern", "dim": ("either", "int", ["list", "int"]), "count": "pattern", "exists": "pattern",
                      "value": "any", "expr": "str", "default": "any", "per": "str", "reverse": "bool"}}
# `limits`: the largest value a config key may take where shapes cannot tell it (a position count)
CONFIG = {"optional": {"from_file": "str", "section": "str", "infer": {"optional": {"*": INFER}}, "limits": {"optional": {"*": "int"}}}}
# `reference`: a loader of the canonical library (from_single_file, from_pretrained), or the format's
# official code where that library reads no such file: a named function that builds the official
# model from the file's tensors, and its modules that are canonical modules (compared layer by layer)
OFFICIAL_REFERENCE = {"required": {"official": "str"},
                      "optional": {"layers": ["list", {"required": {"official": "pattern", "canonical": "template"}}]}}
# or a loader of the canonical library on the class the source holds, the canonical model being one of
# its modules (a transformers Gemma3ForConditionalGeneration folder, whose text tower is canonical)
LIBRARY_REFERENCE = {"required": {"loader": "str", "class": "str", "module": "str"}}
SOURCE_SCHEMA = {
    "required": {"spec": "str", "version": "int", "family": "str", "source": "str"},
    "optional": {
        "rules": ["list", RULE],  # required, from the spec itself or the one it extends
        "extends": "str",  # another source spec ("wan-dit/native"): every entry not given here is its
        "description": "str",
        "formats": ["list", "str"],
        "reference": ("either", "str", OFFICIAL_REFERENCE, LIBRARY_REFERENCE),
        "unwrap": {"optional": {"descend": ["list", "str"], "strip_prefix": ["list", "str"],
                                "select_prefix": ("either", "str", ["list", "str"]),
                                # EMA copies beside each weight (prefix) or a state dict of their own (descend)
                                "ema": {"optional": {"prefix": "str", "descend": ["list", "str"], "dotless": "bool",
                                                     "default": "bool", "reference": {"optional": {"*": "any"}}}},
                                # entries beside the one `descend` steps into, not converted: entry -> why
                                "drop": {"optional": {"*": "str"}}}},
        "detect": {"optional": {"all": ["list", "pattern"], "none": ["list", "pattern"], "folder_class": "str"}},
        "config": CONFIG,
        # how the model runs that its classes take no argument for (Self-Forcing: causal, in blocks of
        # 3 frames): recorded in the manifest, never passed to a model
        "settings": {"optional": {"*": "any"}},
        # why this source is taken only where its family is named (a Diffusers Wan folder given as
        # Self-Forcing's): detection without a family skips it; the naming asserts its `settings`
        "only_when_named": "str",
        "variants": ["list", {"required": {"name": "str", "when": {"optional": {"*": "any"}}},
                              "optional": {"config": {"optional": {"*": "any"}}}}],
    },
}
FAMILY_SCHEMA = {
    "required": {"family": "str"},
    "optional": {
        # required, from the family itself or the one it extends
        "canonical": "str", "runtime": "str", "reference": "str", "roles": "any",
        "extends": "str",  # another family ("wan-dit"): every entry not given here is its
        "description": "str",
        "aliases": ["list", "str"],
        "config": CONFIG,
        # the canonical class's own defaults for values only a source's variant table gives; used,
        # and recorded as assumed, when no variant matches
        "defaults": {"optional": {"*": "any"}},
        # which tensors a quantized MLX output quantizes (converter/quantize.py): tensors of these
        # roles whose target key matches `include` (and no `exclude`); `pipeline`: quantized in a
        # pipeline conversion's --quantize too (the denoisers; encoders and VAEs stay float)
        "quantize": {"required": {"roles": ["list", "str"], "why": "str"},
                     "optional": {"include": ["list", "pattern"], "exclude": ["list", "pattern"], "pipeline": "bool"}},
        "targets": {"optional": {"*": {"optional": {"rules": ["list", RULE],
                                                     "generate": ["list", {"required": {"match": "pattern", "fn": "str"}}],
                                                     "runtime": "str",
                                                     # per value of the target's `cache_style` option: a role
                                                     # table replacing the target's (the layouts one
                                                     # program's loader expects) and the model name it caches by
                                                     "styles": {"optional": {"*": {
                                                         "required": {"roles": {"optional": {"*": "any"}}},
                                                         "optional": {"model_name": "str"}}}}}}}},
    },
}
# `if_config`: the declaration holds only for a model whose config has these values (a UNet's
# proj_in/proj_out are 1x1 convolutions or linears by `use_linear_projection`)
ROLE = {"required": {"match": "pattern", "role": "str"},
        "optional": {"args": {"optional": {"*": "any"}}, "if_config": {"optional": {"*": "any"}}}}
ROLES_SCHEMA = {"required": {"float": ["list", "str"]}}  # mappings/roles.yaml
UNCONVERTED_SCHEMA = {"required": {"models": ["list", {  # mappings/unconverted.yaml
    "required": {"name": "str", "about": "str",
                 "detect": {"required": {"any": ["list", "pattern"]}, "optional": {"none": ["list", "pattern"]}}}}]}}
TARGET_SCHEMA = {
    "required": {"target": "str", "version": "int", "roles": {"optional": {"*": "any"}},
                 "expected": "str", "shapes": "str", "writer": "str"},
    "optional": {"description": "str", "weights_stem": {"optional": {"*": "str"}}, "metadata": {"optional": {"*": "str"}},
                 # conversion options (--ttnn-dtype ...): name -> {default, choices, format, help}
                 "options": {"optional": {"*": {"required": {"default": "any"},
                                                "optional": {"choices": ["list", "any"], "format": "str", "help": "str"}}}},
                 # roles this target does not store, with the reason (e.g. recomputed buffers)
                 "omit_roles": {"optional": {"*": "str"}},
                 # --quantize BITS -> the target's own block-float dtype for the tensors a family's
                 # `quantize:` declaration selects (TTNN: "8": bfloat8_b)
                 "block_formats": {"optional": {"*": "str"}},
                 # named function (canonical class, config) -> the nested parameter tree of tt-metal's preprocessing
                 "model_tree": "str"},
}


def _load(path: Path, schema: dict) -> tuple[Any, yaml.Node]:
    try:
        text = path.read_text()
        node = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SpecError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from err
    if node is None:
        raise SpecError(f"{path}:1: empty spec")
    _check(path, node, schema, "spec")
    return yaml.safe_load(text), node


def _child(node: yaml.MappingNode, key: str) -> yaml.Node | None:
    return next((v for k, v in node.value if k.value == key), None)


# ---------------------------------------------------------------- spec objects


@dataclass(frozen=True)
class Gather:
    """Several matched keys concatenated into one target, in a stated order."""

    over: str
    order: tuple[str, ...]
    axis: int = 0


@dataclass(frozen=True)
class Rule:
    source: Pattern
    targets: tuple[Template, ...]  # empty: the key is dropped on purpose
    steps: tuple[Step, ...]
    why: str | None
    gather: Gather | None
    where: str  # folder/file.yaml:line of the spec that gives it, for messages
    when: Condition | None = None  # the rule applies only where this holds on the captured values

    @property
    def drops(self) -> bool:
        return not self.targets


# In a rule's `when` / `to`, `max_n` is the largest value its placeholder {n} takes among all the
# source's keys that the rule's pattern matches (its `when` aside): a flat list whose last entry
# is another module (the LTX-2 VAE encoder's mid block) says "the last one" without a count.
MAXIMUM = "max_"


def _maxima_named(names: set[str], captured: tuple[str, ...]) -> set[str]:
    return {n for n in names if n.startswith(MAXIMUM) and n[len(MAXIMUM):] in captured}


@dataclass
class RuleSet:
    rules: list[Rule]
    maxima: dict[str, dict[str, str]] = field(default_factory=dict)  # rule (file:line) -> {max_n: value}

    def over(self, keys) -> RuleSet:
        """These rules bound to one source's keys, so that `max_n` has its value."""
        keys = list(keys)
        maxima: dict[str, dict[str, str]] = {}
        for rule in self.rules:
            names = _maxima_named((rule.when.names() if rule.when else set())
                                  | {n for t in rule.targets for n in t.names()}, rule.source.names)
            found: dict[str, int] = {}
            for key in keys if names else ():
                values = rule.source.match(key)
                for name in names if values is not None else ():
                    value = values[name[len(MAXIMUM):]]
                    if value.isdigit():
                        found[name] = max(found.get(name, 0), int(value))
            if names:
                maxima[rule.where] = {name: str(value) for name, value in found.items()}
        return RuleSet(self.rules, maxima)

    def match(self, key: str) -> tuple[Rule, dict[str, str]] | None:
        """First rule whose pattern matches the whole key (and whose `when` holds)."""
        for rule in self.rules:
            values = rule.source.match(key)
            if values is None:
                continue
            values = {**values, **self.maxima.get(rule.where, {})}
            if rule.when is None or rule.when.holds(values):
                return rule, values
        return None


def _rules(path: Path, node: yaml.Node | None, data: list[dict] | None) -> RuleSet:
    rules = []
    for item, item_node in zip(data or [], node.value if node is not None else []):
        where = f"{path.parent.name}/{path.name}:{item_node.start_mark.line + 1}"  # the file a spec extends, too
        has_to, drops = "to" in item, bool(item.get("drop"))
        if has_to == drops:
            raise _fail(path, item_node, "a rule needs exactly one of 'to' or 'drop: true'")
        if drops and not item.get("why"):
            raise _fail(path, item_node, "a drop rule must say why (field 'why')")
        transforms_node = _child(item_node, "transforms")
        if transforms_node is not None:
            _check_transforms(path, transforms_node, "transforms")
        source = compile_pattern(item["from"])
        targets = item.get("to", [])
        targets = tuple(compile_template(t) for t in ([targets] if isinstance(targets, str) else targets))
        for template in targets:
            unknown = template.names() - set(source.names) - _maxima_named(template.names(), source.names)
            if unknown:
                raise _fail(path, item_node, f"'to' uses placeholder(s) {sorted(unknown)} that 'from' does not capture")
        gather = Gather(item["gather"]["over"], tuple(item["gather"]["order"]), item["gather"].get("axis", 0)) if "gather" in item else None
        if gather and gather.over not in source.names:
            raise _fail(path, item_node, f"gather over '{gather.over}', which 'from' does not capture")
        when = compile_condition(str(item["when"])) if "when" in item else None
        unknown = when.names() - set(source.names) - _maxima_named(when.names(), source.names) if when else set()
        if unknown:
            raise _fail(path, item_node, f"'when' uses placeholder(s) {sorted(unknown)} that 'from' does not capture")
        steps = tuple(parse_step(s) for s in item.get("transforms", []))
        rules.append(Rule(source, targets, steps, item.get("why"), gather, where, when))
    return RuleSet(rules)


@dataclass(frozen=True)
class Inference:
    """How to read one config value off tensor keys and shapes."""

    name: str
    op: str  # shape | each | count | exists | value
    pattern: Pattern | None
    dim: int | list[int]  # a list: one size per axis
    value: Any
    default: Any
    has_default: bool
    per: str | None = None  # count: one count per value of this placeholder, in numeric order
    reverse: bool = False  # each / count per: the list in descending order of the placeholder


@dataclass
class ConfigSpec:
    from_file: str | None = None
    section: str | None = None  # the entry of the file's config that is the canonical config (text_config)
    infer: list[Inference] = field(default_factory=list)
    limits: dict[str, int] = field(default_factory=dict)  # largest allowed value per key


def _config(data: dict | None) -> ConfigSpec:
    data = data or {}
    infer = []
    for name, entry in (data.get("infer") or {}).items():
        ops = [op for op in ("shape", "each", "count", "exists", "value", "expr") if op in entry]
        if len(ops) != 1:
            raise SpecError(f"config.infer.{name}: give exactly one of shape, each, count, exists, value, expr")
        op = ops[0]
        pattern = compile_pattern(entry[op]) if op not in ("value", "expr") else None
        try:  # expr: integer arithmetic on config values named before it, kept compiled in `value`
            value = compile_expression(entry["expr"]) if op == "expr" else entry.get("value")
        except PatternError as err:
            raise SpecError(f"config.infer.{name}: {err}") from err
        if "per" in entry and (op != "count" or entry["per"] not in pattern.names):
            raise SpecError(f"config.infer.{name}: 'per' names a placeholder of a 'count' pattern")
        if entry.get("reverse") and op not in ("each", "count"):
            raise SpecError(f"config.infer.{name}: 'reverse' orders the list of an 'each' or a 'count' with 'per'")
        infer.append(Inference(name, op, pattern, entry.get("dim", 0), value,
                               entry.get("default"), "default" in entry, entry.get("per"), bool(entry.get("reverse"))))
    return ConfigSpec(data.get("from_file"), data.get("section"), infer, dict(data.get("limits") or {}))


@dataclass
class Variant:
    name: str
    when: dict[str, Any]
    config: dict[str, Any]


@dataclass
class SourceSpec:
    name: str
    version: int
    family: str
    source: str
    description: str
    path: Path
    descend: list[str]
    strip_prefixes: list[str]
    select_prefixes: list[str]  # a multi-model file: take only the sub-tree under the first that fits
    detect_all: list[Pattern]
    detect_none: list[Pattern]
    folder_class: str | None
    rules: RuleSet
    config: ConfigSpec
    variants: list[Variant]
    reference: str | None  # how the reference library loads this format (from_single_file, ...); "official"
    ema: EmaCopies | None = None  # where the file keeps EMA weights (chosen with --ema)
    ema_reference: dict[str, Any] = field(default_factory=dict)  # the reference loader's arguments for them
    drop: dict[str, str] = field(default_factory=dict)  # wrapper entries not converted, and why
    settings: dict[str, Any] = field(default_factory=dict)  # how the model runs, for the manifest
    only_when_named: str | None = None  # why only a named family takes this source (its settings asserted)
    official: OfficialReference | None = None  # reference: official (the format's own code)
    reference_class: str | None = None  # the library class the source holds, where the canonical is inside it
    reference_module: str | None = None  # the canonical model's path in that class ("model.language_model")

    def with_ema(self) -> "SourceSpec":
        """This spec as it reads the file's EMA weights where they are a state dict of their own
        (`unwrap.ema.descend`): that entry stepped into in place of `descend`'s, also by the
        reference, which reads the file with the spec's `descend`."""
        if self.ema is None or not self.ema.descend:
            return self
        return replace(self, descend=list(self.ema.descend))


@dataclass(frozen=True)
class OfficialReference:
    """The format's own code as the reference: `build` (a named function) makes the official model
    from the file's tensors; `layers` pairs its modules with the canonical modules that compute the
    same thing from the same inputs, the layers compared one by one (the probes' outputs always are)."""

    build: str
    layers: tuple[tuple[Pattern, Template], ...]


def _official_reference(path: Path, node: yaml.Node, data: Any) -> OfficialReference | None:
    if not isinstance(data, dict) or "official" not in data:
        return None
    layers = []
    for item, item_node in zip(data.get("layers") or [], _child(node, "layers").value if "layers" in data else []):
        official, canonical = compile_pattern(item["official"]), compile_template(item["canonical"])
        unknown = canonical.names() - set(official.names)
        if unknown:
            raise _fail(path, item_node, f"'canonical' uses placeholder(s) {sorted(unknown)} that 'official' does not capture")
        layers.append((official, canonical))
    return OfficialReference(data["official"], tuple(layers))


@dataclass
class TargetExtras:
    """What a family adds for one target: renames (container nesting) and generated tensors."""

    rules: RuleSet
    generate: list[tuple[Pattern, str]]
    runtime: str | None = None  # the model class that runs this target's output (TTNN), "module:Class"
    styles: dict[str, "StyleRoles"] = field(default_factory=dict)  # cache_style value -> its role table


@dataclass(frozen=True)
class StyleRoles:
    """A family's role table for one cache style (`targets: ttnn: styles: sd_demo:`): while that
    style is chosen it replaces the target's table, so the plan, the expected shapes and the
    manifest all see the style's layouts; `model_name` is the name the style's loader caches by."""

    roles: dict[str, list[Step]]
    formats: dict[str, RoleFormat]
    model_name: str | None = None


@dataclass
class QuantizeSpec:
    """A family's `quantize:` declaration: what quantizes, by role and target key."""

    roles: tuple[str, ...]
    why: str
    include: list[Pattern]
    exclude: list[Pattern]
    pipeline: bool = False

    def selects(self, key: str, role: str) -> bool:
        """Does the declaration take the target tensor `key` of `role` (e.g. `linear.weight`)?"""
        kind, _, param = role.rpartition(".")
        return (param == "weight" and kind in self.roles
                and (not self.include or any(p.match(key) is not None for p in self.include))
                and not any(p.match(key) is not None for p in self.exclude))


@dataclass
class FamilySpec:
    name: str
    description: str
    aliases: list[str]
    canonical: str  # "diffusers:MotionAdapter"
    runtime: str  # "vidport.runtime.animatediff_motion:MotionAdapter"
    reference: str  # "vidport.reference.animatediff_motion"
    path: Path
    config: ConfigSpec
    roles: list[tuple[Pattern, str]]
    targets: dict[str, TargetExtras]
    sources: list[SourceSpec] = field(default_factory=list)
    role_args: list[dict[str, Any]] = field(default_factory=list)  # parallel to roles: `args:` of each
    role_conditions: list[dict[str, Any]] = field(default_factory=list)  # parallel to roles: `if_config:` of each
    defaults: dict[str, Any] = field(default_factory=dict)  # the canonical library's defaults (no variant matched)
    quantize: QuantizeSpec | None = None

    def _declaration(self, key: str, config: dict[str, Any]) -> int | None:
        """Index of the first role declaration matching `key` whose `if_config` the config meets."""
        conditions = self.role_conditions or [{}] * len(self.roles)
        for index, ((pattern, _), condition) in enumerate(zip(self.roles, conditions)):
            if pattern.match(key) is not None and all(config.get(k) == v for k, v in condition.items()):
                return index
        return None

    def args_of(self, key: str, config: dict[str, Any]) -> dict[str, Any]:
        """The `args` of the role declaration that matches `key` (placeholders unresolved)."""
        index = self._declaration(key, config)
        return dict(self.role_args[index]) if index is not None and self.role_args else {}

    def role_of(self, key: str, config: dict[str, Any]) -> str:
        """The tensor's role, e.g. `conv2d.weight`: the declared module kind plus the key's last segment."""
        index = self._declaration(key, config)
        if index is None:
            raise VidportError(f"{self.path}: no role declared for canonical key {key}")
        return f"{self.roles[index][1]}.{key.rsplit('.', 1)[-1]}"


@dataclass
class TargetSpec:
    name: str
    version: int
    path: Path
    roles: dict[str, list[Step]]
    expected: str  # whose parameter shapes the output must match: "runtime" or "canonical"
    shapes: str  # named function (that model's class path, config) -> its parameter shapes
    writer: str  # module under converter/targets/ that writes the files
    weights_stem: dict[str, str]  # library of the canonical model -> weights file stem
    metadata: dict[str, str]  # written into safetensors headers
    formats: dict[str, RoleFormat] = field(default_factory=dict)  # roles given as mappings (layout, dtype ...)
    options: dict[str, TargetOption] = field(default_factory=dict)
    omit_roles: dict[str, str] = field(default_factory=dict)  # role -> why the target leaves it out
    model_tree: str | None = None  # named function for the model_cache style's module tree
    block_formats: dict[int, str] = field(default_factory=dict)  # --quantize BITS -> dtype (TTNN)

    def format_for(self, role: str) -> RoleFormat | None:
        kind = role.split(".")[0]
        for candidate in (role, kind, "*"):
            if candidate in self.roles:
                return self.formats.get(candidate)
        return None

    def stem_for(self, library: str) -> str:
        return self.weights_stem.get(library, self.weights_stem.get("*", "model"))

    def steps_for(self, role: str) -> list[Step]:
        kind = role.split(".")[0]
        for candidate in (role, kind, "*"):
            if candidate in self.roles:
                return self.roles[candidate]
        return []


def _reference_loader(data: Any) -> str | None:
    """The `reference` loader's name: the string itself, "official", or a library entry's `loader`."""
    if isinstance(data, dict):
        return "official" if "official" in data else data["loader"]
    return data


SourceOf = dict[str, tuple[Path, yaml.Node]]  # a spec entry -> the file and node that give it


def _extended(path: Path, schema: dict, suffix: str, required: tuple[str, ...]) -> tuple[dict, SourceOf]:
    """A spec, with every entry it does not give itself taken from the spec it `extends`, one
    level deep: `mappings/` + that name + `suffix` (`wan-dit` + `/family.yaml`, `wan-dit/native` +
    `.yaml`). A Self-Forcing checkpoint is a Wan DiT in other wrappers: it keeps wan-dit's rules."""
    data, node = _load(path, schema)
    origin: SourceOf = {key: (path, _child(node, key)) for key in data}
    if "extends" in data:
        base = path.parent.parent / f"{data['extends']}{suffix}"
        if not base.is_file():
            raise _fail(path, _child(node, "extends"), f"extends '{data['extends']}': there is no {base}")
        base_data, base_node = _load(base, schema)
        if "extends" in base_data:
            raise _fail(path, _child(node, "extends"), f"extends '{data['extends']}', which extends another (one level only)")
        origin = {**{key: (base, _child(base_node, key)) for key in base_data}, **origin}
        data = {**base_data, **data}
        del data["extends"]
    missing = [key for key in required if key not in data]
    if missing:
        raise _fail(path, node, f"spec lacks required field(s): {', '.join(missing)}")
    return data, origin


def load_source_spec(path: Path) -> SourceSpec:
    data, origin = _extended(path, SOURCE_SCHEMA, ".yaml", ("rules",))
    unwrap = data.get("unwrap") or {}
    detect = data.get("detect") or {}
    variants = [Variant(v["name"], v["when"], v.get("config") or {}) for v in data.get("variants") or []]
    return SourceSpec(
        name=data["spec"], version=data["version"], family=data["family"], source=data["source"],
        description=data.get("description", ""), path=path,
        descend=unwrap.get("descend", []), strip_prefixes=unwrap.get("strip_prefix", []),
        select_prefixes=[select] if isinstance(select := unwrap.get("select_prefix", []), str) else select,
        detect_all=[compile_pattern(p) for p in detect.get("all", [])],
        detect_none=[compile_pattern(p) for p in detect.get("none", [])],
        folder_class=detect.get("folder_class"),
        rules=_rules(*origin["rules"], data["rules"]),
        config=_config(data.get("config")), variants=variants,
        reference=_reference_loader(data.get("reference")),
        official=_official_reference(*origin.get("reference", (path, None)), data.get("reference")),
        reference_class=(data.get("reference") or {}).get("class") if isinstance(data.get("reference"), dict) else None,
        reference_module=(data.get("reference") or {}).get("module") if isinstance(data.get("reference"), dict) else None,
        ema=_ema_copies(origin["unwrap"][0], _child(origin["unwrap"][1], "ema"), unwrap["ema"]) if "ema" in unwrap else None,
        ema_reference=(unwrap.get("ema") or {}).get("reference") or {},
        drop=dict(unwrap.get("drop") or {}),
        settings=dict(data.get("settings") or {}),
        only_when_named=data.get("only_when_named"),
    )


def _ema_copies(path: Path, node: yaml.Node, data: dict[str, Any]) -> EmaCopies:
    if ("prefix" in data) == ("descend" in data):
        raise _fail(path, node, "unwrap.ema needs exactly one of 'prefix' (a copy beside each weight) or 'descend' "
                                "(a state dict of their own)")
    if "descend" in data and data.get("dotless"):
        raise _fail(path, node, "unwrap.ema: 'dotless' names copies by 'prefix'")
    return EmaCopies(data.get("prefix", ""), data.get("dotless", False), tuple(data.get("descend", ())),
                     data.get("default", False))


def load_family_spec(path: Path) -> FamilySpec:
    data, origin = _extended(path, FAMILY_SCHEMA, "/family.yaml", ("canonical", "runtime", "reference", "roles"))
    _check(*origin["roles"], ["list", ROLE], "roles")
    targets = {}
    targets_file, targets_node = origin.get("targets", (path, None))
    for name, extra in (data.get("targets") or {}).items():
        target_node = _child(targets_node, name)
        styles_node = _child(target_node, "styles")
        styles = {}
        for style, entry in (extra.get("styles") or {}).items():
            style_node = _child(styles_node, style)
            roles, formats = _role_table(targets_file, _child(style_node, "roles"), entry["roles"],
                                         f"targets.{name}.styles.{style}.roles")
            styles[style] = StyleRoles(roles, formats, entry.get("model_name"))
        targets[name] = TargetExtras(
            _rules(targets_file, _child(target_node, "rules"), extra.get("rules")),
            [(compile_pattern(g["match"]), g["fn"]) for g in extra.get("generate") or []],
            extra.get("runtime"), styles,
        )
    return FamilySpec(
        name=data["family"], description=data.get("description", ""), aliases=data.get("aliases", []),
        canonical=data["canonical"], runtime=data["runtime"], reference=data["reference"], path=path,
        config=_config(data.get("config")),
        roles=[(compile_pattern(r["match"]), r["role"]) for r in data["roles"]], targets=targets,
        role_args=[dict(r.get("args") or {}) for r in data["roles"]],
        role_conditions=[dict(r.get("if_config") or {}) for r in data["roles"]], defaults=data.get("defaults") or {},
        quantize=_quantize(data.get("quantize")),
    )


def _quantize(data: dict[str, Any] | None) -> QuantizeSpec | None:
    if data is None:
        return None
    return QuantizeSpec(tuple(data["roles"]), data["why"], [compile_pattern(p) for p in data.get("include") or ()],
                        [compile_pattern(p) for p in data.get("exclude") or ()], bool(data.get("pipeline", False)))


def _role_table(path: Path, node: yaml.Node, data: dict[str, Any],
                where: str = "roles") -> tuple[dict[str, list[Step]], dict[str, RoleFormat]]:
    """A role -> transforms table (a target's `roles`, a family's style roles): each entry a list of
    transforms or a mapping {transforms, layout, dtype, companions}."""
    roles, formats = {}, {}
    for key_node, value_node in node.value:
        value = data[key_node.value]
        if isinstance(value, dict):  # {transforms, layout, dtype, companions}
            try:
                formats[key_node.value] = parse_role_format(value, f"{where}.{key_node.value}")
            except ValueError as err:
                raise _fail(path, value_node, str(err)) from err
            roles[key_node.value] = list(formats[key_node.value].steps)
            continue
        _check_transforms(path, value_node, f"{where}.{key_node.value}")
        roles[key_node.value] = [parse_step(s) for s in value or []]
    return roles, formats


def load_target_spec(path: Path) -> TargetSpec:
    data, node = _load(path, TARGET_SCHEMA)
    roles, formats = _role_table(path, _child(node, "roles"), data["roles"])
    try:
        options = parse_options(data.get("options") or {})
    except ValueError as err:
        raise _fail(path, _child(node, "options"), str(err)) from err
    if data["expected"] not in ("runtime", "canonical"):
        raise _fail(path, _child(node, "expected"), "expected must be 'runtime' or 'canonical'")
    return TargetSpec(data["target"], data["version"], path, roles, data["expected"], data["shapes"], data["writer"],
                      data.get("weights_stem", {}), data.get("metadata", {}), formats, options,
                      data.get("omit_roles") or {}, data.get("model_tree"),
                      {int(bits): dtype for bits, dtype in (data.get("block_formats") or {}).items()})


@dataclass
class Catalog:
    """Every family (with its sources) and target found under mappings/."""

    families: dict[str, FamilySpec]
    targets: dict[str, TargetSpec]
    float_roles: frozenset[str] = frozenset()  # roles whose source tensors must be floats (roles.yaml)
    unconverted: tuple[Unconverted, ...] = ()  # models recognised but not converted (unconverted.yaml)

    def family(self, name: str) -> FamilySpec:
        for family in self.families.values():
            if name == family.name or name in family.aliases:
                return family
        from vidport.converter.core.errors import closest

        raise VidportError(f"unknown model family '{name}'",
                           hint=f"known: {', '.join(self.families)}" + (f"; did you mean {closest(name, self.families)}?" if closest(name, self.families) else ""))

    def target(self, name: str) -> TargetSpec:
        if name not in self.targets:
            raise VidportError(f"unknown target '{name}'", hint=f"known: {', '.join(sorted(self.targets))}")
        return self.targets[name]


@dataclass(frozen=True)
class Unconverted:
    """A model vidport recognises by its keys but does not convert (mappings/unconverted.yaml)."""

    name: str
    about: str
    detect_any: tuple[Pattern, ...]
    detect_none: tuple[Pattern, ...]

    def fits(self, keys: list[str]) -> bool:
        return (any(p.match(k) is not None for p in self.detect_any for k in keys)
                and not any(p.match(k) is not None for p in self.detect_none for k in keys))


def _load_unconverted(path: Path) -> tuple[Unconverted, ...]:
    if not path.exists():
        return ()
    models = _load(path, UNCONVERTED_SCHEMA)[0]["models"]
    return tuple(Unconverted(m["name"], m["about"], tuple(map(compile_pattern, m["detect"]["any"])),
                             tuple(map(compile_pattern, m["detect"].get("none", [])))) for m in models)


def load_catalog(root: Path | None = None) -> Catalog:
    """All specs under `root` (default: $VIDPORT_MAPPINGS, else the mappings/ shipped with vidport)."""
    root = Path(root or os.environ.get("VIDPORT_MAPPINGS") or MAPPINGS_DIR)
    families: dict[str, FamilySpec] = {}
    for family_file in sorted(root.glob("*/family.yaml")):
        family = load_family_spec(family_file)
        for source_file in sorted(family_file.parent.glob("*.yaml")):
            if source_file.name != "family.yaml":
                spec = load_source_spec(source_file)
                if spec.family != family.name:
                    raise SpecError(f"{source_file}:1: family '{spec.family}' does not match folder family '{family.name}'")
                family.sources.append(spec)
        families[family.name] = family
    targets = {spec.name: spec for spec in map(load_target_spec, sorted((root / "targets").glob("*.yaml")))}
    roles = _load(root / "roles.yaml", ROLES_SCHEMA)[0] if (root / "roles.yaml").exists() else {}
    return Catalog(families, targets, frozenset(roles.get("float", [])), _load_unconverted(root / "unconverted.yaml"))
