"""Where one source key goes: the source rule that took it (file:line), the canonical tensor(s) it
became, and for a target the role transforms, the family's target rule and the written tensor(s),
with shapes. Read off the same plan `convert` makes, so the answer is what a conversion does;
a dropped key gives its reason and a key no rule takes gives the closest rule."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidport.converter.checkpoint import read_checkpoint
from vidport.converter.convert import ConversionPlan, plan_conversion
from vidport.converter.core.errors import VidportError, closest
from vidport.converter.detect import detect
from vidport.converter.dtypes import dtype_name
from vidport.converter.infer import public
from vidport.converter.layouts import TargetLayout
from vidport.converter.plan import Recipe
from vidport.converter.spec import Rule, RuleSet, load_catalog
from vidport.converter.transforms import Shape, Step, shape_steps


@dataclass
class RuleRef:
    """A spec rule as a person finds it: `family/file.yaml:line`, its pattern and what it writes."""

    where: str
    source: str
    targets: list[str]
    when: str | None = None

    @property
    def text(self) -> str:
        writes = ", ".join(self.targets) if self.targets else "dropped"
        return f"{self.source} -> {writes}" + (f" (when {self.when})" if self.when else "")


@dataclass
class TargetTensor:
    key: str
    shape: Shape
    role: str | None  # the canonical key's role, whose target transforms apply
    role_steps: list[str]  # the target spec's transforms for that role
    rule: RuleRef | None  # the family's rule for this target (None: the name is kept)
    rule_steps: list[str]
    layout: str | None = None  # targets that state a layout / dtype per tensor (TTNN)
    dtype: str | None = None
    companion_of: str | None = None  # a tensor written beside another (TTNN group-norm masks)


@dataclass
class CanonicalTensor:
    key: str
    shape: Shape
    steps: list[str]  # the source rule's transforms
    part: str | None  # "part 2 of 3" of a split, or what it is concatenated with
    omitted: str | None = None  # the target leaves it out, and why
    targets: list[TargetTensor] = field(default_factory=list)


@dataclass
class Explanation:
    source: Path
    key: str
    shape: Shape
    dtype: str
    family: str
    spec: str
    target: str
    target_spec: str  # where the target's role transforms are declared: targets/mlx.yaml
    variant: str | None = None
    assumed: dict[str, Any] = field(default_factory=dict)  # library defaults taken (no variant matched)
    rule: RuleRef | None = None
    dropped: str | None = None  # why the source spec drops the key
    closest: RuleRef | None = None  # no rule takes the key: the rule most like it
    canonical: list[CanonicalTensor] = field(default_factory=list)
    problem: str | None = None  # the conversion cannot be planned: why (the target side is then unknown)


def describe_step(step: Step) -> str:
    if step.params is None:
        return step.name
    if isinstance(step.params, dict):
        return f"{step.name}(" + ", ".join(f"{k}={v}" for k, v in step.params.items()) + ")"
    if isinstance(step.params, (list, tuple)):
        return f"{step.name}({', '.join(str(p) for p in step.params)})"
    return f"{step.name}({step.params})"


def _rule_ref(rule: Rule) -> RuleRef:
    return RuleRef(rule.where, rule.source.text, [t.text for t in rule.targets],
                   rule.when.text if rule.when else None)


def _find_rule(rules: RuleSet, where: str) -> Rule | None:
    return next((r for r in rules.rules if r.where == where), None)


def _source_key(key: str, keys: list[str], source: Path) -> str:
    """The key as the spec sees it; a key given with the wrapper prefix the file adds is found too."""
    if key in keys:
        return key
    wrapped = [k for k in keys if key.endswith("." + k)]
    if wrapped:
        return max(wrapped, key=len)
    near = closest(key, keys)
    raise VidportError(f"{source}: no tensor {key}", hint=f"closest key: {near}" if near else "vidport inspect lists the file")


def _part(recipe: Recipe, key: str, parts: int) -> str | None:
    if recipe.pick is not None:
        return f"part {recipe.pick + 1} of {parts} of the split"
    if recipe.gather_axis is not None:
        others = [k for k in recipe.inputs if k != key]
        return f"concatenated with {', '.join(others)} along axis {recipe.gather_axis} (order: {', '.join(recipe.inputs)})"
    return None


def explain_key(source_path: str | Path, key: str, target: str = "mlx", family: str | None = None,
                overrides: dict[str, Any] | None = None, target_options: dict[str, Any] | None = None) -> Explanation:
    """Everything a conversion of `source_path` to `target` does with `key` (a source key)."""
    catalog = load_catalog()
    source = read_checkpoint(source_path)
    detected = detect(source, catalog, family)
    spec, fam = detected.spec, detected.family
    key = _source_key(key, list(detected.tensors.refs), source.path)
    ref = detected.tensors.refs[key]
    target_spec = catalog.target(target)
    found = Explanation(source.path, key, tuple(ref.shape), dtype_name(ref.dtype), fam.name, spec.name,
                        target_spec.name, f"{target_spec.path.parent.name}/{target_spec.path.name}")
    match = spec.rules.over(detected.tensors.refs).match(key)
    if match is None:
        near = max(spec.rules.rules, key=lambda r: difflib.SequenceMatcher(None, key, r.source.text).ratio(), default=None)
        found.closest = _rule_ref(near) if near else None
        return found
    rule, _values = match
    found.rule = _rule_ref(rule)
    if rule.drops:
        found.dropped = rule.why
        return found
    try:
        plan = plan_conversion(source_path, target, fam.name, overrides=overrides, target_options=target_options)
    except VidportError as err:
        found.problem = err.message + (f" ({err.hint})" if err.hint else "")
        found.canonical = _canonical_from_rule(rule, _values, tuple(ref.shape))
        return found
    found.variant, found.assumed = plan.variant, plan.assumed
    found.canonical = _canonical(plan, key, rule)
    return found


def _canonical_from_rule(rule: Rule, values: dict[str, str], shape: Shape) -> list[CanonicalTensor]:
    """The source side from the rule alone, when the whole conversion cannot be planned."""
    try:
        shapes = None if rule.gather else shape_steps(list(rule.steps), shape)
    except (ValueError, IndexError):
        shapes = None
    steps = [describe_step(s) for s in rule.steps]
    return [CanonicalTensor(t.render(values), tuple((shapes[i] if isinstance(shapes, list) else shapes) or ()), steps,
                            f"part {i + 1} of {len(rule.targets)} of the split" if len(rule.targets) > 1 else None)
            for i, t in enumerate(rule.targets)]


def _canonical(plan: ConversionPlan, key: str, rule: Rule) -> list[CanonicalTensor]:
    fam = plan.detected.family
    layout = TargetLayout(plan.target, fam, public(plan.config), plan.options)
    omitted = dict(plan.canonical.dropped)
    extras = fam.targets.get(plan.target.name)
    target_rules = extras.rules if extras else RuleSet([])
    found = []
    for name, recipe in plan.canonical.recipes.items():
        if key not in recipe.inputs:
            continue
        tensor = CanonicalTensor(name, plan.canonical.shapes[name], [describe_step(s) for s in recipe.steps],
                                 _part(recipe, key, len(rule.targets)), omitted.get(name))
        for out, final in plan.final.recipes.items():
            if name in final.inputs:
                tensor.targets.append(_target(plan, layout, target_rules, name, out, final))
        found.append(tensor)
    return found


def _target(plan: ConversionPlan, layout: TargetLayout, rules: RuleSet, canonical: str, out: str,
            recipe: Recipe) -> TargetTensor:
    where = plan.final.rule_of.get(out, "identity")
    fmt = plan.formats.get(out)
    shape = plan.final.shapes[out]
    if fmt is not None and where.startswith("companion of "):
        return TargetTensor(out, shape, fmt.role, [describe_step(s) for s in fmt.steps], None, [], fmt.layout,
                            fmt.dtype, companion_of=where.removeprefix("companion of "))
    role_steps = list(layout.steps(canonical))
    rule = _find_rule(rules, where)
    return TargetTensor(out, shape, layout.role(canonical), [describe_step(s) for s in role_steps],
                        _rule_ref(rule) if rule else None,
                        [describe_step(s) for s in recipe.steps[len(role_steps):]],
                        fmt.layout if fmt else None, fmt.dtype if fmt else None)
