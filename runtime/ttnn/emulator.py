"""The host emulator of the ops interface: numpy float32 math with ttnn's rounding.

Why: the TTNN model code must run, and be verified against diffusers, on machines without a
Tenstorrent card. What it reproduces: every op's output is rounded to the activation dtype
(bfloat16, round to nearest even, as ttnn's host conversion; bfloat8_b on request), inputs enter
as bfloat16, and parameters are the exact values of the converted files (bfloat8_b blocks
decoded as ttnn decodes them). Inside an op, math is float32 (ttnn with fp32 accumulation).
An op told ``dtype="float32"`` (a float32 path, as tt_dit keeps its timestep embedding and
modulation) rounds nothing. What it does not: tile padding effects, approximate SFPU functions,
math fidelity below HiFi4, track dtypes (model code names a non-activation output dtype).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.converter.ttnn_support import group_norm as packing
from vidport.converter.core.tensorbin import read_tensorbin, to_bfloat8_b, to_bfloat16



def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz & Stegun 7.1.26): far below bfloat16's resolution, and vectorized."""
    sign, a = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


class EmulatorOps:
    name = "emulator"

    def __init__(self, activations: str = "bfloat16") -> None:
        if activations not in ("bfloat16", "bfloat8_b"):
            raise ValueError(f"activations must be bfloat16 or bfloat8_b, not {activations}")
        self.activations = activations

    def _round(self, array: np.ndarray, dtype: str | None = None) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32)
        dtype = dtype or self.activations
        if dtype not in ROUNDING:
            raise ValueError(f"activations are {', '.join(ROUNDING)}, not {dtype}")
        return ROUNDING[dtype](array)

    # moving data
    def to_device(self, array: np.ndarray, dtype: str = "bfloat16") -> np.ndarray:
        return self._round(array, dtype)

    def to_host(self, tensor: np.ndarray) -> np.ndarray:
        return np.array(tensor, dtype=np.float32)

    def parameter(self, path: Path, info: dict[str, Any]) -> np.ndarray:
        values, found = read_tensorbin(path)
        if (found["dtype"], found["layout"], list(found["logical_shape"])) != (info["dtype"], info["layout"], info["shape"]):
            raise VidportError(f"{path}: holds {found}, the manifest says {info['dtype']} {info['layout']} {info['shape']}")
        return values

    def constant(self, array: np.ndarray, dtype: str = "bfloat16") -> np.ndarray:
        return self._round(array, dtype)

    def host_parameter(self, values: np.ndarray, dtype: str, layout: str) -> np.ndarray:
        return np.asarray(values, dtype=np.float32)

    def shape(self, tensor: np.ndarray) -> tuple[int, ...]:
        return tuple(tensor.shape)

    # data movement (exact)
    def reshape(self, tensor: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        return tensor.reshape(tuple(shape))

    def permute(self, tensor: np.ndarray, order: Sequence[int]) -> np.ndarray:
        return np.ascontiguousarray(tensor.transpose(tuple(order)))

    def split(self, tensor: np.ndarray, parts: int, dim: int = -1) -> list[np.ndarray]:
        return [np.ascontiguousarray(p) for p in np.split(tensor, parts, axis=dim)]

    def typecast(self, tensor: np.ndarray, dtype: str) -> np.ndarray:
        return self._round(tensor, dtype)

    # math: float32 inside, rounded output
    def add(self, a: np.ndarray, b: np.ndarray, dtype: str | None = None) -> np.ndarray:
        return self._round(np.add(a, b, dtype=np.float32), dtype)

    def mul(self, a: np.ndarray, b: np.ndarray, dtype: str | None = None) -> np.ndarray:
        return self._round(np.multiply(a, b, dtype=np.float32), dtype)

    def addcmul(self, a: np.ndarray, b: np.ndarray, c: np.ndarray, dtype: str | None = None) -> np.ndarray:
        return self._round(a + np.multiply(b, c, dtype=np.float32), dtype)

    def matmul(self, a: np.ndarray, b: np.ndarray, dtype: str | None = None) -> np.ndarray:
        return self._round(np.matmul(a, b, dtype=np.float32), dtype)

    def linear(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
               dtype: str | None = None) -> np.ndarray:
        out = np.matmul(x, weight, dtype=np.float32)
        return self._round(out + bias if bias is not None else out, dtype)

    def gelu(self, x: np.ndarray, approximate: bool = False) -> np.ndarray:
        x64 = x.astype(np.float64)
        if approximate:
            return self._round(0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3))))
        return self._round(0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0))))

    def silu(self, x: np.ndarray, dtype: str | None = None) -> np.ndarray:
        x64 = x.astype(np.float64)
        return self._round(x64 / (1.0 + np.exp(-x64)), dtype)

    def softmax(self, x: np.ndarray, dim: int = -1) -> np.ndarray:
        return self._round(_softmax(x.astype(np.float32), dim))

    def layer_norm(self, x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float,
                   dtype: str | None = None) -> np.ndarray:
        x = x.astype(np.float32)
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        normed = (x - mean) / np.sqrt(var + np.float32(eps))
        if weight is not None:
            normed = normed * weight.reshape(-1)
        if bias is not None:
            normed = normed + bias.reshape(-1)
        return self._round(normed, dtype)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x = x.astype(np.float32)
        normed = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(eps))
        return self._round(normed * weight.reshape(-1))

    def group_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray, input_mask: np.ndarray,
                   num_groups: int, eps: float, grid: tuple[int, int]) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"group_norm takes [N, 1, H*W, C], got {list(x.shape)}")
        channels, cores = x.shape[-1], grid[1]  # block-sharded, COL_MAJOR: channels over grid.y
        if input_mask.shape[1] != num_groups or weight.shape[-2] != packing.weight_bias_rows(channels, cores):
            raise ValueError(f"group-norm parameters were packed for another grid or group count than "
                             f"{num_groups} groups of {channels} channels over {cores} cores")
        gamma = packing.unpack_weight_bias(weight, channels, cores)
        beta = packing.unpack_weight_bias(bias, channels, cores)
        out = np.empty_like(x, dtype=np.float32)
        for members in packing.group_channels(input_mask, channels, cores):  # as the kernel reads the mask
            part = x[..., members].astype(np.float32)
            mean = part.mean(axis=(1, 2, 3), keepdims=True)
            var = ((part - mean) ** 2).mean(axis=(1, 2, 3), keepdims=True)
            out[..., members] = (part - mean) / np.sqrt(var + np.float32(eps)) * gamma[members] + beta[members]
        return self._round(out)

    def scaled_dot_product_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
        scores = np.matmul(q, np.swapaxes(k, -1, -2), dtype=np.float32) * np.float32(scale)
        return self._round(np.matmul(_softmax(scores, -1), v, dtype=np.float32))


# activation dtype -> the rounding of a value stored in it (float32: none)
ROUNDING = {"bfloat16": to_bfloat16, "bfloat8_b": to_bfloat8_b, "float32": lambda a: a}


def _softmax(x: np.ndarray, dim: int) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=dim, keepdims=True))
    return shifted / shifted.sum(axis=dim, keepdims=True)
