"""What a target spec says per tensor role beyond transforms, and how one conversion resolves it.

A target role entry is either a list of transforms (MLX, Diffusers) or a mapping:

    linear.weight:
      transforms: [transpose]
      layout: TILE            # how the target stores it (TTNN: TILE or ROW_MAJOR)
      dtype: "{dtype}"        # a fixed dtype, or a placeholder filled from a target option
      companions:             # extra tensors made from this one, named <module>.<name>
        input_mask: {transforms: [...], layout: TILE, dtype: bfloat8_b}

Transform parameters and dtypes may be placeholders, `"{name}"`, filled per conversion from
the target's `options` (`{dtype}`, `{grid.x}`, `{grid.y}` when the option has a `format`), the
family role's `args` (`{groups}`) and the architecture config (`{config.motion_norm_num_groups}`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from vidport.converter.core.errors import VidportError
from vidport.converter.transforms import REGISTRY, Step, parse_step
from vidport.converter.ttnn_transforms import is_placeholder

if TYPE_CHECKING:
    from vidport.converter.plan import Mapping
    from vidport.converter.spec import FamilySpec, TargetSpec


@dataclass(frozen=True)
class RoleFormat:
    """How one role is stored by a target; `companions` are derived tensors (name -> format)."""

    steps: tuple[Step, ...]
    layout: str | None = None
    dtype: str | None = None
    companions: dict[str, "RoleFormat"] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetOption:
    """A conversion option a target declares (`--ttnn-dtype`, `--ttnn-grid`, `--cache-style`)."""

    name: str
    default: str
    choices: tuple[str, ...] = ()
    format: str | None = None  # a regex whose named groups become `{name.group}` placeholders
    help: str = ""


FORMAT_FIELDS = {"transforms", "layout", "dtype", "companions"}


def parse_role_format(value: dict[str, Any], where: str) -> RoleFormat:
    """A mapping-form role entry; raises ValueError saying what is wrong."""
    unknown = set(value) - FORMAT_FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(sorted(FORMAT_FIELDS))}")
    transforms = value.get("transforms") or []
    if not isinstance(transforms, list):
        raise ValueError(f"{where}.transforms must be a list of transforms")
    steps = []
    for index, entry in enumerate(transforms):
        try:
            steps.append(parse_step(entry))
        except ValueError as err:
            raise ValueError(f"{where}.transforms[{index}]: {err}") from err
    companions = {}
    for name, sub in (value.get("companions") or {}).items():
        if not isinstance(sub, dict) or "companions" in sub:
            raise ValueError(f"{where}.companions.{name} must be a mapping of transforms, layout, dtype")
        companions[name] = parse_role_format(sub, f"{where}.companions.{name}")
    for key in ("layout", "dtype"):
        if key in value and not isinstance(value[key], str):
            raise ValueError(f"{where}.{key} must be a string")
    return RoleFormat(tuple(steps), value.get("layout"), value.get("dtype"), companions)


def parse_options(data: dict[str, Any]) -> dict[str, TargetOption]:
    options = {}
    for name, entry in (data or {}).items():
        if not isinstance(entry, dict) or "default" not in entry:
            raise ValueError(f"options.{name} needs a default")
        fmt = entry.get("format")
        if fmt is not None:
            try:
                re.compile(fmt)
            except re.error as err:
                raise ValueError(f"options.{name}.format is not a regular expression: {err}") from err
        options[name] = TargetOption(name, str(entry["default"]), tuple(map(str, entry.get("choices") or ())),
                                     fmt, entry.get("help", ""))
    return options


def resolve_options(target: "TargetSpec", given: dict[str, Any]) -> dict[str, Any]:
    """The target's options for one conversion: defaults, overridden by `given`, checked; an option
    with a `format` also yields its named parts (`grid` 8x8 -> `grid.x` 8, `grid.y` 8)."""
    unknown = sorted(set(given) - set(target.options))
    if unknown:
        known = ", ".join(sorted(target.options)) or "none"
        raise VidportError(f"target '{target.name}' takes no option {', '.join(unknown)}", hint=f"its options: {known}")
    resolved: dict[str, Any] = {}
    for name, option in target.options.items():
        value = str(given[name]) if given.get(name) is not None else option.default
        if option.choices and value not in option.choices:
            raise VidportError(f"{name} '{value}': not supported by target '{target.name}'",
                               hint=f"choose one of {', '.join(option.choices)}")
        resolved[name] = value
        if option.format:
            match = re.fullmatch(option.format, value)
            if match is None:
                raise VidportError(f"{name} '{value}': not of the form the target expects",
                                   hint=option.help or f"must match {option.format}")
            resolved.update({f"{name}.{part}": _number(v) for part, v in match.groupdict().items()})
    return resolved


def _number(text: str) -> Any:
    return int(text) if text.isdigit() else text


def substitute(value: Any, context: dict[str, Any], where: str) -> Any:
    """Fill `"{name}"` placeholders (in nested lists and mappings) from `context`."""
    if is_placeholder(value):
        name = value[1:-1]
        if name not in context:
            near = ", ".join(sorted(k for k in context if not k.startswith("config."))) or "none"
            raise VidportError(f"{where}: placeholder {value} has no value in this conversion",
                               hint=f"known: {near} and config.<name>; a role argument is declared "
                                    "as `args:` on the family's role")
        return context[name]
    if isinstance(value, list):
        return [substitute(v, context, where) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, context, where) for k, v in value.items()}
    return value


def resolve_steps(steps: tuple[Step, ...] | list[Step], context: dict[str, Any], where: str) -> list[Step]:
    resolved = []
    for step in steps:
        params = substitute(step.params, context, where)
        if params is not step.params:
            problem = REGISTRY[step.name].check(params)
            if problem:
                raise VidportError(f"{where}: transform {step.name} with {params}: {problem}")
        resolved.append(Step(step.name, params))
    return resolved


@dataclass(frozen=True)
class TensorFormat:
    """One output tensor's target format, as the writer and the manifest see it."""

    role: str
    layout: str | None
    dtype: str | None
    steps: tuple[Step, ...]

    def as_json(self) -> dict[str, Any]:
        return {"role": self.role, "layout": self.layout, "dtype": self.dtype,
                "transforms": [s.name if s.params is None else {s.name: s.params} for s in self.steps]}


class TargetLayout:
    """A target spec seen by one conversion: each canonical key's steps, format, companions and
    whether the target omits it, with every placeholder resolved."""

    def __init__(self, target: "TargetSpec", family: "FamilySpec", config: dict[str, Any], options: dict[str, Any]):
        extras = family.targets.get(target.name)
        style = extras.styles.get(options.get("cache_style")) if extras else None
        if style is not None:  # the family's table for this cache style replaces the target's roles
            target = replace(target, roles=style.roles, formats=style.formats)
        self.target, self.family, self.config = target, family, config
        self.base = {**{f"config.{k}": v for k, v in config.items()}, **options}

    def _context(self, key: str) -> dict[str, Any]:
        args = self.family.args_of(key, self.config)
        return {**self.base, **{k: substitute(v, self.base, f"{self.family.path.name}: role args of {key}")
                                for k, v in args.items()}}

    def role(self, key: str) -> str:
        return self.family.role_of(key, self.config)

    def omitted(self, key: str) -> str | None:
        """Why the target leaves this key out (its role is listed under `omit_roles`), or None."""
        role = self.role(key)
        for candidate in (role, role.split(".")[0]):
            if candidate in self.target.omit_roles:
                return f"target {self.target.name} omits role {candidate}: {self.target.omit_roles[candidate]}"
        return None

    def steps(self, key: str) -> list[Step]:
        role = self.role(key)
        return resolve_steps(self.target.steps_for(role), self._context(key), f"{self.target.path.name} role {role} ({key})")

    def format(self, key: str) -> TensorFormat:
        role = self.role(key)
        entry = self.target.format_for(role)
        dtype = substitute(entry.dtype, self._context(key), f"{self.target.path.name} role {role}") if entry else None
        return TensorFormat(role, entry.layout if entry else None, dtype, tuple(self.steps(key)))

    def companions(self, key: str) -> dict[str, TensorFormat]:
        role = self.role(key)
        entry = self.target.format_for(role)
        found = {}
        for name, sub in (entry.companions if entry else {}).items():
            where = f"{self.target.path.name} role {role} companion {name} ({key})"
            context = self._context(key)
            found[name] = TensorFormat(f"{role}:{name}", sub.layout, substitute(sub.dtype, context, where),
                                       tuple(resolve_steps(sub.steps, context, where)))
        return found

    def add_companions(self, mapping: "Mapping", input_shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorFormat]:
        """Add each companion to `mapping` (next to the tensor it is made from; `input_shapes` are
        the shapes the mapping read); returns the format of every output, companions included."""
        from vidport.converter.plan import Recipe
        from vidport.converter.transforms import shape_steps

        formats: dict[str, TensorFormat] = {}
        for out, recipe in list(mapping.recipes.items()):
            key = recipe.inputs[0] if recipe.inputs else out
            formats[out] = self.format(key) if recipe.generate else replace(self.format(key), steps=recipe.steps)
            if recipe.generate or len(recipe.inputs) != 1 or recipe.pick is not None:
                continue
            for name, fmt in self.companions(key).items():
                companion = f"{out.rsplit('.', 1)[0]}.{name}"
                mapping.recipes[companion] = Recipe((key,), fmt.steps)
                mapping.shapes[companion] = tuple(shape_steps(list(fmt.steps), input_shapes[key]))
                mapping.rule_of[companion] = f"companion of {out}"
                formats[companion] = fmt
        return formats
