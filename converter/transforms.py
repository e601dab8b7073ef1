"""Named tensor transforms that specs compose: each has an array function and a shape function,
so a whole conversion is checked from shapes alone before any tensor is read.

In YAML a transform is a name (`transpose`) or a one-key mapping (`permute: [0, 2, 3, 1]`).
A rare transform YAML cannot say is a Python function registered here with `register`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from vidport.converter.dtypes import NAMED_DTYPES

Shape = tuple[int, ...]
Value = Any  # an array, or a list of arrays after `split`


@dataclass(frozen=True)
class Transform:
    name: str
    apply: Callable[..., Value]
    shape: Callable[..., Any]  # Shape -> Shape, or list[Shape] for splits
    check: Callable[[Any], str | None]  # validates params at spec load time
    param: str | None  # keyword that a scalar/list parameter is passed as


REGISTRY: dict[str, Transform] = {}


def register(
    name: str,
    apply: Callable[..., Value],
    shape: Callable[..., Any],
    check: Callable[[Any], str | None] | None = None,
    param: str | None = None,
) -> None:
    """Add a transform specs can name; `param` names the keyword a non-mapping parameter binds to."""
    REGISTRY[name] = Transform(name, apply, shape, check or (lambda _p: None), param)


def _permute_shape(shape: Shape, order: list[int]) -> Shape:
    if sorted(order) != list(range(len(shape))):
        raise ValueError(f"permute {order} does not fit a {len(shape)}-d tensor of shape {list(shape)}")
    return tuple(shape[i] for i in order)


def _reshape_shape(shape: Shape, dims: list[int]) -> Shape:
    total = int(np.prod(shape, dtype=np.int64))
    known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
    out = [total // known if d == -1 else d for d in dims] if known else list(dims)
    if int(np.prod(out, dtype=np.int64)) != total:
        raise ValueError(f"cannot reshape {list(shape)} to {dims}")
    return tuple(out)


def _axis(axis: int, rank: int, what: str, shape: Shape) -> int:
    """A numpy-style axis (negative counts from the end) of a `rank`-d tensor; one outside it is an
    error, never wrapped (a wrapped axis would squeeze or split the wrong dimension silently)."""
    if not -rank <= axis < rank:
        raise ValueError(f"{what}: axis {axis} is out of range for a {len(shape)}-d tensor of shape {list(shape)}")
    return axis % rank


def _squeeze_shape(shape: Shape, axes: list[int]) -> Shape:
    axes = [_axis(a, len(shape), "squeeze", shape) for a in axes]
    if any(shape[a] != 1 for a in axes):
        raise ValueError(f"cannot squeeze axes {axes} of shape {list(shape)}: not of size 1")
    return tuple(n for i, n in enumerate(shape) if i not in axes)


def _split_sizes(shape: Shape, params: dict) -> list[int]:
    axis = _axis(params.get("axis", 0), len(shape), "split", shape)
    if "sizes" in params:
        sizes = list(params["sizes"])
    else:
        parts = params["parts"]
        if shape[axis] % parts:
            raise ValueError(f"cannot split axis {axis} of {list(shape)} into {parts} equal parts")
        sizes = [shape[axis] // parts] * parts
    if sum(sizes) != shape[axis]:
        raise ValueError(f"split sizes {sizes} do not add up to {shape[axis]} (shape {list(shape)})")
    return sizes


def _split(array: np.ndarray, **params: Any) -> list[np.ndarray]:
    axis = params.get("axis", 0)
    bounds = np.cumsum(_split_sizes(array.shape, params))[:-1]
    return [np.ascontiguousarray(part) for part in np.split(array, bounds, axis=axis)]


def _split_shape(shape: Shape, **params: Any) -> list[Shape]:
    axis = _axis(params.get("axis", 0), len(shape), "split", shape)
    return [tuple(n if i != axis else size for i, n in enumerate(shape)) for size in _split_sizes(shape, params)]


def _transpose_shape(shape: Shape) -> Shape:
    if len(shape) != 2:
        raise ValueError(f"transpose needs a 2-d tensor, got shape {list(shape)}")
    return shape[::-1]


def _unsqueeze_shape(shape: Shape, axis: int) -> Shape:
    axis = _axis(axis, len(shape) + 1, "unsqueeze", shape)
    return tuple(shape[:axis]) + (1,) + tuple(shape[axis:])


def _moveaxis_shape(shape: Shape, axes: list[int]) -> Shape:
    """One axis moved, whatever the rank (a convolution's input channels last, 2-D or 3-D alike)."""
    source, destination = (a if a >= 0 else len(shape) + a for a in axes)
    if not (0 <= source < len(shape) and 0 <= destination < len(shape)):
        raise ValueError(f"moveaxis {axes} does not fit a {len(shape)}-d tensor of shape {list(shape)}")
    order = [i for i in range(len(shape)) if i != source]
    order.insert(destination, source)
    return tuple(shape[i] for i in order)


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    return array.astype(NAMED_DTYPES[dtype])


register("transpose", lambda a: np.ascontiguousarray(a.T), _transpose_shape)
register(
    "permute",
    lambda a, order: np.ascontiguousarray(a.transpose(order)),
    lambda s, order: _permute_shape(s, order),
    lambda p: None if isinstance(p, list) and all(isinstance(i, int) for i in p) else "permute takes a list of axes",
    param="order",
)
register(
    "reshape",
    lambda a, dims: a.reshape(_reshape_shape(a.shape, dims)),
    lambda s, dims: _reshape_shape(s, dims),
    lambda p: None if isinstance(p, list) and all(isinstance(i, int) for i in p) else "reshape takes a list of sizes",
    param="dims",
)
register(
    "squeeze",
    lambda a, axes: a.reshape(_squeeze_shape(a.shape, axes)),
    lambda s, axes: _squeeze_shape(s, axes),
    lambda p: None if isinstance(p, list) else "squeeze takes a list of axes",
    param="axes",
)
register(
    "unsqueeze",
    lambda a, axis: np.expand_dims(a, axis),
    lambda s, axis: _unsqueeze_shape(s, axis),
    lambda p: None if isinstance(p, int) else "unsqueeze takes one axis",
    param="axis",
)
register(
    "moveaxis",
    lambda a, axes: np.ascontiguousarray(np.moveaxis(a, axes[0], axes[1])),
    lambda s, axes: _moveaxis_shape(s, axes),
    lambda p: None if isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) for i in p)
    else "moveaxis takes [source, destination]",
    param="axes",
)
register(
    "split",
    _split,
    _split_shape,
    lambda p: None if isinstance(p, dict) and ("parts" in p or "sizes" in p) else "split takes {axis, parts} or {axis, sizes}",
)
register(
    "cast",
    _cast,
    lambda s, dtype: s,
    lambda p: None if p in NAMED_DTYPES else f"cast takes one of {sorted(NAMED_DTYPES)}",
    param="dtype",
)


@dataclass(frozen=True)
class Step:
    """One transform with its parameters, as written in a spec."""

    name: str
    params: Any = None

    def _call(self, fn: Callable, value: Any) -> Any:
        if self.params is None:
            return fn(value)
        if isinstance(self.params, dict):
            return fn(value, **self.params)
        return fn(value, **{REGISTRY[self.name].param: self.params})

    def apply(self, array: np.ndarray) -> Value:
        return self._call(REGISTRY[self.name].apply, array)

    def shape(self, shape: Shape) -> Any:
        return self._call(REGISTRY[self.name].shape, shape)


def parse_step(entry: Any) -> Step:
    """`transpose` or `{permute: [0, 2, 3, 1]}` -> Step; raises ValueError with the reason."""
    if isinstance(entry, str):
        name, params = entry, None
    elif isinstance(entry, dict) and len(entry) == 1:
        ((name, params),) = entry.items()
    else:
        raise ValueError(f"a transform is a name or a one-key mapping, got {entry!r}")
    if name not in REGISTRY:
        raise ValueError(f"unknown transform {name!r}; known: {', '.join(sorted(REGISTRY))}")
    problem = REGISTRY[name].check(params) if params is not None else None
    if problem:
        raise ValueError(problem)
    return Step(name, params)


def run_steps(steps: list[Step], array: np.ndarray) -> Value:
    value: Value = array
    for step in steps:
        value = step.apply(value)
    return value


def shape_steps(steps: list[Step], shape: Shape) -> Any:
    value: Any = tuple(shape)
    for step in steps:
        value = step.shape(value)
    return value


# Transforms only TTNN layouts use register themselves here (the registry above must exist first).
import vidport.converter.ttnn_transforms  # noqa: E402,F401
