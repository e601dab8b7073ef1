"""Layers shared by TTNN models, each on the ops interface and named like its torch counterpart."""
from __future__ import annotations

import numpy as np

from vidport.converter.generators import sinusoidal_positions
from vidport.runtime.ttnn.module import Module, Parameters
from vidport.runtime.ttnn.ops import Tensor


class Linear(Module):
    """torch.nn.Linear: weight stored [in, out], bias [1, out] (as the converter wrote them)."""

    def __init__(self, params: Parameters, prefix: str, bias: bool = True) -> None:
        self.ops = params.ops
        self.weight = params.take(f"{prefix}.weight")
        self.bias = params.take(f"{prefix}.bias") if bias else None

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name: the reference passes input=)
        return self.ops.linear(input, self.weight, self.bias)


class LayerNorm(Module):
    def __init__(self, params: Parameters, prefix: str, eps: float = 1e-5) -> None:
        self.ops, self.eps = params.ops, eps
        self.weight, self.bias = params.take(f"{prefix}.weight"), params.take(f"{prefix}.bias")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return self.ops.layer_norm(input, self.weight, self.bias, self.eps)


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
