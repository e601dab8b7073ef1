"""The pure-numpy .tensorbin codec against the installed ttnn (skipped where ttnn cannot be imported)."""
from __future__ import annotations

import importlib.metadata
import struct

import numpy as np
import pytest

from vidport.converter.ttnn_support import PINNED_TTNN_VERSION, import_ttnn
from vidport.converter.core.tensorbin import (
    encode_tensorbin,
    read_tensorbin,
    to_bfloat8_b,
    to_bfloat16,
    write_tensorbin,
)

SHAPES = [(), (1,), (5,), (32,), (33, 7), (64, 32), (2, 45, 70), (2, 32, 96), (2, 3, 17, 40), (1, 2, 64, 33)]
COMBOS = [
    ("bfloat16", "TILE"),
    ("bfloat16", "ROW_MAJOR"),
    ("float32", "TILE"),
    ("float32", "ROW_MAJOR"),
    ("bfloat8_b", "TILE"),  # ttnn refuses bfloat8_b in ROW_MAJOR
]


def _values(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Normal values scaled over 2^-40 .. 2^40, so bfloat8_b blocks mix very different exponents."""
    rng = np.random.default_rng(seed)
    scale = np.exp2(rng.integers(-40, 40, size=shape))
    return np.asarray(rng.standard_normal(shape) * scale, dtype=np.float32)


def _special() -> np.ndarray:
    """Zeros, signed zeros, denormals, extremes, inf, NaN and rounding ties, two tiles wide."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, size=(40, 64), dtype=np.uint64).astype(np.uint32)  # every exponent
    bits[0, :16] = [0, 0x80000000, 1, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
                    0xFF800000, 0x7FC00001, 0x3F808000, 0x3F818000, 0x3F810000, 0x3F80FFFF, 0xBF808001, 0]
    bits[1] = (bits[1] & 0x807F_0000) | 0x3F00_8000  # bfloat16 ties at one exponent
    bits[2, :16] = 0x0040_0000  # a block of denormals only
    return bits.view(np.float32)


@pytest.fixture(scope="module")
def ttnn():
    module = import_ttnn()
    if module is None:
        pytest.skip("import_ttnn() returned None: ttnn cannot be imported here (e.g. no wheel for this Python or OS)")
    version = importlib.metadata.version("ttnn")
    if version != PINNED_TTNN_VERSION:
        pytest.skip(f"ttnn {version} installed; the .tensorbin codec is pinned to {PINNED_TTNN_VERSION}")
    return module


def _host_tensor(ttnn, values: np.ndarray, dtype: str, layout: str):
    import torch

    return ttnn.from_torch(
        torch.from_numpy(values.copy()),
        dtype=getattr(ttnn, dtype),
        layout=ttnn.TILE_LAYOUT if layout == "TILE" else ttnn.ROW_MAJOR_LAYOUT,
    )


def _bits(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("dtype,layout", COMBOS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_write_matches_ttnn_dump(ttnn, tmp_path, shape, dtype, layout):
    values = _values(shape, seed=len(shape))
    ttnn.dump_tensor(tmp_path / "ttnn.tensorbin", _host_tensor(ttnn, values, dtype, layout))
    write_tensorbin(tmp_path / "ours.tensorbin", values, dtype, layout)
    assert (tmp_path / "ours.tensorbin").read_bytes() == (tmp_path / "ttnn.tensorbin").read_bytes()


@pytest.mark.parametrize("dtype,layout", COMBOS)
def test_write_matches_ttnn_dump_special_values(ttnn, tmp_path, dtype, layout):
    values = _special()
    ttnn.dump_tensor(tmp_path / "ttnn.tensorbin", _host_tensor(ttnn, values, dtype, layout))
    assert encode_tensorbin(values, dtype, layout) == (tmp_path / "ttnn.tensorbin").read_bytes()


def test_write_matches_as_tensor_cache_and_numpy_constructor(ttnn, tmp_path):
    """from_torch + dump_tensor, as_tensor's cache file and ttnn.Tensor(numpy) agree: one format."""
    import torch

    values = _values((3, 50, 40), seed=3)
    ttnn.as_tensor(torch.from_numpy(values), dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT,
                   cache_file_name=str(tmp_path / "w"))
    cached = tmp_path / "w_dtype_BFLOAT8_B_layout_TILE.tensorbin"
    assert encode_tensorbin(values, "bfloat8_b", "TILE") == cached.read_bytes()
    ttnn.dump_tensor(tmp_path / "np.tensorbin", ttnn.Tensor(values, ttnn.bfloat16, layout=ttnn.TILE_LAYOUT))
    assert encode_tensorbin(values, "bfloat16", "TILE") == (tmp_path / "np.tensorbin").read_bytes()


@pytest.mark.parametrize("dtype,layout", COMBOS)
@pytest.mark.parametrize("shape", [(), (5,), (33, 7), (2, 3, 17, 40), (64, 32)], ids=str)
def test_read_matches_ttnn_load(ttnn, tmp_path, shape, dtype, layout):
    path = tmp_path / "t.tensorbin"
    tensor = _host_tensor(ttnn, _values(shape, seed=11), dtype, layout)
    ttnn.dump_tensor(path, tensor)
    values, info = read_tensorbin(path)
    expected = ttnn.to_torch(ttnn.load_tensor(path)).float().numpy()
    assert values.dtype == np.float32 and values.shape == expected.shape
    assert np.array_equal(_bits(values), _bits(expected))
    assert info == {
        "dtype": dtype,
        "layout": layout,
        "logical_shape": tuple(tensor.shape),
        "padded_shape": tuple(tensor.padded_shape),
    }


def test_read_special_values(ttnn, tmp_path):
    path = tmp_path / "t.tensorbin"
    ttnn.dump_tensor(path, _host_tensor(ttnn, _special(), "bfloat8_b", "TILE"))
    values, _ = read_tensorbin(path)
    assert np.array_equal(_bits(values), _bits(ttnn.to_torch(ttnn.load_tensor(path)).numpy()))


@pytest.mark.parametrize("make", [_special, lambda: _values((3, 45, 70), seed=5), lambda: _values((21,), 6)],
                         ids=["special", "3x45x70", "21"])
def test_rounding_matches_ttnn_round_trip(ttnn, make):
    values = make()
    bf8 = ttnn.to_torch(_host_tensor(ttnn, values, "bfloat8_b", "TILE")).float().numpy()
    assert np.array_equal(_bits(to_bfloat8_b(values)), _bits(bf8))
    for layout in ("TILE", "ROW_MAJOR"):
        bf16 = ttnn.to_torch(_host_tensor(ttnn, values, "bfloat16", layout)).float().numpy()
        assert np.array_equal(_bits(to_bfloat16(values)), _bits(bf16))


def test_bfloat16_rounds_to_nearest_even_not_truncation():
    ties = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7FC00001], dtype=np.uint32).view(np.float32)
    assert [hex(b >> 16) for b in _bits(to_bfloat16(ties))] == ["0x3f80", "0x3f82", "0x3f81", "0x7fc0"]


def test_round_trip_without_ttnn(tmp_path):
    for dtype, layout in COMBOS:
        values = _values((2, 33, 47), seed=9)
        write_tensorbin(tmp_path / "t.tensorbin", values, dtype, layout)
        back, info = read_tensorbin(tmp_path / "t.tensorbin")
        rounded = {"float32": values, "bfloat16": to_bfloat16(values), "bfloat8_b": to_bfloat8_b(values)}[dtype]
        assert np.array_equal(_bits(back), _bits(rounded))
        assert info["padded_shape"] == ((2, 64, 64) if layout == "TILE" else (2, 33, 47))


def test_bfloat8_b_needs_tile(tmp_path):
    with pytest.raises(ValueError, match="TILE"):
        write_tensorbin(tmp_path / "t.tensorbin", np.zeros((4, 4), np.float32), "bfloat8_b", "ROW_MAJOR")


def _corruptions(good: bytes) -> dict[str, bytes]:
    header_size = struct.unpack_from("<Q", good)[0]
    root = 8 + struct.unpack_from("<I", good, 8)[0]
    vtable = root - struct.unpack_from("<i", good, root)[0]
    older_schema = bytearray(good)
    struct.pack_into("<H", older_schema, vtable, 8)  # root table with 2 fields, like older ttnn
    return {
        "legacy": struct.pack("<QB", 0xFFFF_FFFF_FFFF_FFFF, 5) + good[9:],
        "older-schema": bytes(older_schema),
        "garbage": bytes(range(256)) * 4,
        "truncated": good[: 8 + header_size // 2],
        "short": b"\x01\x02",
        "zeroed-header": good[:8] + bytes(header_size) + good[8 + header_size :],
    }


@pytest.mark.parametrize("case", ["legacy", "older-schema", "garbage", "truncated", "short", "zeroed-header"])
def test_unknown_header_is_refused_clearly(tmp_path, case):
    good = encode_tensorbin(_values((33, 7)), "bfloat16", "TILE")
    path = tmp_path / f"{case}.tensorbin"
    path.write_bytes(_corruptions(good)[case])
    with pytest.raises(ValueError) as excinfo:
        read_tensorbin(path)
    message = str(excinfo.value)
    assert str(path) in message and PINNED_TTNN_VERSION in message
