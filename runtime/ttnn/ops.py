"""The ops interface TTNN model code is written against, with ttnn's semantics.

Tensors are backend objects (numpy arrays in the emulator, ``ttnn.Tensor`` on a device); model
code never looks inside them, only passes them to these ops. Shapes are the logical ones.
Activations live in bfloat16 (TILE); parameters are the converted ``.tensorbin`` files, in the
dtype and layout the target spec gave them (linear weights [in, out], biases and norm
parameters [1, C], group-norm parameters packed for the core grid). Where a model keeps a path in
float32 (tt_dit's timestep embedding and modulation), the op producing it says so with
``dtype="float32"``: as ttnn's ``dtype=`` argument, the output's dtype (None: the activation dtype).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

Tensor = Any


class Ops(Protocol):
    name: str  # "emulator" | "device"

    # moving data
    def to_device(self, array: np.ndarray, dtype: str = "bfloat16") -> Tensor:
        """A host float32 array as an activation (bfloat16 unless told, TILE)."""

    def to_host(self, tensor: Tensor) -> np.ndarray:
        """Back to a float32 numpy array of the logical shape."""

    def parameter(self, path: Path, info: dict[str, Any]) -> Tensor:
        """A converted .tensorbin (``info``: its ttnn_manifest.json entry)."""

    def constant(self, array: np.ndarray, dtype: str = "bfloat16") -> Tensor:
        """A table the model computes on the host (positions, RoPE), as a TILE tensor of `dtype`."""

    def host_parameter(self, values: np.ndarray, dtype: str, layout: str) -> Tensor:
        """A parameter composed on the host from converted files' values (fused, regrouped): the
        values are exactly representable in `dtype`, so this moves them and rounds nothing."""

    def shape(self, tensor: Tensor) -> tuple[int, ...]: ...

    # data movement
    def reshape(self, tensor: Tensor, shape: Sequence[int]) -> Tensor: ...

    def permute(self, tensor: Tensor, order: Sequence[int]) -> Tensor: ...

    def split(self, tensor: Tensor, parts: int, dim: int = -1) -> list[Tensor]:
        """Equal parts along ``dim`` (GEGLU's hidden / gate)."""

    def typecast(self, tensor: Tensor, dtype: str) -> Tensor: ...

    # math (broadcasting as numpy / ttnn do)
    def add(self, a: Tensor, b: Tensor, dtype: str | None = None) -> Tensor: ...

    def mul(self, a: Tensor, b: Tensor, dtype: str | None = None) -> Tensor: ...

    def addcmul(self, a: Tensor, b: Tensor, c: Tensor, dtype: str | None = None) -> Tensor:
        """``a + b * c`` in one op (ttnn.addcmul: tt_dit's gated residuals)."""

    def matmul(self, a: Tensor, b: Tensor, dtype: str | None = None) -> Tensor: ...

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None, dtype: str | None = None) -> Tensor:
        """``x @ weight + bias``: weight [in, out], bias [1, out] (ttnn.linear)."""

    def gelu(self, x: Tensor, approximate: bool = False) -> Tensor:
        """GELU: exact (erf), or with ``approximate`` the tanh form (diffusers' gelu-approximate)."""

    def silu(self, x: Tensor, dtype: str | None = None) -> Tensor: ...

    def softmax(self, x: Tensor, dim: int = -1) -> Tensor: ...

    def layer_norm(self, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                   dtype: str | None = None) -> Tensor:
        """Over the last axis; weight and bias [1, C], or None (no affine)."""

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis; weight [1, C] (ttnn.rms_norm)."""

    def group_norm(self, x: Tensor, weight: Tensor, bias: Tensor, input_mask: Tensor, num_groups: int,
                   eps: float, grid: tuple[int, int]) -> Tensor:
        """ttnn.group_norm on x [N, 1, H*W, C], block-sharded over ``grid`` (x, y) in COL_MAJOR
        order, so the channels split over grid.y cores: weight/bias packed [1, 1, rows, 32] and
        the input mask as ttnn.create_group_norm_weight_bias_rm / _input_mask make them."""

    def scaled_dot_product_attention(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """softmax(q k^T * scale) v on [B, heads, S, head_dim], no mask."""
