"""Turn a spec's rules into a plan: for every output tensor, which inputs and which transforms.

Planning uses shapes only, so every strictness check (unmapped keys, missing or unexpected
outputs, wrong shapes) fails before a single tensor is read or a file is written.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vidport.converter.core.errors import VidportError, closest, listing
from vidport.converter.dtypes import dtype_name, is_floating
from vidport.converter.spec import Gather, Rule, RuleSet
from vidport.converter.transforms import Shape, Step, shape_steps


@dataclass(frozen=True)
class Recipe:
    """How one output tensor is made from named inputs."""

    inputs: tuple[str, ...]
    steps: tuple[Step, ...]  # applied to each input
    pick: int | None = None  # which part of a split
    gather_axis: int | None = None  # concatenate the inputs' results
    generate: str | None = None  # or: made by a registered generator from the expected shape


@dataclass
class Mapping:
    """The outcome of applying rules to a set of keys."""

    recipes: dict[str, Recipe]
    shapes: dict[str, Shape]
    dropped: list[tuple[str, str]] = field(default_factory=list)
    rule_of: dict[str, str] = field(default_factory=dict)  # output -> file:line of its rule


def map_keys(
    shapes: dict[str, Shape],
    rules: RuleSet,
    what: str,
    pre_steps=lambda key: (),
    identity_default: bool = False,
) -> Mapping:
    """Apply ordered rules (first match wins) to every key; unmatched keys are an error unless
    `identity_default` keeps them as they are. `pre_steps(key)` adds transforms before the rule's."""
    recipes: dict[str, Recipe] = {}
    out_shapes: dict[str, Shape] = {}
    rule_of: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    unmatched: list[str] = []
    groups: dict[tuple[str, str], dict[str, str]] = {}  # (target, rule) -> {gather value: input key}
    rules = rules.over(shapes)  # `max_n` in a rule: the largest {n} among these keys

    for key in shapes:
        found = rules.match(key)
        extra = tuple(pre_steps(key))
        if found is None:
            if identity_default:
                try:
                    shape = shape_steps(list(extra), shapes[key])
                except (ValueError, IndexError) as err:
                    raise VidportError(f"{what}: key {key} (shape {list(shapes[key])}): {err}") from err
                _add(recipes, out_shapes, rule_of, key, Recipe((key,), extra), shape, "identity", what)
            else:
                unmatched.append(key)
            continue
        rule, values = found
        if rule.drops:
            dropped.append((key, rule.why or ""))
            continue
        steps = extra + rule.steps
        targets = [t.render(values) for t in rule.targets]
        try:
            shape = shape_steps(list(steps), shapes[key])
        except (ValueError, IndexError) as err:
            raise VidportError(f"{what}: key {key} (shape {list(shapes[key])}): {err}", hint=f"rule at {rule.where}") from err
        if rule.gather is not None:
            groups.setdefault((targets[0], rule.where), {})[values[rule.gather.over]] = key
            continue
        if len(targets) == 1:
            if isinstance(shape, list):
                raise VidportError(f"{what}: rule at {rule.where} splits {key} but names one target")
            _add(recipes, out_shapes, rule_of, targets[0], Recipe((key,), steps), shape, rule.where, what)
        else:
            if not isinstance(shape, list) or len(shape) != len(targets):
                raise VidportError(f"{what}: rule at {rule.where} names {len(targets)} targets for {key}, "
                                   "but its transforms do not end in a split into that many parts")
            for index, (target, part) in enumerate(zip(targets, shape)):
                _add(recipes, out_shapes, rule_of, target, Recipe((key,), steps, pick=index), part, rule.where, what)

    for (target, where), parts in groups.items():
        rule = next(r for r in rules.rules if r.where == where)
        _add_gather(recipes, out_shapes, rule_of, target, rule, parts, shapes, pre_steps, what)

    if unmatched:
        hint = _rule_hint(unmatched[0], rules)
        raise VidportError(f"{what}: {len(unmatched)} key(s) match no rule: {listing(unmatched)}", hint=hint)
    return Mapping(recipes, out_shapes, dropped, rule_of)


def _add(recipes, shapes, rule_of, target: str, recipe: Recipe, shape, where: str, what: str) -> None:
    if target in recipes:
        raise VidportError(f"{what}: two keys map to {target} ({recipes[target].inputs[0]} and {recipe.inputs[0]})",
                           hint=f"check the rule at {where}")
    recipes[target] = recipe
    shapes[target] = tuple(shape)
    rule_of[target] = where


def _add_gather(recipes, shapes, rule_of, target: str, rule: Rule, parts: dict[str, str], in_shapes, pre_steps, what) -> None:
    gather: Gather = rule.gather  # type: ignore[assignment]
    missing = [p for p in gather.order if p not in parts]
    if missing:
        raise VidportError(f"{what}: {target} needs parts {missing} that the source lacks", hint=f"rule at {rule.where}")
    inputs = tuple(parts[p] for p in gather.order)
    steps = tuple(pre_steps(inputs[0])) + rule.steps
    part_shapes = [shape_steps(list(steps), in_shapes[k]) for k in inputs]
    axis = gather.axis % len(part_shapes[0])
    if any(len(s) != len(part_shapes[0]) or any(a != b for i, (a, b) in enumerate(zip(s, part_shapes[0])) if i != axis)
           for s in part_shapes):
        raise VidportError(f"{what}: cannot concatenate {list(inputs)} into {target}: shapes {part_shapes}")
    shape = list(part_shapes[0])
    shape[axis] = sum(s[axis] for s in part_shapes)
    _add(recipes, shapes, rule_of, target, Recipe(inputs, steps, gather_axis=axis), shape, rule.where, what)


def _rule_hint(key: str, rules: RuleSet) -> str:
    patterns = [r.source.text for r in rules.rules]
    near = closest(key, patterns)
    if near is None:
        return "add a rule for it, or a drop rule with a reason"
    where = next(r.where for r in rules.rules if r.source.text == near)
    return f"closest rule: '{near}' ({where}); add a rule for it, or a drop rule with a reason"


def check_expected(produced: dict[str, Shape], expected: dict[str, Shape], what: str,
                   origin=lambda key: None) -> None:
    """Strictness on the target side: every expected key produced, nothing extra, shapes equal.
    `origin(key)` names the source key an output came from, for the message."""
    missing = sorted(set(expected) - set(produced))
    extra = sorted(set(produced) - set(expected))
    if missing:
        near = closest(missing[0], extra or produced)
        raise VidportError(f"{what}: {len(missing)} key(s) the model needs are not produced: {listing(missing)}",
                           hint=f"closest produced key: {near}" if near else "the source lacks them")
    if extra:
        near = closest(extra[0], expected)
        named = [f"{k} (from source key {origin(k)})" if origin(k) else k for k in extra]
        raise VidportError(f"{what}: {len(extra)} produced key(s) the model does not have: {listing(named)}",
                           hint=f"closest model key: {near}" if near else None)
    wrong = [f"{k} {list(produced[k])} != {list(expected[k])}" + (f" (from source key {origin(k)})" if origin(k) else "")
             for k in sorted(expected) if tuple(produced[k]) != tuple(expected[k])]
    if wrong:
        raise VidportError(f"{what}: {len(wrong)} shape mismatch(es): {listing(wrong, 4)}",
                           hint="the architecture config does not match the weights, or a transform is wrong")


def check_source_dtypes(canonical: Mapping, dtypes: dict[str, np.dtype], role_of: Callable[[str], str],
                        float_roles: frozenset[str], what: str) -> None:
    """A source tensor that feeds a role holding floats (mappings/roles.yaml) must be a float:
    integers there are a damaged or crafted file, which converting would pass on as weights."""
    for key, recipe in canonical.recipes.items():
        role = role_of(key)
        if role.split(".")[0] not in float_roles:
            continue
        for name in recipe.inputs:
            if not is_floating(dtypes[name]):
                raise VidportError(f"{what}: tensor {name} is {dtype_name(dtypes[name])}, but {key} is a {role} "
                                   "and holds floats; refused (damaged or crafted file?)")
