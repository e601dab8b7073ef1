"""Transforms only TTNN layouts need, registered for specs to name: ttnn's group-norm packing
(whose result depends on the core grid, so its parameters are usually placeholders such as
`{grid.y}` that a conversion resolves) and the collapse of leading axes of a patch convolution."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.converter.transforms import Shape, register
from vidport.converter.ttnn_support import group_norm


def is_placeholder(value: Any) -> bool:
    """`"{name}"`: a value a conversion fills in (a target option, a role argument, a config value)."""
    return isinstance(value, str) and value.startswith("{") and value.endswith("}")


def _ints(*names: str):
    def check(params: Any) -> str | None:
        if not isinstance(params, dict) or set(params) != set(names):
            return f"takes {{{', '.join(f'{n}: N' for n in names)}}}"
        bad = [n for n in names if not (is_placeholder(params[n]) or (isinstance(params[n], int) and params[n] > 0))]
        return f"{', '.join(bad)} must be a positive integer or a placeholder like '{{grid.y}}'" if bad else None

    return check


def _pack_shape(shape: Shape, cores: int) -> Shape:
    if len(shape) != 1:
        raise ValueError(f"group-norm packing takes a [C] tensor, got shape {list(shape)}")
    return (1, 1, group_norm.weight_bias_rows(shape[0], cores), group_norm.TILE)


def _mask_shape(shape: Shape, groups: int, cores: int) -> Shape:
    if len(shape) != 1:
        raise ValueError(f"a group-norm input mask is made from a [C] tensor, got shape {list(shape)}")
    return group_norm.input_mask_shape(shape[0], groups, cores)


def _collapse_shape(shape: Shape) -> Shape:
    if len(shape) < 2:
        raise ValueError(f"collapse_leading needs at least 2 axes, got shape {list(shape)}")
    return (int(np.prod(shape[:-1], dtype=np.int64)), shape[-1])


# gamma / beta [C] -> [1, 1, rows, 32] as ttnn.create_group_norm_weight_bias_rm(t, C, cores)
register("group_norm_weight_bias_rm", lambda a, cores: group_norm.pack_weight_bias(a, cores),
         _pack_shape, _ints("cores"))
# the [C] gamma -> ttnn.create_group_norm_input_mask(C, groups, cores) (its values are not used)
register("group_norm_input_mask", lambda a, groups, cores: group_norm.input_mask(a.shape[0], groups, cores),
         _mask_shape, _ints("groups", "cores"))
# [..., O] -> [prod(...), O]: a permuted patch Conv3d weight used as a linear (Wan's patch embedding)
register("collapse_leading", lambda a: np.ascontiguousarray(a).reshape(_collapse_shape(a.shape)), _collapse_shape)
