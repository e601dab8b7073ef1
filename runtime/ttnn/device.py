"""The device backend of the ops interface: real ttnn calls on a Tenstorrent card.

Not run by the tests (no card here; under the mock cluster ``ttnn.open_device`` fails); it is
what `vidport verify DIR --device` uses on a machine with one. Parameters are loaded with
``ttnn.load_tensor(path, device=...)`` straight from the converted files, so what runs is what
the converter wrote. Group norm runs block-sharded over the converted grid (COL_MAJOR shards:
channels over grid.y cores), the layout the converter packed gamma, beta and the mask for.
Open it before anything else imports ttnn in the process: ``import_ttnn()`` would otherwise have
pointed ttnn at the mock cluster. Hardware limits the emulator does not model (e.g. channels per
core a multiple of 32 for sharded group norm, L1 sizes) surface here first.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vidport.converter.core.errors import VidportError


class DeviceOps:
    name = "device"

    def __init__(self, device_id: int = 0, l1_small_size: int = 32768) -> None:
        import os

        from vidport.converter.ttnn_support import import_ttnn

        os.environ.setdefault("TT_METAL_MOCK_CLUSTER_DESC_PATH", "")  # empty: use the real card
        ttnn = import_ttnn()
        if ttnn is None:
            raise VidportError("--device needs the ttnn package", hint="install ttnn (CPython 3.10 / 3.12, Linux)")
        self.ttnn = ttnn
        self.device = ttnn.open_device(device_id=device_id, l1_small_size=l1_small_size)
        self._kernel = ttnn.init_device_compute_kernel_config(
            self.device.arch(), math_fidelity=ttnn.MathFidelity.HiFi4, math_approx_mode=False,
            fp32_dest_acc_en=True, packer_l1_acc=False)

    def close(self) -> None:
        self.ttnn.close_device(self.device)

    def _dtype(self, dtype: str | None) -> Any:
        return None if dtype is None else getattr(self.ttnn, dtype)

    # moving data
    def to_device(self, array: np.ndarray, dtype: str = "bfloat16") -> Any:
        return self.host_parameter(array, dtype, "TILE")

    def to_host(self, tensor: Any) -> np.ndarray:
        return self.ttnn.to_torch(tensor).float().numpy()

    def parameter(self, path: Path, info: dict[str, Any]) -> Any:
        return self.ttnn.load_tensor(str(path), device=self.device)

    def constant(self, array: np.ndarray, dtype: str = "bfloat16") -> Any:
        return self.to_device(array, dtype)

    def host_parameter(self, values: np.ndarray, dtype: str, layout: str) -> Any:
        import torch

        return self.ttnn.from_torch(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)),
                                    dtype=self._dtype(dtype), layout=getattr(self.ttnn, f"{layout}_LAYOUT"),
                                    device=self.device)

    def shape(self, tensor: Any) -> tuple[int, ...]:
        return tuple(tensor.shape)

    # data movement
    def reshape(self, tensor: Any, shape: Sequence[int]) -> Any:
        return self.ttnn.reshape(tensor, tuple(shape))

    def permute(self, tensor: Any, order: Sequence[int]) -> Any:
        return self.ttnn.permute(tensor, tuple(order))

    def split(self, tensor: Any, parts: int, dim: int = -1) -> list[Any]:
        return list(self.ttnn.chunk(tensor, parts, dim))

    def typecast(self, tensor: Any, dtype: str) -> Any:
        return self.ttnn.typecast(tensor, dtype=self._dtype(dtype))

    # math
    def add(self, a: Any, b: Any, dtype: str | None = None) -> Any:
        return self.ttnn.add(a, b, dtype=self._dtype(dtype))

    def mul(self, a: Any, b: Any, dtype: str | None = None) -> Any:
        return self.ttnn.mul(a, b, dtype=self._dtype(dtype))

    def addcmul(self, a: Any, b: Any, c: Any, dtype: str | None = None) -> Any:
        out = self.ttnn.addcmul(a, b, c)
        return out if dtype is None else self.typecast(out, dtype)

    def matmul(self, a: Any, b: Any, dtype: str | None = None) -> Any:
        return self.ttnn.matmul(a, b, dtype=self._dtype(dtype), compute_kernel_config=self._kernel)

    def linear(self, x: Any, weight: Any, bias: Any | None = None, dtype: str | None = None) -> Any:
        return self.ttnn.linear(x, weight, bias=bias, dtype=self._dtype(dtype), compute_kernel_config=self._kernel)

    def gelu(self, x: Any, approximate: bool = False) -> Any:
        ttnn = self.ttnn
        if not approximate:
            return ttnn.gelu(x, fast_and_approximate_mode=False)
        # the tanh form, composed (ttnn.gelu's fast mode approximates erf, not this)
        inner = ttnn.multiply(ttnn.add(x, ttnn.multiply(ttnn.pow(x, 3), 0.044715)), math.sqrt(2.0 / math.pi))
        return ttnn.multiply(ttnn.multiply(x, 0.5), ttnn.add(ttnn.tanh(inner, fast_and_approximate_mode=False), 1.0))

    def silu(self, x: Any, dtype: str | None = None) -> Any:
        out = self.ttnn.silu(x)
        return out if dtype is None else self.typecast(out, dtype)

    def softmax(self, x: Any, dim: int = -1) -> Any:
        return self.ttnn.softmax(x, dim=dim)

    def layer_norm(self, x: Any, weight: Any | None, bias: Any | None, eps: float, dtype: str | None = None) -> Any:
        out = self.ttnn.layer_norm(x, weight=weight, bias=bias, epsilon=eps, compute_kernel_config=self._kernel)
        return out if dtype is None else self.typecast(out, dtype)

    def rms_norm(self, x: Any, weight: Any, eps: float) -> Any:
        return self.ttnn.rms_norm(x, weight=weight, epsilon=eps, compute_kernel_config=self._kernel)

    def group_norm(self, x: Any, weight: Any, bias: Any, input_mask: Any, num_groups: int, eps: float,
                   grid: tuple[int, int]) -> Any:
        ttnn = self.ttnn
        core_grid = ttnn.CoreGrid(x=grid[0], y=grid[1])
        sharded = ttnn.create_sharded_memory_config(tuple(x.shape), core_grid, ttnn.ShardStrategy.BLOCK,
                                                    ttnn.ShardOrientation.COL_MAJOR)
        x = ttnn.to_memory_config(ttnn.to_layout(x, ttnn.ROW_MAJOR_LAYOUT), sharded)
        out = ttnn.group_norm(x, num_groups=num_groups, epsilon=eps, input_mask=input_mask, weight=weight,
                              bias=bias, memory_config=sharded, core_grid=core_grid, inplace=False)
        return ttnn.to_layout(ttnn.to_memory_config(out, ttnn.DRAM_MEMORY_CONFIG), ttnn.TILE_LAYOUT)

    def scaled_dot_product_attention(self, q: Any, k: Any, v: Any, scale: float) -> Any:
        return self.ttnn.transformer.scaled_dot_product_attention(q, k, v, is_causal=False, scale=scale,
                                                                  compute_kernel_config=self._kernel)
