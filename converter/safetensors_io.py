"""safetensors without torch: a lazy reader and a streaming, sharding writer.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte range
per tensor) and the raw bytes. Reading seeks to one tensor at a time; writing streams tensor
bytes straight into the shard behind a header written in advance when the caller knows the
layout up front (a conversion plan does), else spools them to a side file and prepends the
header when a shard closes; neither side ever holds more than one tensor.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vidport.converter.dtypes import SAFETENSORS_CODES, SAFETENSORS_DTYPES
from vidport.converter.core.errors import VidportError
from vidport.converter.core.jsonfile import parse_json
from vidport.converter.mapped import map_range

MAX_HEADER = 100_000_000  # the official parser's limit


@dataclass(frozen=True)
class SafetensorsRef:
    """A tensor in a safetensors file, not yet read."""

    path: Path
    start: int  # absolute byte offset in the file
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        """The tensor, a read-only view of the file's bytes (converter.mapped)."""
        data = map_range(self.path, self.start, self.nbytes)
        return np.frombuffer(data, dtype=self.dtype, count=int(np.prod(self.shape, dtype=np.int64))).reshape(self.shape)


def looks_like_safetensors(path: Path) -> bool:
    """Content sniffing: a sane header length followed by a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 2 <= length <= MAX_HEADER and head[8:9] == b"{"


def read_safetensors(path: Path) -> tuple[dict[str, SafetensorsRef], dict[str, str]]:
    """Tensor refs and the string metadata of one safetensors file.

    The header is checked as the official parser checks it, before any tensor is read: every
    entry's dtype known, shape a list of non-negative integers, `data_offsets` two integers whose
    range holds exactly numel x itemsize bytes, the ranges in order without gaps or overlaps and
    covering the data to the end of the file. A key given twice is refused (the official parser
    keeps the last).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise VidportError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or 8 + length > size:
            raise VidportError(f"{path}: corrupted safetensors header (length {length}, file size {size})")
        header = parse_json(handle.read(length), f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise VidportError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise VidportError(f"{path}: __metadata__ must map names to strings")
    entries = [(name, *_entry(path, name, entry)) for name, entry in header.items()]
    data_size = size - 8 - length
    end = 0
    for name, dtype, shape, begin, stop in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves bytes {end}..{begin} unused"
            raise VidportError(f"{path}: tensor {name}: data_offsets [{begin}, {stop}] {what}",
                               hint="safetensors stores tensors back to back; the header is damaged or crafted")
        end = stop
    if end != data_size:
        raise VidportError(f"{path}: the header's tensors cover {end:,} bytes of a {data_size:,}-byte data section "
                           + ("(truncated file?)" if end > data_size else "(damaged file?)"))
    refs = {name: SafetensorsRef(path, 8 + length + begin, dtype, shape)
            for name, dtype, shape, begin, _ in entries}
    return refs, metadata


def _entry(path: Path, name: str, entry: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, each checked."""
    if not isinstance(entry, dict):
        raise VidportError(f"{path}: tensor {name}: header entry is a JSON {type(entry).__name__}, not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise VidportError(f"{path}: tensor {name} has unsupported dtype {str(code)[:40]}",
                           hint=f"known: {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise VidportError(f"{path}: tensor {name}: shape {str(shape)[:80]} is not a list of non-negative integers")
    if math.prod(n for n in shape if n) >= 2**63:
        raise VidportError(f"{path}: tensor {name}: shape {str(shape)[:80]} is too large for any array")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(n) is int and n >= 0 for n in offsets) or offsets[1] < offsets[0]):
        raise VidportError(f"{path}: tensor {name}: data_offsets {str(offsets)[:80]} are not two ordered "
                           "non-negative integers")
    dtype = SAFETENSORS_DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise VidportError(f"{path}: tensor {name}: {code} {shape} needs {nbytes:,} bytes, but data_offsets "
                           f"{offsets} hold {offsets[1] - offsets[0]:,}")
    return dtype, tuple(shape), offsets[0], offsets[1]


class SafetensorsWriter:
    """Writes tensors one at a time into shards of at most `shard_bytes`, then an index if sharded.

    Shards are named like transformers/diffusers do (`{stem}-00001-of-00003.safetensors`) so their
    loaders find them.

    `layout`, when given, forecasts every `(name, dtype, shape)` in the order `add` will receive
    them. Each shard's header is then written first and tensor bytes go straight behind it, so the
    data is written once instead of spooled and copied. The forecast is only a hint: a shard whose
    real entries differ from it is rewritten with the real header when it closes, so the files are
    byte for byte what the spooling path writes.
    """

    def __init__(self, folder: Path, stem: str, shard_bytes: int, metadata: dict[str, str] | None = None,
                 layout: Iterable[tuple[str, np.dtype, tuple[int, ...]]] | None = None):
        self.folder = folder
        self.stem = stem
        self.shard_bytes = shard_bytes
        self.metadata = metadata or {}
        self.shards: list[tuple[Path, dict[str, dict]]] = []
        self._spool: Path | None = None
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._handle = None
        self._planned = self._plan_shards(layout) if layout is not None else []
        self._direct: bytes | None = None  # the header written in front of the open shard (direct mode)

    def _plan_shards(self, layout: Iterable[tuple[str, np.dtype, tuple[int, ...]]]) -> list[dict[str, dict]]:
        """The entries of each shard `add` would produce for this layout (same splitting rule)."""
        shards: list[dict[str, dict]] = []
        entries: dict[str, dict] = {}
        offset = 0
        for name, dtype, shape in layout:
            dtype = np.dtype(dtype)
            if dtype not in SAFETENSORS_CODES:
                return []  # add() will refuse it; nothing to plan
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if offset and offset + nbytes > self.shard_bytes:
                shards.append(entries)
                entries, offset = {}, 0
            entries[name] = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape),
                             "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        if entries:
            shards.append(entries)
        return shards

    def _header(self, entries: dict[str, dict]) -> bytes:
        header = dict(entries)
        if self.metadata:
            header["__metadata__"] = self.metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
        return struct.pack("<Q", len(encoded)) + encoded

    def _open_shard(self) -> None:
        number = len(self.shards)
        if number < len(self._planned):
            self._direct = self._header(self._planned[number])
            self._handle = open(self.folder / f".shard-{number}", "wb")
            self._handle.write(self._direct)
        else:
            self._spool = self.folder / f".spool-{number}"
            self._handle = open(self._spool, "wb")

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array, order="C")  # keeps 0-d tensors 0-d
        if array.dtype not in SAFETENSORS_CODES:
            raise VidportError(f"{name}: dtype {array.dtype} cannot be written to safetensors")
        if self._handle is not None and self._offset and self._offset + array.nbytes > self.shard_bytes:
            self._close_shard()
        if self._handle is None:
            self._open_shard()
        self._entries[name] = {
            "dtype": SAFETENSORS_CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [self._offset, self._offset + array.nbytes],
        }
        self._handle.write(array.reshape(-1).view(np.uint8).data)  # the bytes, without a copy
        self._offset += array.nbytes

    def _close_shard(self) -> None:
        assert self._handle is not None
        self._handle.close()
        header = self._header(self._entries)
        target = self.folder / f".shard-{len(self.shards)}"
        if self._direct is not None:
            if header != self._direct:  # the forecast was wrong: put the real header in front
                self._rewrite_header(target, len(self._direct), header)
        else:
            assert self._spool is not None
            with open(target, "wb") as out, open(self._spool, "rb") as spool:
                out.write(header)
                shutil.copyfileobj(spool, out, 16 * 1024 * 1024)
            self._spool.unlink()
        self.shards.append((target, self._entries))
        self._handle, self._spool, self._direct, self._entries, self._offset = None, None, None, {}, 0

    def _rewrite_header(self, target: Path, data_start: int, header: bytes) -> None:
        fixed = target.with_name(target.name + ".fix")
        with open(fixed, "wb") as out, open(target, "rb") as old:
            out.write(header)
            old.seek(data_start)
            shutil.copyfileobj(old, out, 16 * 1024 * 1024)
        os.replace(fixed, target)

    def close(self) -> list[Path]:
        """Name the shards, write the index when there is more than one; return the files."""
        if self._handle is not None or not self.shards:
            if self._handle is None:
                self._handle = open(self.folder / ".spool-empty", "wb")
                self._spool = self.folder / ".spool-empty"
            self._close_shard()
        count = len(self.shards)
        if count == 1:
            final = self.folder / f"{self.stem}.safetensors"
            self.shards[0][0].rename(final)
            return [final]
        files, weight_map, total = [], {}, 0
        for number, (temp, entries) in enumerate(self.shards, start=1):
            final = self.folder / f"{self.stem}-{number:05d}-of-{count:05d}.safetensors"
            temp.rename(final)
            files.append(final)
            for name, entry in entries.items():
                weight_map[name] = final.name
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
        index = self.folder / f"{self.stem}.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return files + [index]
