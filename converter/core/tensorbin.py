"""Read and write ttnn ``.tensorbin`` files with numpy alone, byte for byte as ttnn 0.81.1 does.

Why: vidport must write TTNN weight caches on machines where ``ttnn`` cannot be imported (CPython
3.11, macOS), and its TTNN host emulator must round to bfloat16 / bfloat8_b / bfloat4_b exactly as
ttnn's host conversion does.  The reference is ``ttnn.dump_tensor(path, ttnn.from_torch(t, dtype, layout=...))``
(``ttnn.as_tensor(..., cache_file_name=...)`` and ``ttnn.Tensor(array, dtype, layout=...)`` write the
same bytes); ``tests/test_tensorbin.py`` checks the equality against the installed ttnn.

File layout (ttnn 0.81.1), all little-endian:

* ``[0, 8)``: uint64 ``header_size``, chosen so that ``8 + header_size`` is a multiple of 64.
* ``[8, 8 + header_size)``: a FlatBuffer whose root is ``Tensor {tensor_spec, mesh_shape, shards,
  tensor_topology}``, zero-padded to ``header_size``.  The spec holds the *logical* shape, the
  data type, the page config (row-major, or 32x32 tiles) and the alignment ([32, 32] for tiles,
  [1] for row-major); the padded shape is not stored, it follows from shape and alignment.
  A host tensor is one shard (mesh [1, 1], coordinate [0, 0], ``InlineFileStorage{offset 0, size}``)
  with a replicated topology.
* then the shard bytes: row-major data as is; TILE data padded with zeros to 32x32 tiles, tiles in
  row-major order, each tile as four 16x16 faces (top-left, top-right, bottom-left, bottom-right),
  each face row-major.  bfloat8_b tiles are 64 shared-exponent bytes (one per 16-value face row,
  faces in that order) followed by 1024 sign+7-bit-mantissa bytes in the same value order;
  bfloat4_b tiles are the same 64 exponent bytes followed by 512 bytes of sign+3-bit-mantissa
  nibbles, two values a byte, the first in the low nibble.  float32 values are stored bit for bit
  (NaN payloads kept); bfloat16 is rounded to nearest even with every NaN made 0x7FC0; the block
  formats' rounding is described at :func:`_bfp_encode`.

The FlatBuffer is produced by a small port of the C++ ``FlatBufferBuilder`` (back-to-front build,
alignment padding, vtable de-duplication) fed in exactly the order ttnn's ``to_flatbuffer`` uses:
byte equality depends on both, so neither may be "simplified".
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from vidport.converter.core.errors import VidportError

SUPPORTED_TTNN_VERSIONS: tuple[str, ...] = ("0.81.1",)
DTYPES: tuple[str, ...] = ("bfloat16", "float32", "bfloat8_b", "bfloat4_b")
LAYOUTS: tuple[str, ...] = ("TILE", "ROW_MAJOR")

TILE = 32  # tile height and width
FACE = 16  # face height and width; the block formats share one exponent per face row of 16 values
# the block-float formats: mantissa bits per value (hidden bit included; a sign bit besides)
BLOCK_MANTISSA = {"bfloat8_b": 7, "bfloat4_b": 3}
DATA_ALIGNMENT = 64  # the data region starts on this boundary (header_size is padded to it)

# enum values of the 0.81.1 schema (ttnn.flatbuffer.DataType / PageConfig union / TensorBuffer union)
_DTYPE_CODES = {"bfloat16": 0, "float32": 1, "bfloat8_b": 3, "bfloat4_b": 4}
_DTYPE_NAMES = {code: name for name, code in _DTYPE_CODES.items()}
_PAGE_ROW_MAJOR, _PAGE_TILE = 1, 2
_INLINE_FILE_STORAGE = 1
_LEGACY_SENTINEL = 0xFFFF_FFFF_FFFF_FFFF  # first 8 bytes of pre-flatbuffer ttnn tensor files


class TensorbinFormatError(VidportError, ValueError):
    """A file that is not a ttnn 0.81.1 ``.tensorbin`` we can read; names the file."""


# ---------------------------------------------------------------------------------------------
# bfloat16, bfloat8_b and bfloat4_b rounding (ttnn host conversion, bit for bit)
# ---------------------------------------------------------------------------------------------


def _bits(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32, order="C").view(np.uint32)


def _bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as ttnn does: round to nearest even, every NaN -> 0x7FC0."""
    bits = _bits(array).astype(np.uint64).reshape(-1)  # 1-d: numpy 1.x casts 0-d like scalars
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    is_nan = (bits & 0x7FFF_FFFF) > 0x7F80_0000
    return np.where(is_nan, np.uint16(0x7FC0), rounded).reshape(np.shape(array))


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """Values after ttnn's float32 -> bfloat16 host conversion (RNE, canonical NaN), as float32.

    Not plain truncation: ttnn 0.81.1 rounds to nearest, ties to even, and maps NaN to 0x7FC0.
    """
    bits = _bfloat16_bits(array).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(np.shape(array))


def _bfp_encode(groups: np.ndarray, width: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of 16 float32 bit patterns (..., 16) -> (shared exponent (...), sign|mantissa (..., 16)).

    Follows tt-metal's ``convert_u32_to_bfp<Bfp8_b | Bfp4_b>`` as ttnn 0.81.1 behaves: the block
    exponent is the largest raw float32 exponent; each value gets its hidden bit, is shifted right
    by its exponent deficit, rounded to `width` bits (7 for bfloat8_b, 3 for bfloat4_b; hidden bit
    included; nearest, ties to even) and saturated; zeros and denormals become +0 (measured: ttnn
    flushes denormals).  Inf/NaN have exponent 255 and come back as NaN.
    """
    groups = groups.astype(np.uint32)
    exp = (groups >> 23) & 0xFF
    shared = exp.max(axis=-1)
    mantissa = (groups & 0x7F_FFFF) | 0x80_0000
    shift = np.minimum(shared[..., None] - exp, 31)
    mantissa = mantissa >> shift
    dropped = 24 - width  # 24 bits (hidden bit included) -> width
    half = np.uint32(1 << (dropped - 1))
    round_bits = mantissa & np.uint32((1 << dropped) - 1)
    mantissa = mantissa >> dropped
    round_up = (round_bits > half) | ((round_bits == half) & ((mantissa & 1) == 1))
    mantissa = np.minimum(mantissa + round_up, (1 << width) - 1)
    sign = np.where(mantissa == 0, 0, groups >> 31)
    byte = (sign << width) | mantissa
    byte = np.where(exp == 0, 0, byte)  # zeros and denormals are flushed to +0
    return shared.astype(np.uint8), byte.astype(np.uint8)


def _bfp_decode_tables(width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per data value (sign|mantissa of `width` bits): sign|normalized-mantissa bits, and the
    exponent decrement of normalizing."""
    byte = np.arange(1 << (width + 1), dtype=np.uint32)
    mask = (1 << width) - 1
    mantissa = byte & mask
    shift = np.zeros(len(byte), dtype=np.uint32)
    for bit in range(width - 1):  # shift until the leading one reaches bit width - 1
        shift += (mantissa > 0) & (mantissa < (1 << (width - 1 - bit)))
    fixed = ((byte >> width) << 31) | (((mantissa << (shift + 1)) & mask) << (23 - width))
    return fixed, shift


_BFP_TABLES = {width: _bfp_decode_tables(width) for width in BLOCK_MANTISSA.values()}


def _bfp_decode(shared: np.ndarray, data: np.ndarray, width: int = 7) -> np.ndarray:
    """Inverse of :func:`_bfp_encode` as tt-metal's ``convert_bfp_to_u32`` computes it.

    A zero mantissa gives (signed) zero; otherwise the mantissa is normalized and the exponent is
    ``shared - shift``, wrapping like the C++ uint32 arithmetic (only its low 9 bits reach the word).
    """
    fixed, shifts = _BFP_TABLES[width]
    data = data.astype(np.intp)
    exp = (shared.astype(np.uint32)[..., None] - shifts[data]) & 0x1FF
    bits = fixed[data] | (exp << 23)
    bits = np.where((data & ((1 << width) - 1)) == 0, fixed[data], bits)
    return bits.astype(np.uint32).view(np.float32)


def to_bfloat8_b(array: np.ndarray) -> np.ndarray:
    """Values after ttnn's float32 -> bfloat8_b (TILE) -> float32 host round trip, same shape.

    A bfloat8_b block is one face row: 16 consecutive values of the last axis, starting at a
    multiple of 16 (tiles and faces are 32 and 16 wide, and tile padding is zero, which never
    raises a block exponent).  So rows are padded to a multiple of 16 and cut into blocks; the
    result equals ``ttnn.to_torch(ttnn.from_torch(t, ttnn.bfloat8_b, layout=TILE))``.
    """
    return to_block_float(array, "bfloat8_b")


def to_block_float(array: np.ndarray, dtype: str) -> np.ndarray:
    """Values after ttnn's float32 -> `dtype` (bfloat8_b or bfloat4_b, TILE) -> float32 host
    round trip, same shape (the blocks as :func:`to_bfloat8_b` says)."""
    bits = BLOCK_MANTISSA[dtype]
    values = np.asarray(array, dtype=np.float32)
    shape = values.shape
    rows = values.reshape(-1, shape[-1] if values.ndim else 1)
    width = rows.shape[1]
    padded = np.zeros((rows.shape[0], -(-width // FACE) * FACE), dtype=np.float32)
    padded[:, :width] = rows
    groups = _bits(padded).reshape(rows.shape[0], -1, FACE)
    decoded = _bfp_decode(*_bfp_encode(groups, bits), bits).reshape(padded.shape)
    return np.ascontiguousarray(decoded[:, :width]).reshape(shape)


# ---------------------------------------------------------------------------------------------
# tile layout
# ---------------------------------------------------------------------------------------------


def padded_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The shape ttnn stores: TILE rounds the last two axes up to 32.

    The padded shape has at least the rank of the alignment ([32, 32] for TILE, [1] for ROW_MAJOR),
    so missing leading axes become 1: (5,) -> (32, 32) in TILE, () -> (1,) in ROW_MAJOR.
    """
    if layout == "ROW_MAJOR":
        return tuple(shape) or (1,)
    full = (1,) * max(0, 2 - len(shape)) + tuple(shape)
    return full[:-2] + tuple(-(-d // TILE) * TILE for d in full[-2:])


def _tilize(values: np.ndarray) -> np.ndarray:
    """Logical array -> (tiles, 4 faces, 16, 16) in ttnn's storage order, zero padded."""
    full = values.reshape((1,) * max(0, 2 - values.ndim) + values.shape)
    padded = np.zeros(padded_shape(full.shape, "TILE"), dtype=values.dtype)
    padded[tuple(slice(0, d) for d in full.shape)] = full
    h, w = padded.shape[-2:]
    tiles = padded.reshape(-1, h // TILE, 2, FACE, w // TILE, 2, FACE)
    # (batch, tile_row, face_row, row, tile_col, face_col, col) -> tile order, then face order
    return tiles.transpose(0, 1, 4, 2, 5, 3, 6).reshape(-1, 4, FACE, FACE)


def _untilize(tiles: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_tilize`: (tiles, 4, 16, 16) -> logical array of ``shape``."""
    full = (1,) * max(0, 2 - len(shape)) + tuple(shape)
    pshape = padded_shape(full, "TILE")
    h, w = pshape[-2:]
    grid = tiles.reshape(-1, h // TILE, w // TILE, 2, 2, FACE, FACE).transpose(0, 1, 3, 5, 2, 4, 6)
    padded = grid.reshape(pshape)
    return np.ascontiguousarray(padded[tuple(slice(0, d) for d in full)]).reshape(shape)


def _encode_data(values: np.ndarray, dtype: str, layout: str) -> bytes:
    if layout == "ROW_MAJOR":
        if dtype == "float32":
            return values.tobytes()
        return _bfloat16_bits(values).tobytes()
    tiles = _tilize(values)
    if dtype == "float32":
        return tiles.tobytes()
    if dtype == "bfloat16":
        return _bfloat16_bits(tiles).tobytes()
    shared, data = _bfp_encode(_bits(tiles).reshape(len(tiles), 4 * FACE, FACE), BLOCK_MANTISSA[dtype])
    data = data.reshape(len(tiles), -1)
    if dtype == "bfloat4_b":  # two values a byte, the first in the low nibble
        data = data[:, 0::2] | (data[:, 1::2] << 4)
    return np.concatenate([shared, data], axis=1).tobytes()


def _decode_data(raw: bytes, shape: tuple[int, ...], dtype: str, layout: str) -> np.ndarray:
    if dtype in BLOCK_MANTISSA:
        width = BLOCK_MANTISSA[dtype]
        tiles = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 4 * FACE + _block_data_bytes(dtype))
        shared = tiles[:, : 4 * FACE]
        data = tiles[:, 4 * FACE :]
        if dtype == "bfloat4_b":
            data = np.stack([data & 0xF, data >> 4], axis=-1).reshape(len(tiles), -1)
        values = _bfp_decode(shared, data.reshape(-1, 4 * FACE, FACE), width)
    elif dtype == "bfloat16":
        values = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, dtype=np.float32).copy()
    if layout == "ROW_MAJOR":
        return values.reshape(shape)
    return _untilize(values.reshape(-1, 4, FACE, FACE), shape)


def _data_size(shape: tuple[int, ...], dtype: str, layout: str) -> int:
    count = int(np.prod(padded_shape(shape, layout), dtype=np.int64))
    if dtype in BLOCK_MANTISSA:
        return count // (TILE * TILE) * (4 * FACE + _block_data_bytes(dtype))
    return count * (4 if dtype == "float32" else 2)


def _block_data_bytes(dtype: str) -> int:
    """Bytes of one tile's values in a block format (its 64 exponent bytes aside)."""
    return TILE * TILE * (BLOCK_MANTISSA[dtype] + 1) // 8


# ---------------------------------------------------------------------------------------------
# FlatBuffer encoding: a port of the C++ FlatBufferBuilder, only what ttnn's header needs
# ---------------------------------------------------------------------------------------------


class _Builder:
    """Builds back to front like ``flatbuffers::FlatBufferBuilder``; offsets count from the end."""

    def __init__(self) -> None:
        self.buf = bytearray()  # buf[0] is the current head
        self.minalign = 1
        self.vtables: list[int] = []
        self.fields: list[tuple[int, int]] = []  # (vtable slot byte offset, object offset)
        self.max_voffset = 0

    def size(self) -> int:
        return len(self.buf)

    def _prepend(self, data: bytes) -> None:
        self.buf[0:0] = data

    def _align(self, size: int) -> None:
        self.minalign = max(self.minalign, size)
        self._prepend(bytes(-self.size() % size))

    def _prealign(self, length: int, alignment: int) -> None:
        if length == 0:
            return
        self.minalign = max(self.minalign, alignment)
        self._prepend(bytes(-(self.size() + length) % alignment))

    def _push(self, fmt: str, value: int) -> int:
        self._align(struct.calcsize(fmt))
        self._prepend(struct.pack("<" + fmt, value))
        return self.size()

    def _refer_to(self, offset: int) -> int:
        self._align(4)
        return self.size() - offset + 4

    # tables
    def start_table(self) -> int:
        self.fields, self.max_voffset = [], 0
        return self.size()

    def _track(self, slot: int, offset: int) -> None:
        voffset = 4 + 2 * slot
        self.fields.append((voffset, offset))
        self.max_voffset = max(self.max_voffset, voffset)

    def add_scalar(self, slot: int, fmt: str, value: int, default: int = 0) -> None:
        if value != default:  # force_defaults is off in ttnn
            self._track(slot, self._push(fmt, value))

    def add_offset(self, slot: int, offset: int) -> None:
        if offset:
            self._track(slot, self._push("I", self._refer_to(offset)))

    def end_table(self, start: int) -> int:
        loc = self._push("i", 0)
        vt_size = max(self.max_voffset + 2, 4)
        vtable = bytearray(vt_size)
        struct.pack_into("<HH", vtable, 0, vt_size, loc - start)
        for voffset, offset in self.fields:
            struct.pack_into("<H", vtable, voffset, loc - offset)
        self.fields, self.max_voffset = [], 0
        use = None
        for old in self.vtables:  # de-duplicate: point to an identical earlier vtable
            pos = self.size() - old
            if self.buf[pos : pos + vt_size] == vtable:  # the first two bytes are the vtable size
                use = old
                break
        if use is None:
            self._prepend(bytes(vtable))
            use = self.size()
            self.vtables.append(use)
        struct.pack_into("<i", self.buf, self.size() - loc, use - loc)
        return loc

    # vectors and structs
    def vector_u32(self, values: list[int]) -> int:
        self._prealign(4 * len(values), 4)
        self._prepend(struct.pack(f"<{len(values)}I", *values))
        return self._push("I", len(values))

    def vector_offsets(self, offsets: list[int]) -> int:
        self._prealign(4 * len(offsets), 4)
        for offset in reversed(offsets):
            self._push("I", self._refer_to(offset))
        return self._push("I", len(offsets))

    def struct_u64_pair(self, a: int, b: int) -> int:
        self._align(8)
        self._prepend(struct.pack("<QQ", a, b))
        return self.size()

    def finish(self, root: int) -> bytes:
        self._prealign(4, self.minalign)
        self._push("I", self._refer_to(root))
        return bytes(self.buf)

    # helpers for ttnn's one-vector tables (MeshShape, MeshCoordinate)
    def table_with_vector(self, values: list[int]) -> int:
        vec = self.vector_u32(values)
        start = self.start_table()
        self.add_offset(0, vec)
        return self.end_table(start)


def _encode_header(shape: tuple[int, ...], dtype: str, layout: str, data_size: int) -> bytes:
    """The FlatBuffer header, built in the order of ttnn 0.81.1's ``to_flatbuffer(Tensor)``."""
    b = _Builder()
    # TensorSpec: shape vector, then TensorLayout (alignment, page config, memory config)
    shape_vec = b.vector_u32(list(shape))
    alignment = b.vector_u32([TILE, TILE] if layout == "TILE" else [1])
    if layout == "TILE":
        start = b.start_table()  # Tile {tile_shape_h, tile_shape_w, transpose_tile=false}
        b.add_scalar(1, "I", TILE)
        b.add_scalar(0, "I", TILE)
        tile = b.end_table(start)
        start = b.start_table()  # TilePageConfig {tile}
        b.add_offset(0, tile)
        page_config, page_type = b.end_table(start), _PAGE_TILE
    else:
        page_config, page_type = b.end_table(b.start_table()), _PAGE_ROW_MAJOR  # RowMajorPageConfig {}
    memory_config = b.end_table(b.start_table())  # DRAM interleaved: every field at its default
    start = b.start_table()  # TensorLayout {data_type, page_config, memory_config, alignment}
    b.add_offset(4, alignment)
    b.add_offset(3, memory_config)
    b.add_offset(2, page_config)
    b.add_scalar(1, "B", page_type)
    b.add_scalar(0, "B", _DTYPE_CODES[dtype])
    tensor_layout = b.end_table(start)
    start = b.start_table()  # TensorSpec {shape, tensor_layout}
    b.add_offset(1, tensor_layout)
    b.add_offset(0, shape_vec)
    tensor_spec = b.end_table(start)

    # the single host shard: InlineFileStorage{offset 0, size} at mesh coordinate (0, 0)
    coord = b.table_with_vector([0, 0])
    storage = b.struct_u64_pair(0, data_size)
    start = b.start_table()  # TensorShard {buffer_type, buffer, mesh_coordinate}
    b.add_offset(2, coord)
    b.add_offset(1, storage)
    b.add_scalar(0, "B", _INLINE_FILE_STORAGE)
    shards = b.vector_offsets([b.end_table(start)])
    mesh_shape = b.table_with_vector([1, 1])

    # TensorTopology: distribution shape [1], one Replicate placement, coordinates [(0, 0)]
    distribution = b.table_with_vector([1])
    start = b.start_table()  # MeshMapperPlacement {type=Replicate, tensor_dim=-1}
    b.add_scalar(1, "i", -1)
    placements = b.vector_offsets([b.end_table(start)])
    coords = b.vector_offsets([b.table_with_vector([0, 0])])
    start = b.start_table()
    b.add_offset(2, coords)
    b.add_offset(1, placements)
    b.add_offset(0, distribution)
    topology = b.end_table(start)

    start = b.start_table()  # Tensor {tensor_spec, mesh_shape, shards, tensor_topology}
    b.add_offset(3, topology)
    b.add_offset(2, shards)
    b.add_offset(1, mesh_shape)
    b.add_offset(0, tensor_spec)
    return b.finish(b.end_table(start))


def _check(dtype: str, layout: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if dtype in BLOCK_MANTISSA and layout != "TILE":
        raise ValueError(f"{dtype} needs layout 'TILE' (ttnn refuses row-major block floats)")


def encode_tensorbin(array: np.ndarray, dtype: str, layout: str) -> bytes:
    """The bytes :func:`write_tensorbin` writes."""
    _check(dtype, layout)
    values = np.asarray(array, dtype=np.float32, order="C")
    data = _encode_data(values, dtype, layout)
    header = _encode_header(values.shape, dtype, layout, len(data))
    header_size = -(-(8 + len(header)) // DATA_ALIGNMENT) * DATA_ALIGNMENT - 8
    return struct.pack("<Q", header_size) + header + bytes(header_size - len(header)) + data


def write_tensorbin(path: str | Path, array: np.ndarray, dtype: str, layout: str) -> None:
    """Write ``array`` (float32 logical values) as ttnn 0.81.1's ``dump_tensor`` would.

    Same bytes as ``ttnn.dump_tensor(path, ttnn.from_torch(torch.from_numpy(array), dtype=...,
    layout=...))`` for a host tensor; ``dtype`` in {"bfloat16", "float32", "bfloat8_b", "bfloat4_b"},
    ``layout`` in {"TILE", "ROW_MAJOR"} (the block formats need TILE).  Non-float32 input is cast to float32 first.
    """
    Path(path).write_bytes(encode_tensorbin(array, dtype, layout))


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked FlatBuffer access; any inconsistency raises ``ValueError``."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf

    def scalar(self, fmt: str, pos: int) -> int:
        if pos < 0 or pos + struct.calcsize(fmt) > len(self.buf):
            raise ValueError(f"offset {pos} is outside the {len(self.buf)}-byte header")
        return struct.unpack_from("<" + fmt, self.buf, pos)[0]

    def root(self) -> int:
        return self.scalar("I", 0)

    def slots(self, table: int) -> list[int]:
        vtable = table - self.scalar("i", table)
        size = self.scalar("H", vtable)
        if size < 4 or size % 2:
            raise ValueError(f"bad vtable size {size}")
        return [self.scalar("H", vtable + 4 + 2 * i) for i in range((size - 4) // 2)]

    def field(self, table: int, slot: int, fmt: str, default: int = 0) -> int:
        slots = self.slots(table)
        if slot >= len(slots) or slots[slot] == 0:
            return default
        return self.scalar(fmt, table + slots[slot])

    def ref(self, table: int, slot: int, what: str) -> int:
        slots = self.slots(table)
        if slot >= len(slots) or slots[slot] == 0:
            raise ValueError(f"{what} is missing")
        pos = table + slots[slot]
        return pos + self.scalar("I", pos)

    def vector_u32(self, pos: int) -> list[int]:
        n = self.scalar("I", pos)
        if n > 64:
            raise ValueError(f"implausible vector length {n}")
        return [self.scalar("I", pos + 4 + 4 * i) for i in range(n)]

    def vector_refs(self, pos: int) -> list[int]:
        n = self.scalar("I", pos)
        if n > 1024:
            raise ValueError(f"implausible vector length {n}")
        return [pos + 4 + 4 * i + self.scalar("I", pos + 4 + 4 * i) for i in range(n)]


def _parse(raw: bytes) -> dict:
    if len(raw) < 8:
        raise ValueError("shorter than the 8-byte header size")
    (header_size,) = struct.unpack_from("<Q", raw, 0)
    if header_size == _LEGACY_SENTINEL:
        version = raw[8] if len(raw) > 8 else "?"
        raise ValueError(f"legacy (pre-flatbuffer) ttnn tensor file, format version {version}")
    if header_size < 12 or 8 + header_size > len(raw):
        raise ValueError(f"header size {header_size} does not fit a {len(raw)}-byte file")
    r = _Reader(raw[8 : 8 + header_size])
    tensor = r.root()
    if len(r.slots(tensor)) != 4:
        raise ValueError(f"root table has {len(r.slots(tensor))} fields, expected 4 (spec, mesh, shards, topology)")
    spec = r.ref(tensor, 0, "tensor_spec")
    shape = tuple(r.vector_u32(r.ref(spec, 0, "shape")))
    tensor_layout = r.ref(spec, 1, "tensor_layout")
    code = r.field(tensor_layout, 0, "B")
    if code not in _DTYPE_NAMES:
        raise ValueError(f"data type code {code} is not one of {'/'.join(_DTYPE_CODES)}")
    page_type = r.field(tensor_layout, 1, "B")
    if page_type == _PAGE_TILE:
        tile = r.ref(r.ref(tensor_layout, 2, "page_config"), 0, "tile")
        tile_hw = (r.field(tile, 0, "I"), r.field(tile, 1, "I"), r.field(tile, 2, "B"))
        if tile_hw != (TILE, TILE, 0):
            raise ValueError(f"tile {tile_hw[:2]} (transpose={tile_hw[2]}) is not a plain 32x32 tile")
        layout = "TILE"
    elif page_type == _PAGE_ROW_MAJOR:
        layout = "ROW_MAJOR"
    else:
        raise ValueError(f"page config type {page_type} is neither row-major nor tile")
    shards = r.vector_refs(r.ref(tensor, 2, "shards"))
    if len(shards) != 1:
        raise ValueError(f"{len(shards)} shards; only single-device host tensors are supported")
    if r.field(shards[0], 0, "B") != _INLINE_FILE_STORAGE:
        raise ValueError("shard buffer is not InlineFileStorage")
    storage = r.ref(shards[0], 1, "shard buffer")
    offset, size = r.scalar("Q", storage), r.scalar("Q", storage + 8)
    dtype = _DTYPE_NAMES[code]
    expected = _data_size(shape, dtype, layout)
    start = 8 + header_size + offset
    if size != expected or start + size > len(raw):
        raise ValueError(f"shard of {size} bytes at {offset} does not hold {expected} bytes of {shape} {dtype} {layout}")
    return {"shape": shape, "dtype": dtype, "layout": layout, "data": raw[start : start + size]}


def read_tensorbin(path: str | Path) -> tuple[np.ndarray, dict]:
    """Read a ttnn 0.81.1 ``.tensorbin``: (float32 logical values, info).

    ``info`` has ``dtype``, ``layout``, ``logical_shape`` and ``padded_shape``.  Values equal
    ``ttnn.to_torch(ttnn.load_tensor(path))`` as float32.  Any other format version or schema raises
    :class:`TensorbinFormatError` (a ``ValueError``) naming the file and the supported versions.
    """
    raw = Path(path).read_bytes()
    try:
        parsed = _parse(raw)
        values = _decode_data(parsed["data"], parsed["shape"], parsed["dtype"], parsed["layout"])
    except (ValueError, struct.error) as exc:
        versions = ", ".join(SUPPORTED_TTNN_VERSIONS)
        raise TensorbinFormatError(
            f"{path}: not a .tensorbin of a supported format version ({exc}); supported: ttnn {versions}",
            hint=f"this reader knows the ttnn {versions} layout for single-device host tensors "
            "(bfloat16, float32, bfloat8_b or bfloat4_b; TILE or ROW_MAJOR); re-dump the tensor with that ttnn",
        ) from exc
    info = {
        "dtype": parsed["dtype"],
        "layout": parsed["layout"],
        "logical_shape": parsed["shape"],
        "padded_shape": padded_shape(parsed["shape"], parsed["layout"]),
    }
    return values, info
