"""safetensors without torch: a lazy reader and a streaming, sharding writer.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte range
per tensor) and the raw bytes. Reading seeks to one tensor at a time; writing streams tensor
bytes straight into the shard behind a header written in advance when the caller knows the
layout up front (a conversion plan does), else spools them to a side file and prepends the
header when a shard closes; neither side ever holds more than one tensor.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidport.converter.dtypes import SAFETENSORS_CODES, SAFETENSORS_DTYPES
from vidport.converter.core.errors import VidportError
from vidport.converter.mapped import map_range

MAX_HEADER = 100 * 1024 * 1024


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
    """Tensor refs and the string metadata of one safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise VidportError(f"{path}: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER or 8 + length > size:
            raise VidportError(f"{path}: corrupted safetensors header (length {length}, file size {size})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise VidportError(f"{path}: corrupted safetensors header ({err})") from err
    metadata = header.pop("__metadata__", None) or {}
    refs: dict[str, SafetensorsRef] = {}
    for name, entry in header.items():
        code = entry.get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise VidportError(f"{path}: tensor {name} has unsupported dtype {code}")
        begin, end = entry["data_offsets"]
        start = 8 + length + begin
        if 8 + length + end > size:
            raise VidportError(f"{path}: tensor {name} lies past the end of the file (truncated file?)")
        refs[name] = SafetensorsRef(path, start, SAFETENSORS_DTYPES[code], tuple(entry["shape"]))
    return refs, metadata


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
