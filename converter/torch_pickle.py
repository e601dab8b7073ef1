"""Read PyTorch checkpoints (zip and legacy formats) without torch and without running the pickle.

A torch checkpoint is a pickle that names functions to call while loading it. We never call
them: a restricted unpickler accepts only the handful of globals a state dict needs and turns
each tensor into a `TensorRef` (where its bytes lie in the file). Any other global, such as
`os.system`, is refused before anything runs. Tensor bytes are read one tensor at a time, so
memory stays bounded by the largest tensor.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vidport.converter.dtypes import TORCH_STORAGE_DTYPES
from vidport.converter.core.errors import UnsafeCheckpointError, VidportError
from vidport.converter.mapped import map_range

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class StorageRef:
    """One storage: where its bytes are and how to read them."""

    key: str
    dtype: np.dtype
    numel: int
    read: Callable[[int, int], memoryview]  # (byte offset, byte count) -> read-only bytes


@dataclass(frozen=True)
class TensorRef:
    """A tensor not yet read: shape, dtype and a view into a storage."""

    storage: StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        """Read this tensor's bytes (and only these) into a contiguous array."""
        item = self.dtype.itemsize
        if not self.shape:
            span = 1
        elif 0 in self.shape:
            return np.zeros(self.shape, self.dtype)
        else:
            span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        raw = self.storage.read(self.offset * item, span * item)
        flat = np.frombuffer(raw, dtype=self.dtype, count=span)
        strided = np.lib.stride_tricks.as_strided(
            flat, shape=self.shape, strides=tuple(s * item for s in self.stride)
        )
        return np.asarray(strided, order="C")  # keeps 0-d tensors 0-d


class _Reduce:
    """A stand-in for an allowed global that the pickle calls with arguments."""

    def __init__(self, build: Callable[..., Any]):
        self.build = build

    def __call__(self, *args: Any) -> Any:
        return self.build(*args)


def _rebuild_tensor(storage: StorageRef, offset: int, size: tuple, stride: tuple, *_: Any) -> TensorRef:
    return TensorRef(storage, int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data: TensorRef, *_: Any) -> TensorRef:
    return data


class _StorageType:
    def __init__(self, name: str):
        self.name = name


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _Reduce(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor"): _Reduce(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _Reduce(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Reduce(_rebuild_parameter),
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles state dicts; refuses every global outside a small allow-list."""

    def __init__(self, source: Any, path: Path, storage_for: Callable[[tuple], StorageRef]):
        super().__init__(io.BytesIO(source) if isinstance(source, bytes) else source)
        self.path = path
        self.storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("_codecs", "encode"):
            return _Reduce(lambda text, encoding="latin1": text.encode(encoding))
        raise UnsafeCheckpointError(
            f"{self.path}: refused to load: the pickle asks for `{module}.{name}`, which could run code",
            hint="vidport never executes pickled code; re-save the weights as safetensors from a trusted environment",
        )

    def persistent_load(self, pid: Any) -> StorageRef:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise UnsafeCheckpointError(f"{self.path}: unexpected persistent id {pid!r} in the pickle")
        return self.storage_for(pid)


def _storage_dtype(kind: Any, path: Path) -> np.dtype:
    if not isinstance(kind, _StorageType):
        raise VidportError(f"{path}: storage of unsupported type {kind!r}")
    return TORCH_STORAGE_DTYPES[kind.name]


def read_torch_zip(path: Path) -> Any:
    """The object tree of a zip-format torch checkpoint, tensors as TensorRefs."""
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise VidportError(f"{path}: not a readable torch zip checkpoint ({err})") from err
    pickles = [n for n in names if n.endswith("data.pkl")]
    if not pickles:
        raise VidportError(f"{path}: zip file without data.pkl; not a torch checkpoint")
    root = pickles[0][: -len("data.pkl")]
    byteorder = archive.read(root + "byteorder").decode() if root + "byteorder" in names else "little"
    if byteorder != "little":
        raise VidportError(f"{path}: big-endian checkpoints are not supported")
    cache: dict[str, StorageRef] = {}

    def storage_for(pid: tuple) -> StorageRef:
        _, kind, key, _location, numel = pid[:5]
        if key not in cache:
            member = f"{root}data/{key}"
            if member not in names:
                raise VidportError(f"{path}: storage {key} is missing from the archive (truncated file?)")
            info = archive.getinfo(member)
            if info.compress_type != zipfile.ZIP_STORED:
                raise VidportError(f"{path}: compressed storage {key} is not supported")

            data_start = _member_data_start(path, info)

            def read(offset: int, count: int, member: str = member, data_start: int = data_start,
                     size: int = info.file_size) -> memoryview:
                if offset + count > size:
                    raise VidportError(f"{path}: storage {member} ends early (truncated file?)")
                return map_range(path, data_start + offset, count, f"storage {member}")

            cache[key] = StorageRef(str(key), _storage_dtype(kind, path), int(numel), read)
        return cache[key]

    try:
        data = archive.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise VidportError(f"{path}: corrupted checkpoint ({err})") from err
    return _unpickle(data, path, storage_for)


def _member_data_start(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes begin: after its local header, whose name and extra
    field lengths may differ from the central directory's."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise VidportError(f"{path}: corrupted zip entry {info.filename} (truncated file?)")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _unpickle(source: Any, path: Path, storage_for: Callable[[tuple], StorageRef]) -> Any:
    try:
        return _SafeUnpickler(source, path, storage_for).load()
    except (UnsafeCheckpointError, VidportError):
        raise
    except Exception as err:  # any malformed pickle
        raise VidportError(f"{path}: corrupted checkpoint pickle ({type(err).__name__}: {err})") from err


def read_torch_legacy(path: Path) -> Any:
    """The object tree of a legacy (pre-1.6, non-zip) torch checkpoint, tensors as TensorRefs.

    Layout: magic pickle, protocol pickle, sys-info pickle, the main pickle, a pickled list of
    storage keys, then each storage as an 8-byte element count and its raw bytes.
    """
    offsets: dict[str, int] = {}
    handle = open(path, "rb")

    def storage_for(pid: tuple) -> StorageRef:
        _, kind, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise VidportError(f"{path}: legacy storage views are not supported")

        def read(offset: int, count: int) -> memoryview:
            return map_range(path, offsets[key] + offset, count, f"storage {key}")

        return StorageRef(str(key), _storage_dtype(kind, path), int(numel), read)

    with handle:
        try:
            if _RefusingUnpickler(handle, path).load() != LEGACY_MAGIC:
                raise VidportError(f"{path}: a pickle file, but not a torch checkpoint")
            _RefusingUnpickler(handle, path).load()  # protocol version
            _RefusingUnpickler(handle, path).load()  # sys info
            tree = _unpickle(handle, path, storage_for)
            keys = _RefusingUnpickler(handle, path).load()
        except (UnsafeCheckpointError, VidportError):
            raise
        except Exception as err:
            raise VidportError(f"{path}: corrupted legacy torch checkpoint ({type(err).__name__}: {err})") from err
        dtypes = _legacy_itemsizes(tree)
        for key in keys:
            header = handle.read(8)
            if len(header) != 8:
                raise VidportError(f"{path}: storage {key} is missing (truncated file?)")
            (numel,) = struct.unpack("<q", header)
            offsets[key] = handle.tell()
            handle.seek(numel * dtypes.get(key, 1), io.SEEK_CUR)
        if handle.tell() > path.stat().st_size:
            raise VidportError(f"{path}: file ends early (truncated file?)")
    return tree


def _legacy_itemsizes(tree: Any) -> dict[str, int]:
    """Storage key -> item size, found by walking the tree for TensorRefs."""
    sizes: dict[str, int] = {}
    for ref in iter_refs(tree):
        sizes[ref.storage.key] = ref.dtype.itemsize
    return sizes


def iter_refs(tree: Any):
    """Every TensorRef in a nested object tree."""
    if isinstance(tree, TensorRef):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from iter_refs(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from iter_refs(value)


class _RefusingUnpickler(pickle.Unpickler):
    """For the small header pickles: plain values only, no globals at all."""

    def __init__(self, handle: Any, path: Path):
        super().__init__(handle)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeCheckpointError(f"{self.path}: refused to load: the pickle asks for `{module}.{name}`")
