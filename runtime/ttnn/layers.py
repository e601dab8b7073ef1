"""Layers shared by TTNN models, each on the ops interface and named like its torch counterpart."""
from __future__ import annotations

import numpy as np

from vidport.converter.generators import sinusoidal_positions
from vidport.runtime.ttnn.module import Module, Parameters
from vidport.runtime.ttnn.ops import Tensor


class Linear(Module):
    """torch.nn.Linear: weight stored [in, out], bias [1, out] (as the converter wrote them).
    `dtype`: its output's, where a model keeps the path in float32 (then its input is float32 too)."""

    def __init__(self, params: Parameters, prefix: str, bias: bool = True, dtype: str | None = None) -> None:
        self.ops, self.dtype = params.ops, dtype
        self.weight = params.take(f"{prefix}.weight")
        self.bias = params.take(f"{prefix}.bias") if bias else None
        self.float32_inputs = ("input",) if dtype == "float32" else ()

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name: the reference passes input=)
        return self.ops.linear(input, self.weight, self.bias, dtype=self.dtype)


class LayerNorm(Module):
    """torch.nn.LayerNorm over the last axis; `prefix` None: no affine parameters
    (elementwise_affine=False). `dtype`: its output's (tt_dit's norm_out writes float32)."""

    def __init__(self, params: Parameters, prefix: str | None, eps: float = 1e-5, dtype: str | None = None) -> None:
        self.ops, self.eps, self.dtype = params.ops, eps, dtype
        self.weight = params.take(f"{prefix}.weight") if prefix else None
        self.bias = params.take(f"{prefix}.bias") if prefix else None

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return self.ops.layer_norm(input, self.weight, self.bias, self.eps, dtype=self.dtype)


class RMSNorm(Module):
    """torch.nn.RMSNorm over the last axis (Wan's q/k norms: across all heads), weight [1, C]."""

    def __init__(self, params: Parameters, prefix: str, eps: float) -> None:
        self.ops, self.eps = params.ops, eps
        self.weight = params.take(f"{prefix}.weight")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return self.ops.rms_norm(input, self.weight, self.eps)


class SiLU(Module):
    def __init__(self, params: Parameters, dtype: str | None = None) -> None:
        self.ops, self.dtype = params.ops, dtype
        self.float32_inputs = ("input",) if dtype == "float32" else ()

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return self.ops.silu(input, dtype=self.dtype)


class GELU(Module):
    """torch.nn.GELU (approximate "none" or "tanh")."""

    def __init__(self, params: Parameters, approximate: bool = False) -> None:
        self.ops, self.approximate = params.ops, approximate

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return self.ops.gelu(input, approximate=self.approximate)


class GroupNorm(Module):
    """torch.nn.GroupNorm on (N, C, *spatial): works channels-last inside, [N, 1, prod(spatial), C],
    as ttnn.group_norm wants, with the converted packed gamma/beta and input mask."""

    def __init__(self, params: Parameters, prefix: str, groups: int, eps: float = 1e-5) -> None:
        self.ops, self.groups, self.eps, self.grid = params.ops, groups, eps, params.grid
        self.weight, self.bias = params.take(f"{prefix}.weight"), params.take(f"{prefix}.bias")
        self.input_mask = params.take(f"{prefix}.input_mask")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        ops = self.ops
        shape = ops.shape(input)
        rank = len(shape)
        x = ops.permute(input, (0, *range(2, rank), 1))  # channels last
        x = ops.reshape(x, (shape[0], 1, int(np.prod(shape[2:])), shape[1]))
        x = ops.group_norm(x, self.weight, self.bias, self.input_mask, self.groups, self.eps, self.grid)
        x = ops.reshape(x, (shape[0], *shape[2:], shape[1]))
        return ops.permute(x, (0, rank - 1, *range(1, rank - 1)))


class Dropout(Module):
    """Inference: the identity. Kept so list indices match the reference (`to_out.0`, `ff.net.2`)."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return input


class SinusoidalPositionalEmbedding(Module):
    """Adds the fixed sin/cos table over the sequence axis; computed here, not converted."""

    def __init__(self, params: Parameters, dim: int, max_seq_length: int) -> None:
        self.ops, self.max_seq_length = params.ops, max_seq_length
        self.table = sinusoidal_positions((1, max_seq_length, dim))
        self._constants: dict[int, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        length = self.ops.shape(x)[1]
        if length > self.max_seq_length:
            raise ValueError(f"{length} frames exceed the motion module's {self.max_seq_length} positions")
        if length not in self._constants:
            self._constants[length] = self.ops.constant(self.table[:, :length])
        return self.ops.add(x, self._constants[length])
