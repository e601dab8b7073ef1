"""Infer an architecture config from tensor keys and shapes, as a spec's `config.infer` says.

Ops: `shape` (one key's size along `dim`), `each` (that size for every value of the one
placeholder, in numeric order), `count` (how many distinct placeholder values), `exists`,
`value` (a constant), `expr` (integer arithmetic, and isqrt, on config values named before it:
`d_kv: {expr: "_inner // num_heads"}`; one that reads a value not known yet, such as a head count
from the variant table or `--set`, is evaluated by `finish_expressions` once it is). `dim` may be a
list: `shape` then gives one size per axis. A `default` is used when no key matches. Names starting with `_` are
helpers for variant matching and are not part of the final config.
"""
from __future__ import annotations

from typing import Any

from vidport.converter.core.errors import VidportError
from vidport.converter.patterns import PatternError
from vidport.converter.spec import ConfigSpec, Inference, Variant
from vidport.converter.transforms import Shape


def _matches(inference: Inference, shapes: dict[str, Shape]) -> list[tuple[dict[str, str], Shape]]:
    assert inference.pattern is not None
    found = []
    for key, shape in shapes.items():
        values = inference.pattern.match(key)
        if values is not None:
            found.append((values, shape))
    return found


def _sort_key(value: str) -> tuple[int, Any]:
    return (0, int(value)) if value.isdigit() else (1, value)


def infer_value(inference: Inference, shapes: dict[str, Shape], where: str) -> Any:
    if inference.op == "value":
        return inference.value
    found = _matches(inference, shapes)
    if inference.op == "exists":
        return bool(found)
    if not found:
        if inference.has_default:
            return inference.default
        raise VidportError(f"{where}: cannot infer config '{inference.name}': no key matches '{inference.pattern.text}'")
    if inference.op == "count":
        return len({tuple(sorted(v.items())) for v, _ in found})
    if inference.op == "shape":
        return _size(found[0][1], inference.dim)
    # each: one value per placeholder value, in numeric order
    by_index: dict[str, Any] = {}
    for values, shape in found:
        (index,) = values.values()
        by_index[index] = _size(shape, inference.dim)
    return [by_index[i] for i in sorted(by_index, key=_sort_key)]


def _size(shape: Shape, dim: int | list[int]) -> int | list[int]:
    return [int(shape[d]) for d in dim] if isinstance(dim, list) else int(shape[dim])


def _integers(config: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)}


def infer_expression(inference: Inference, config: dict[str, Any], where: str) -> int:
    """An `expr` on the integer config values known so far."""
    known = _integers(config)
    try:
        return int(inference.value.render(known))
    except (PatternError, ArithmeticError, ValueError) as err:
        missing = sorted(inference.value.names() - set(known))
        hint = ("not known from the weights; give " + " ".join(f"--set {name}=VALUE" for name in missing) if missing
                else "an expr reads integer config values inferred before it (or given)")
        raise VidportError(f"{where}: cannot infer config '{inference.name}' = {inference.value.text[1:-1]}: {err}",
                           hint=hint) from err


def infer_config(spec: ConfigSpec, shapes: dict[str, Shape], where: str, into: dict[str, Any]) -> dict[str, Any]:
    """Add inferred values to `into` for names it does not already hold."""
    for inference in spec.infer:
        if inference.name in into:
            continue
        if inference.op != "expr":
            into[inference.name] = infer_value(inference, shapes, where)
        elif inference.value.names() <= set(_integers(into)):
            into[inference.name] = infer_expression(inference, into, where)
    return into


def finish_expressions(spec: ConfigSpec, where: str, config: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the `expr` values inference left for later (they read a value that only the
    variant table or an override gives), for names still missing; an error names what is lacking."""
    for inference in spec.infer:
        if inference.op == "expr" and inference.name not in config:
            config[inference.name] = infer_expression(inference, config, where)
    return config


def match_variant(variants: list[Variant], config: dict[str, Any]) -> Variant | None:
    for variant in variants:
        if all(config.get(k) == v for k, v in variant.when.items()):
            return variant
    return None


def public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}
