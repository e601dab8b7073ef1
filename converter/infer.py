"""Infer an architecture config from tensor keys and shapes, as a spec's `config.infer` says.

Ops: `shape` (one key's size along `dim`), `each` (that size for every value of the one
placeholder, in numeric order; `reverse: true` descending), `count` (how many distinct placeholder
values; with `per: n`, a list: that many for each value of {n}), `exists`,
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
    if inference.op == "count" and inference.per is None:
        return len({tuple(sorted(v.items())) for v, _ in found})
    if inference.op == "shape":
        return _size(found[0][1], inference.dim)
    by_index: dict[str, Any] = {}
    if inference.op == "count":  # per: how many distinct values the other placeholders take, per value of one
        groups: dict[str, set] = {}
        for values, _ in found:
            groups.setdefault(values[inference.per], set()).add(tuple(sorted(values.items())))
        by_index = {index: len(members) for index, members in groups.items()}
    else:  # each: one value per placeholder value, in numeric order
        for values, shape in found:
            (index,) = values.values()
            by_index[index] = _size(shape, inference.dim)
    return [by_index[i] for i in sorted(by_index, key=_sort_key, reverse=inference.reverse)]


def _size(shape: Shape, dim: int | list[int]) -> int | list[int]:
    return [int(shape[d]) for d in dim] if isinstance(dim, list) else int(shape[dim])


def _integers(config: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool)}


class ConfigNeeded(VidportError):
    """Config values the weights cannot tell and nothing gave: the hint asks for each by name."""

    def __init__(self, message: str, names: list[str], prefix: str = ""):
        super().__init__(message, hint="give " + " ".join(f"--set {prefix}{name}=VALUE" for name in names))
        self.names = names

    def for_component(self, component: str, family: str) -> ConfigNeeded:
        """The same request inside a pipeline, where overrides are COMPONENT.KEY."""
        return ConfigNeeded(f"{component} ({family}): {self.message}", self.names, prefix=f"{component}.")


def infer_expression(inference: Inference, config: dict[str, Any], where: str) -> int:
    """An `expr` on the integer config values known so far."""
    known = _integers(config)
    expression = inference.value.text[1:-1]
    missing = sorted(name for name in inference.value.names() if name not in config)
    if missing:
        raise ConfigNeeded(f"{where}: config '{inference.name}' = {expression} needs {', '.join(missing)}, "
                           "which the weights do not tell", missing)
    try:
        return int(inference.value.render(known))
    except (PatternError, ArithmeticError, ValueError) as err:
        raise VidportError(f"{where}: cannot infer config '{inference.name}' = {expression}: {err}",
                           hint="an expr reads integer config values inferred before it (or given)") from err


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


def _same(given: Any, told: Any) -> bool:
    """Equal, where an int stands for "this value in every block" beside a per-block list."""
    if isinstance(given, (list, tuple)) and isinstance(told, (list, tuple)):
        return len(given) == len(told) and all(_same(a, b) for a, b in zip(given, told))
    if isinstance(given, (list, tuple)) and isinstance(told, int):
        return all(_same(a, told) for a in given)
    if isinstance(told, (list, tuple)) and isinstance(given, int):
        return all(_same(given, b) for b in told)
    return type(given) in (int, bool, float) and given == told


def check_given_config(spec: ConfigSpec, shapes: dict[str, Shape], given: dict[str, Any], where: str) -> None:
    """A config file's value that the weights' shapes also tell must agree with them. The file is
    read first and wins over inference, so a value that lies (a block width of millions) would
    otherwise size the models built from the config before any shape check could object."""
    for inference in spec.infer:
        if given.get(inference.name) is None or inference.op not in ("shape", "each", "count", "exists"):
            continue  # null: the library's default, told by the weights
        if inference.op != "exists" and not _matches(inference, shapes):
            continue  # the weights do not tell this one
        told = infer_value(inference, shapes, where)
        if not _same(given[inference.name], told):
            raise VidportError(f"{where}: {inference.name} = {str(given[inference.name])[:80]}, but the weights' "
                               f"shapes say {told}", hint="this config does not describe these weights")


def check_limits(limits: dict[str, int], config: dict[str, Any], where: str) -> None:
    """Values the shapes cannot tell, each at most the family's declared limit (such a value sizes
    tables a model computes when it is built: a position table of millions of rows)."""
    for name, limit in limits.items():
        if name not in config or config[name] is None:
            continue
        values = config[name] if isinstance(config[name], (list, tuple)) else [config[name]]
        for value in values:
            if type(value) is not int or not 0 < value <= limit:
                raise VidportError(f"{where}: {name} = {str(config[name])[:80]}; the family allows integers "
                                   f"from 1 to {limit}", hint="the config file or --set value is damaged or crafted")


def match_variant(variants: list[Variant], config: dict[str, Any]) -> Variant | None:
    for variant in variants:
        if all(config.get(k) == v for k, v in variant.when.items()):
            return variant
    return None


def assume_defaults(variants: list[Variant], defaults: dict[str, Any], config: dict[str, Any],
                    where: str) -> dict[str, Any]:
    """No known release matched: the values only a variant gives (the names its table sets) that
    nothing else gave take the family's declared defaults (the canonical library's own), which are
    added to `config` and returned; values without a default are asked for, all at once."""
    untold = list(dict.fromkeys(name for variant in variants for name in variant.config))
    lacking = [name for name in untold if name not in config]
    needed = [name for name in lacking if name not in defaults]
    if needed:
        read = list(dict.fromkeys(name for variant in variants for name in variant.when))
        seen = ", ".join(f"{name.lstrip('_')}={config.get(name)!r}" for name in read)
        raise ConfigNeeded(f"{where}: no known release matches these weights ({seen}); the shapes cannot tell "
                           f"{', '.join(needed)}", needed)
    assumed = {name: defaults[name] for name in lacking}
    config.update(assumed)
    return assumed


def assumption_note(assumed: dict[str, Any]) -> str | None:
    """One line saying which values were assumed, for the CLI and inspect to print."""
    if not assumed:
        return None
    values = ", ".join(f"{name}={value!r}" for name, value in assumed.items())
    return f"no known release matches these weights; assumed the library defaults {values} (--set NAME=VALUE to change)"


def public(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}
