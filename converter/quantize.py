"""Quantized MLX outputs: which tensors quantize (the family's `quantize:` declaration, by role and
key pattern, never guessed from shapes), in which of MLX's own formats (`mx.quantize`), and what
they become in the file.

A quantized linear `X.weight` [out, in] is written as MLX's `QuantizedLinear` holds it: `X.weight`
packed into uint32 [out, in * bits / 32], `X.scales` [out, in / group] and, for the affine mode,
`X.biases` [out, in / group]. The packed shapes alone cannot tell bits from group size, so the
manifest records every quantized tensor's mode, bits and group size, and the loader
(runtime/loading.py) builds the layers from the manifest and checks the shapes against it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.converter.dtypes import BFLOAT16

# MLX's formats (mlx.core.quantize): the bits and group sizes each takes, and its defaults
MODES: dict[str, dict[str, Any]] = {
    "affine": {"bits": (2, 3, 4, 5, 6, 8), "group_size": (32, 64, 128), "default_group": 64, "biases": True},
    "mxfp4": {"bits": (4,), "group_size": (32,), "default_group": 32, "biases": False},
    "mxfp8": {"bits": (8,), "group_size": (32,), "default_group": 32, "biases": False},
    "nvfp4": {"bits": (4,), "group_size": (16,), "default_group": 16, "biases": False},
}


QUANTIZE_CHUNK_BYTES = 4 << 20  # float32 bytes of the rows quantized at once


@dataclass(frozen=True)
class QuantFormat:
    """One of MLX's quantized formats."""

    mode: str
    bits: int
    group_size: int

    @classmethod
    def parse(cls, bits: int | None, group_size: int | None = None, mode: str | None = None) -> "QuantFormat":
        """The command line's --quantize BITS --q-group-size G --q-mode M, checked against MLX's table."""
        mode = mode or "affine"
        if mode not in MODES:
            raise VidportError(f"--q-mode {mode}: not one of MLX's modes", hint=f"choose {', '.join(MODES)}")
        table = MODES[mode]
        bits = bits if bits is not None else table["bits"][0] if len(table["bits"]) == 1 else None
        if bits not in table["bits"]:
            raise VidportError(f"--quantize {bits}: {mode} takes {' or '.join(map(str, table['bits']))} bits")
        group_size = group_size or table["default_group"]
        if group_size not in table["group_size"]:
            raise VidportError(f"--q-group-size {group_size}: {mode} takes groups of "
                               f"{' or '.join(map(str, table['group_size']))}")
        return cls(mode, int(bits), int(group_size))

    @property
    def name(self) -> str:
        """How reports and threshold tables name it: affine-q4-g64, mxfp4-g32, ..."""
        return f"affine-q{self.bits}-g{self.group_size}" if self.mode == "affine" else f"{self.mode}-g{self.group_size}"

    def as_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "bits": self.bits, "group_size": self.group_size}

    def packed(self, shape: tuple[int, ...], dtype: np.dtype) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The tensors a float [out, in] weight becomes: suffix -> (dtype, shape). Scales of the float
        formats are uint8 exponents; affine scales and biases keep the weight's float dtype."""
        out, width = shape
        groups = (out, width // self.group_size)
        scale_dtype = np.dtype(dtype) if self.mode == "affine" else np.dtype(np.uint8)
        parts = {"weight": (np.dtype(np.uint32), (out, width * self.bits // 32)), "scales": (scale_dtype, groups)}
        if MODES[self.mode]["biases"]:
            parts["biases"] = (scale_dtype, groups)
        return parts

    def fits(self, shape: tuple[int, ...]) -> str | None:
        """Why a weight of `shape` cannot take this format (None when it can)."""
        if len(shape) != 2:
            return f"a {len(shape)}-D tensor: MLX quantizes 2-D weights"
        if shape[1] % self.group_size:
            return f"input width {shape[1]} is not a multiple of the group size {self.group_size}"
        if shape[1] * self.bits % 32:
            return f"input width {shape[1]} x {self.bits} bits does not pack into 32-bit words"
        return None

    def quantize(self, weight: np.ndarray) -> dict[str, np.ndarray]:
        """mx.quantize of one weight, as numpy arrays by suffix. Groups lie within rows, so the rows
        are quantized a few at a time: the same result, and MLX's working memory (about 16x the
        input for the float formats on the CPU) stays small beside the tensor itself."""
        import mlx.core as mx

        source_dtype = np.dtype(weight.dtype)
        kind = mx.bfloat16 if source_dtype == BFLOAT16 else mx.float16 if source_dtype == np.float16 else mx.float32
        rows = max(1, QUANTIZE_CHUNK_BYTES // max(1, weight.shape[1] * 4))
        chunks: dict[str, list[np.ndarray]] = {}
        for start in range(0, weight.shape[0], rows):
            part = mx.array(weight[start:start + rows].astype(np.float32)).astype(kind)
            arrays = mx.quantize(part, group_size=self.group_size, bits=self.bits, mode=self.mode)
            for name, array in zip(("weight", "scales", "biases"), arrays):
                chunks.setdefault(name, []).append(_to_numpy(array, source_dtype))
        return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _to_numpy(array, float_dtype: np.dtype) -> np.ndarray:
    import mlx.core as mx

    if array.dtype in (mx.uint32, mx.uint8):
        return np.array(array)
    return np.array(array.astype(mx.float32)).astype(float_dtype)


@dataclass
class QuantPlan:
    """What a conversion quantizes: module path -> format, and the declared tensors left in float
    with the reason (their width does not fit the group size, ...)."""

    format: QuantFormat
    modules: dict[str, QuantFormat] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {**self.format.as_json(), "name": self.format.name,
                "tensors": {path: fmt.as_json() for path, fmt in sorted(self.modules.items())},
                "unquantized": dict(sorted(self.kept.items()))}


@dataclass
class BlockPlan:
    """What --quantize BITS does on a target with block-float formats (TTNN): the selected
    tensors' keys, written in `dtype` instead of their role's, and the declared ones kept, why."""

    bits: int
    dtype: str
    tensors: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "dtype": self.dtype, "tensors": sorted(self.tensors),
                "unquantized": dict(sorted(self.kept.items()))}


def read_quantization(manifest: dict[str, Any]) -> dict[str, QuantFormat]:
    """Module path -> format, from a converted folder's manifest (empty when not quantized)."""
    section = manifest.get("quantization") or {}
    found = {}
    for path, entry in (section.get("tensors") or {}).items():
        try:
            found[path] = QuantFormat.parse(entry["bits"], entry["group_size"], entry["mode"])
        except (KeyError, TypeError, VidportError) as err:
            raise VidportError(f"manifest quantization entry {path}: {entry} is not a format MLX has ({err})") from err
    return found
