"""Read PyTorch checkpoints (zip and legacy formats) without torch and without running the pickle.

A torch checkpoint is a pickle: a program for a small stack machine that names functions to call
while loading it. We never call them. `_Machine` is an interpreter of our own that knows only the
opcodes torch's `weights_only` loader knows, builds plain containers, and turns each tensor into a
`TensorRef` (where its bytes lie in the file). A global outside the few a state dict needs, such as
`os.system`, is refused when the pickle names it, before anything is built from it.

Files from strangers are bounded: the pickle's size, its opcodes, the work they cause and the
nesting and size of the tree they build (a kilobyte of shared references must not expand into
billions of entries); every tensor view must lie inside its storage, and every storage inside the
file with exactly the element count the pickle declares. Tensor bytes are read one tensor at a
time, so memory stays bounded by the largest tensor.
"""
from __future__ import annotations

import _compat_pickle
import collections
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vidport.converter.core.errors import UnsafeCheckpointError, VidportError
from vidport.converter.dtypes import TORCH_STORAGE_DTYPES, dtype_name, is_floating
from vidport.converter.mapped import map_range

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ZIP_VERSIONS = range(1, 11)  # the format versions torch reads

# Bounds on what one checkpoint's pickles may ask of us. Real ones are far below them: torch.save
# spends about 30 opcodes and 100 bytes on a tensor, and a state dict nests 1-5 levels deep.
MAX_PICKLE_BYTES = 64 * 1024 * 1024
MAX_OPCODES = 5_000_000
MAX_WORK = 20_000_000  # elements copied by set(), OrderedDict(), encode() on top of the opcodes
MAX_TREE_ENTRIES = 5_000_000  # entries of the built tree, each shared reference counted every time
MAX_DEPTH = 64
MAX_REPEAT_BYTES = 64 * 1024 * 1024  # how far a zero-stride view may expand past its storage's bytes
_INT64 = 2**63


@dataclass(frozen=True)
class StorageRef:
    """One storage: where its bytes are and how to read them."""

    key: str
    dtype: np.dtype
    numel: int
    read: Callable[[int, int], memoryview]  # (byte offset, byte count) -> read-only bytes, inside the storage


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
        return math.prod(self.shape) * self.dtype.itemsize

    def _span(self) -> int:
        """Elements from the view's first to its last, inclusive; 0 for an empty tensor."""
        if 0 in self.shape:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 1)

    def view_problem(self) -> str | None:
        """Why this view does not lie inside its storage, or None when it does. Like torch: an
        empty tensor may have any strides, and a dimension of size 1 any stride."""
        if self.offset < 0:
            return f"negative storage offset {self.offset}"
        if min(self.stride, default=0) < -2**62 or (
                0 not in self.shape and any(s < 0 for n, s in zip(self.shape, self.stride) if n > 1)):
            return f"negative stride {list(self.stride)} (shape {list(self.shape)})"
        span = self._span()
        if span and self.offset + span > self.storage.numel:
            return (f"shape {list(self.shape)}, stride {list(self.stride)} at offset {self.offset} reaches element "
                    f"{self.offset + span - 1} of a storage of {self.storage.numel}")
        if self.nbytes > self.storage.numel * self.dtype.itemsize + MAX_REPEAT_BYTES:
            return (f"shape {list(self.shape)} repeats a storage of {self.storage.numel} elements into "
                    f"{self.nbytes:,} bytes (zero strides), more than {MAX_REPEAT_BYTES:,} beyond the file's bytes")
        return None

    def load(self) -> np.ndarray:
        """Read this tensor's bytes (and only these) into a contiguous array."""
        problem = self.view_problem()
        if problem is not None:
            raise VidportError(f"tensor on storage {self.storage.key}: {problem}")
        span = self._span()
        if span == 0:
            return np.zeros(self.shape, self.dtype)
        item = self.dtype.itemsize
        raw = self.storage.read(self.offset * item, span * item)
        flat = np.frombuffer(raw, dtype=self.dtype, count=span)
        strides = tuple(s * item if n > 1 else 0 for n, s in zip(self.shape, self.stride))
        strided = np.lib.stride_tricks.as_strided(flat, shape=self.shape, strides=strides)
        return np.asarray(strided, order="C")  # keeps 0-d tensors 0-d


# ---------------------------------------------------------------- the interpreter


class _Budget:
    """What one file's pickles have cost so far; shared by a legacy file's five pickles."""

    def __init__(self, path: Path):
        self.path = path
        self.opcodes = 0
        self.work = 0

    def charge(self, work: int) -> None:
        self.work += work
        if self.work > MAX_WORK:
            raise VidportError(f"{self.path}: the pickle asks for more than {MAX_WORK:,} elements of copying; refused",
                               hint="a state dict needs far less; the file is damaged or built to exhaust memory")


@dataclass(frozen=True)
class _Global:
    """A stand-in for an allowed global. Made afresh for every load and never modified: the
    interpreter builds only into plain containers, so no pickle can reach into it."""

    name: str
    call: Callable[..., Any] | None = None  # REDUCE: called with the machine, then the pickle's arguments
    new: Callable[[], Any] | None = None  # NEWOBJ: an empty container
    dtype: np.dtype | None = None  # a storage type (`torch.FloatStorage`) in a storage id


def _is_int(value: Any) -> bool:
    return type(value) is int and -_INT64 <= value < _INT64


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, (tuple, list)) or not all(_is_int(v) for v in value):
        return None
    return tuple(value)


_ATOMS = (str, bytes, int, float, bool, type(None))


def _hashable(value: Any) -> bool:
    """Keys and set members: plain values, or flat tuples of them (hashing stays O(size))."""
    return isinstance(value, _ATOMS) or (type(value) is tuple and all(isinstance(v, _ATOMS) for v in value))


class _Machine:
    """Runs one pickle from `data[pos:]`: torch's weights_only opcode set, nothing else."""

    def __init__(self, data: bytes, path: Path, allowed: dict[tuple[str, str], _Global], budget: _Budget,
                 storage_for: Callable[[tuple], StorageRef] | None, cut: bool):
        self.data = data
        self.path = path
        self.allowed = allowed
        self.budget = budget
        self.storage_for = storage_for
        self.cut = cut  # `data` is the first MAX_PICKLE_BYTES of a longer file
        self.pos = 0
        self.at = 0  # where the opcode being run starts
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    def fail(self, what: str) -> VidportError:
        return VidportError(f"{self.path}: corrupted checkpoint pickle at byte {self.at}: {what}")

    def take(self, count: int) -> bytes:
        end = self.pos + count
        if end > len(self.data):
            if self.cut:
                raise VidportError(f"{self.path}: the checkpoint's pickle is larger than {MAX_PICKLE_BYTES:,} "
                                   "bytes; refused",
                                   hint="tensor data lies outside the pickle; a state dict's pickle is far smaller")
            raise VidportError(f"{self.path}: the checkpoint's pickle ends early (truncated file?)")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def line(self) -> str:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            self.take(len(self.data) - self.pos + 1)  # raises: runs past the end
        raw = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail("a global's name is not UTF-8") from err

    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.fail("no MARK to pop to")
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def run(self, start: int) -> tuple[Any, int]:
        """The pickled object and the position after its STOP."""
        self.pos = start
        handlers = _HANDLERS
        while True:
            self.at = self.pos
            opcode = self.take(1)[0]
            self.budget.opcodes += 1
            if self.budget.opcodes > MAX_OPCODES:
                raise VidportError(f"{self.path}: the pickle has more than {MAX_OPCODES:,} opcodes; refused",
                                   hint="a state dict's pickle is far smaller; the file is damaged or hostile")
            if opcode == 0x2E:  # STOP
                return self.pop(), self.pos
            handler = handlers.get(opcode)
            if handler is None:
                raise self.fail(f"opcode {bytes([opcode])!r} is not one a torch state dict uses")
            handler(self)

    # -- globals, calls and persistent ids

    def op_global(self) -> None:
        module, name = self.line(), self.line()
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"{self.path}: refused to load: the pickle asks for `{module}.{name}`, which could run code",
                hint="vidport never executes pickled code; re-save the weights as safetensors from a trusted environment",
            )
        self.stack.append(found)

    def op_reduce(self) -> None:
        args = self.pop()
        func = self.top()
        if not isinstance(func, _Global) or func.call is None:
            raise self.fail(f"calls {type(func).__name__}, which is not an allowed function")
        if not isinstance(args, (tuple, list, set, dict)):  # what `func(*args)` takes, bar strings
            raise self.fail(f"arguments of {func.name} are a {type(args).__name__}, not a tuple")
        try:
            self.stack[-1] = func.call(self, *args)
        except TypeError as err:  # a wrong number of arguments: the functions check their types themselves
            raise self.fail(f"{func.name} called with {len(args)} arguments") from err

    def op_newobj(self) -> None:
        args = self.pop()
        cls = self.pop()
        if not isinstance(cls, _Global) or cls.new is None or not isinstance(args, tuple):
            raise self.fail(f"creates {getattr(cls, 'name', type(cls).__name__)}, which is not an allowed class")
        self.stack.append(cls.new())

    def op_build(self) -> None:
        state = self.pop()
        inst = self.top()
        if type(inst) is not collections.OrderedDict:  # a state dict's `_metadata`; nothing else is built
            raise self.fail(f"sets the state of a {type(inst).__name__}, which a state dict never does")
        if not isinstance(state, dict):
            raise self.fail(f"the state of an OrderedDict is a {type(state).__name__}, not a dict")

    def op_binpersid(self) -> None:
        pid = self.pop()
        if self.storage_for is None or not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage":
            raise self.fail(f"unexpected persistent id {_short(pid)}")
        self.stack.append(self.storage_for(pid))

    # -- containers

    def op_mark(self) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def op_append(self) -> None:
        self.extend_list([self.pop()])

    def op_appends(self) -> None:
        self.extend_list(self.pop_mark())

    def extend_list(self, items: list[Any]) -> None:
        target = self.top()
        if type(target) is not list:
            raise self.fail(f"appends to a {type(target).__name__}")
        target.extend(items)

    def set_items(self, target: Any, items: list[Any]) -> None:
        if not isinstance(target, dict):
            raise self.fail(f"sets items of a {type(target).__name__}")
        for key, value in zip(items[0::2], items[1::2]):
            if not _hashable(key):
                raise self.fail(f"a dict key is a {type(key).__name__}")
            target[key] = value

    def op_setitem(self) -> None:
        value, key = self.pop(), self.pop()
        self.set_items(self.top(), [key, value])

    def op_setitems(self) -> None:
        items = self.pop_mark()
        if len(items) % 2:
            raise self.fail("SETITEMS with an odd number of items")
        self.set_items(self.top(), items)

    def op_tuple(self) -> None:
        items = tuple(self.pop_mark())  # before `self.stack` is read: pop_mark replaces it
        self.stack.append(items)

    def op_tuple_n(self, count: int) -> None:
        if len(self.stack) < count:
            raise self.fail("stack underflow")
        items = tuple(self.stack[len(self.stack) - count:])
        del self.stack[len(self.stack) - count:]
        self.stack.append(items)

    # -- memo

    def op_get(self, index: int) -> None:
        if index not in self.memo:
            raise self.fail(f"memo entry {index} was never stored")
        self.stack.append(self.memo[index])

    def op_put(self, index: int) -> None:
        self.memo[index] = self.top()

    # -- values

    def op_binunicode(self) -> None:
        (length,) = struct.unpack("<I", self.take(4))
        raw = self.take(length)
        try:
            self.stack.append(str(raw, "utf-8", "surrogatepass"))
        except UnicodeDecodeError as err:
            raise self.fail("a string is not UTF-8") from err

    def op_short_binstring(self) -> None:
        raw = self.take(self.take(1)[0])
        try:
            self.stack.append(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise self.fail("a string is not UTF-8") from err

    def op_proto(self) -> None:
        self.take(1)


def _unpack(fmt: str, size: int) -> Callable[[_Machine], Any]:
    return lambda m: struct.unpack(fmt, m.take(size))[0]


_HANDLERS: dict[int, Callable[[_Machine], None]] = {
    0x80: _Machine.op_proto,
    ord("c"): _Machine.op_global,
    ord("R"): _Machine.op_reduce,
    0x81: _Machine.op_newobj,
    ord("b"): _Machine.op_build,
    ord("Q"): _Machine.op_binpersid,
    ord("("): _Machine.op_mark,
    ord("a"): _Machine.op_append,
    ord("e"): _Machine.op_appends,
    ord("s"): _Machine.op_setitem,
    ord("u"): _Machine.op_setitems,
    ord("t"): _Machine.op_tuple,
    0x85: lambda m: m.op_tuple_n(1),
    0x86: lambda m: m.op_tuple_n(2),
    0x87: lambda m: m.op_tuple_n(3),
    ord("N"): lambda m: m.stack.append(None),
    0x88: lambda m: m.stack.append(True),
    0x89: lambda m: m.stack.append(False),
    ord(")"): lambda m: m.stack.append(()),
    ord("]"): lambda m: m.stack.append([]),
    ord("}"): lambda m: m.stack.append({}),
    0x8F: lambda m: m.stack.append(set()),
    ord("J"): lambda m: m.stack.append(_unpack("<i", 4)(m)),
    ord("K"): lambda m: m.stack.append(m.take(1)[0]),
    ord("M"): lambda m: m.stack.append(_unpack("<H", 2)(m)),
    ord("G"): lambda m: m.stack.append(_unpack(">d", 8)(m)),
    ord("X"): _Machine.op_binunicode,
    ord("U"): _Machine.op_short_binstring,
    0x8A: lambda m: m.stack.append(int.from_bytes(m.take(m.take(1)[0]), "little", signed=True)),
    ord("h"): lambda m: m.op_get(m.take(1)[0]),
    ord("j"): lambda m: m.op_get(_unpack("<I", 4)(m)),
    ord("q"): lambda m: m.op_put(m.take(1)[0]),
    ord("r"): lambda m: m.op_put(_unpack("<I", 4)(m)),
}


def _ascii(value: Any) -> Any:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- the allowed globals


def _rebuild_tensor(m: _Machine, storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    shape = _int_tuple(size)
    if stride is None and shape is not None:  # torch's set_ takes None as the contiguous strides
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    strides = _int_tuple(stride)
    if not isinstance(storage, StorageRef):
        raise m.fail(f"a tensor is rebuilt from a {type(storage).__name__}, not a storage")
    if not _is_int(offset) or shape is None or strides is None or len(shape) != len(strides):
        raise m.fail(f"a tensor has offset {_short(offset)}, size {_short(size)}, stride {_short(stride)}")
    if any(n < 0 for n in shape):
        raise m.fail(f"a tensor has a negative size {list(shape)}")
    return TensorRef(storage, offset, shape, strides)


def _rebuild_tensor_v2(m: _Machine, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       _hooks: Any, metadata: Any = None) -> TensorRef:
    tensor = _rebuild_tensor(m, storage, offset, size, stride)
    _check_requires_grad(m, tensor, requires_grad)
    if metadata:  # torch.save writes it for a tensor with a lazy negation or conjugation: other values
        raise m.fail(f"tensor metadata {_short(metadata)} is not supported")
    return tensor


def _check_requires_grad(m: _Machine, tensor: TensorRef, requires_grad: Any) -> None:
    if type(requires_grad) is not bool:
        raise m.fail(f"requires_grad is {_short(requires_grad)}, not a bool")
    if requires_grad and not is_floating(tensor.dtype):
        raise m.fail(f"a {dtype_name(tensor.dtype)} tensor cannot require gradients")


def _rebuild_parameter(m: _Machine, data: Any, requires_grad: Any, _hooks: Any) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise m.fail(f"a parameter wraps a {type(data).__name__}, not a tensor")
    _check_requires_grad(m, data, requires_grad)
    return data


def _rebuild_parameter_with_state(m: _Machine, data: Any, requires_grad: Any, hooks: Any, _state: Any) -> TensorRef:
    return _rebuild_parameter(m, data, requires_grad, hooks)


def _ordered_dict(m: _Machine, items: Any = ()) -> collections.OrderedDict:
    pairs = list(items.items()) if isinstance(items, dict) else items
    if not isinstance(pairs, (list, tuple)):
        raise m.fail(f"OrderedDict of a {type(items).__name__}")
    m.budget.charge(len(pairs))
    made: collections.OrderedDict = collections.OrderedDict()
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise m.fail("OrderedDict items are not (key, value) pairs")
        if not _hashable(pair[0]):
            raise m.fail(f"a dict key is a {type(pair[0]).__name__}")
        made[pair[0]] = pair[1]
    return made


def _set(m: _Machine, items: Any = ()) -> set:
    if not isinstance(items, (list, tuple, set)) or not all(_hashable(v) for v in items):
        raise m.fail("a set of values that are not plain keys")
    m.budget.charge(len(items))
    return set(items)


def _encode(m: _Machine, text: Any, encoding: Any = "utf-8") -> bytes:
    """How protocol 2 pickles bytes: `_codecs.encode(text, 'latin1')`; text codecs only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise m.fail(f"_codecs.encode of a {type(text).__name__} with codec {_short(encoding)}")
    m.budget.charge(len(text))
    try:
        return text.encode(encoding)
    except UnicodeEncodeError as err:
        raise m.fail(f"bytes that do not fit {encoding}") from err


def _allowed_globals() -> dict[tuple[str, str], _Global]:
    """A fresh table per load (see `_Global`)."""
    return {
        ("collections", "OrderedDict"): _Global("collections.OrderedDict", _ordered_dict, collections.OrderedDict),
        ("builtins", "set"): _Global("builtins.set", _set, set),
        ("_codecs", "encode"): _Global("_codecs.encode", _encode),
        ("torch._utils", "_rebuild_tensor_v2"): _Global("_rebuild_tensor_v2", _rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor"): _Global("_rebuild_tensor", _rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): _Global("_rebuild_parameter", _rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Global("_rebuild_parameter_with_state",
                                                                   _rebuild_parameter_with_state),
        **{("torch", name): _Global(f"torch.{name}", dtype=dtype) for name, dtype in TORCH_STORAGE_DTYPES.items()},
    }


def _storage_pid(pid: tuple, path: Path, length: int) -> tuple[np.dtype, str, int]:
    """(dtype, key, element count) of a storage's persistent id, checked."""
    if len(pid) != length:
        raise VidportError(f"{path}: a storage id has {len(pid)} fields, expected {length}: {_short(pid)}")
    kind, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(kind, _Global) or kind.dtype is None:
        raise VidportError(f"{path}: storage of unsupported type {_short(kind)}")
    if not isinstance(key, str) or not _is_int(numel) or numel < 0:
        raise VidportError(f"{path}: a storage id names key {_short(key)} with {_short(numel)} elements")
    return kind.dtype, key, numel


def _run(data: bytes, start: int, path: Path, budget: _Budget, cut: bool,
         storage_for: Callable[[tuple], StorageRef] | None = None) -> tuple[Any, int]:
    allowed = _allowed_globals() if storage_for is not None else {}
    return _Machine(data, path, allowed, budget, storage_for, cut).run(start)


def _check_tree(tree: Any, path: Path) -> None:
    """Bound the built tree (entries counted each time they are reached, so shared references
    and cycles are caught) and check every tensor view against its storage, by name."""
    pending: list[tuple[Any, int, Any]] = [(tree, 0, None)]
    entries = 0
    while pending:
        node, depth, name = pending.pop()
        entries += 1
        if entries > MAX_TREE_ENTRIES:
            raise VidportError(f"{path}: the pickle's objects expand to more than {MAX_TREE_ENTRIES:,} entries "
                               "(shared references?); refused")
        if depth > MAX_DEPTH:
            raise VidportError(f"{path}: the pickle nests containers more than {MAX_DEPTH} deep "
                               "(or a container holds itself); refused")
        if isinstance(node, (StorageRef, _Global)):
            what = "a bare storage" if isinstance(node, StorageRef) else f"the global {node.name} itself"
            raise VidportError(f"{path}: {_name(name)} is {what}, not data a state dict holds")
        if isinstance(node, TensorRef):
            problem = node.view_problem()
            if problem is not None:
                raise VidportError(f"{path}: tensor {_name(name)} does not lie inside its storage: {problem}")
        elif isinstance(node, dict):
            pending.extend((value, depth + 1, (name, key)) for key, value in node.items())
        elif isinstance(node, (list, tuple, set)):
            pending.extend((value, depth + 1, (name, index)) for index, value in enumerate(node))


def _name(chain: Any) -> str:
    parts = []
    while chain is not None:
        chain, key = chain
        parts.append(str(key))
    return ".".join(reversed(parts)) or "<root>"


# ---------------------------------------------------------------- zip format

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError,
               ValueError, struct.error)


def read_torch_zip(path: Path) -> Any:
    """The object tree of a zip-format torch checkpoint, tensors as TensorRefs."""
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as err:
        raise VidportError(f"{path}: zip archive is truncated or corrupted ({err})") from err
    size = path.stat().st_size
    with archive:
        infos, root = _zip_directory(archive, path, size)
        version = _small_member(archive, path, infos.get(root + ".data/version") or infos.get(root + "version"))
        if version is None or not version.strip().isdigit() or int(version) not in ZIP_VERSIONS:
            raise VidportError(f"{path}: not a torch checkpoint of a known format version ({_short(version)})")
        byteorder = _small_member(archive, path, infos.get(root + "byteorder"))
        if byteorder not in (None, b"little"):
            raise VidportError(f"{path}: byte order {_short(byteorder)} is not supported (little-endian only)")
        _small_member(archive, path, infos.get(root + ".format_version"))
        serial = _small_member(archive, path, infos.get(root + ".data/serialization_id")) or b""
        try:
            serial.decode("utf-8")  # as torch's reader decodes it
        except UnicodeDecodeError as err:
            raise VidportError(f"{path}: .data/serialization_id is not UTF-8 (damaged file?)") from err
        alignment = _small_member(archive, path, infos.get(root + ".storage_alignment"))
        if alignment is not None and not alignment.strip().isdigit():
            raise VidportError(f"{path}: .storage_alignment is {_short(alignment)}, not a number")
        data = _pickle_member(archive, path, infos[root + "data.pkl"])

    storages: dict[str, StorageRef] = {}

    def storage_for(pid: tuple) -> StorageRef:
        dtype, key, numel = _storage_pid(pid, path, 5)
        if key not in storages:  # torch keeps the first declaration of a key, so do we
            storages[key] = _zip_storage(path, infos.get(f"{root}data/{key}"), key, dtype, numel, size)
        return storages[key]

    tree, _ = _run(data, 0, path, _Budget(path), False, storage_for)
    _check_tree(tree, path)
    return tree


def _zip_directory(archive: zipfile.ZipFile, path: Path, size: int) -> tuple[dict[str, zipfile.ZipInfo], str]:
    """The members by name, and the folder they all lie in, checked as torch's zip reader checks
    the directory before it reads anything."""
    listed = archive.infolist()
    infos = {info.filename: info for info in listed}
    if len(infos) != len(listed):
        raise VidportError(f"{path}: a zip member name appears twice (damaged or crafted file)")
    for info in listed:
        raw_name = info.filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
        try:
            raw_name.decode("utf-8")
        except UnicodeDecodeError as err:
            raise VidportError(f"{path}: zip member name {raw_name[:60]!r} is not UTF-8") from err
        if info.external_attr & 0x10 or info.filename.endswith("/"):  # torch's reader takes these as folders
            raise VidportError(f"{path}: zip member {info.filename} is marked as a folder (damaged file?)")
        if (info.header_offset + 30 + info.compress_size > size or (info.file_size and not info.compress_size)
                or (info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size)
                or info.volume not in (0, 1) or info.flag_bits & 0x2061):  # encrypted, masked or patched
            raise VidportError(f"{path}: zip directory entry {info.filename} does not fit the file, "
                               "or is encrypted, patched or on another disk (damaged or truncated file?)")
    if not _directory_agrees(path, size, len(listed)):
        raise VidportError(f"{path}: the zip directory's member count or size does not match its entries "
                           "(damaged file?)")
    first = listed[0].filename if listed else ""
    root = first.split("/", 1)[0] + "/"
    if "/" not in first or any(not name.startswith(root) for name in infos):
        raise VidportError(f"{path}: zip members not all in one folder; not a torch checkpoint")
    if root + "data.pkl" not in infos:
        raise VidportError(f"{path}: zip file without {root}data.pkl; not a torch checkpoint")
    return infos, root


def _directory_agrees(path: Path, size: int, members: int) -> bool:
    """Whether the zip's end records (and zip64 record, when there is one) state one disk,
    `members` members and a directory that those members' entries fill exactly, where it lies.
    torch's reader trusts these numbers; Python's reads entries until the directory runs out."""
    with open(path, "rb") as handle:
        handle.seek(max(0, size - 22 - 0xFFFF - 20))
        start = handle.tell()
        tail = handle.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return False
        disks = [struct.unpack("<HH", tail[at + 4:at + 8])]
        this_disk, total, cd_size, cd_offset = struct.unpack("<HHII", tail[at + 8:at + 20])
        end = start + at
        if at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
            (end,) = struct.unpack("<Q", tail[at - 12:at - 4])
            if end > size - 56:
                return False
            handle.seek(end)
            zip64 = handle.read(56)
            if len(zip64) < 56 or zip64[:4] != b"PK\x06\x06":
                return False
            disks.append(struct.unpack("<II", zip64[16:24]))
            counts = struct.unpack("<QQ", zip64[24:40])
            if any(n != members for n in counts) or any(n not in (members, 0xFFFF) for n in (this_disk, total)):
                return False
            cd_size, cd_offset = struct.unpack("<QQ", zip64[40:56])
        elif this_disk != members or total != members:
            return False
        if cd_offset + cd_size != end or end > size or any(pair not in ((0, 0), (1, 1)) for pair in disks):
            return False
        handle.seek(cd_offset)
        directory = handle.read(cd_size)
    pos = 0
    for _ in range(members):
        if directory[pos:pos + 4] != b"PK\x01\x02" or pos + 46 > len(directory):
            return False
        pos += 46 + sum(struct.unpack("<HHH", directory[pos + 28:pos + 34]))
    return pos == cd_size


def _small_member(archive: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo | None) -> bytes | None:
    if info is None:
        return None
    if info.file_size > 64:
        raise VidportError(f"{path}: zip member {info.filename} is {info.file_size:,} bytes; expected a few")
    return _read_member(archive, path, info, 64)


def _pickle_member(archive: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo) -> bytes:
    if info.file_size > MAX_PICKLE_BYTES:
        raise VidportError(f"{path}: {info.filename} inflates to {info.file_size:,} bytes, over the "
                           f"{MAX_PICKLE_BYTES:,}-byte limit; refused",
                           hint="tensor data lies outside the pickle; a state dict's pickle is far smaller")
    return _read_member(archive, path, info, MAX_PICKLE_BYTES)


def _read_member(archive: zipfile.ZipFile, path: Path, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, CRC checked, never more than `limit` (the directory's size may lie)."""
    try:
        with archive.open(info) as member:
            data = member.read(limit + 1)
    except RuntimeError as err:  # zipfile: an encrypted member
        raise VidportError(f"{path}: zip member {info.filename} cannot be read ({err})") from err
    except _ZIP_ERRORS as err:
        raise VidportError(f"{path}: corrupted zip member {info.filename} ({err})") from err
    if len(data) > limit:
        raise VidportError(f"{path}: zip member {info.filename} inflates past {limit:,} bytes; refused")
    return data


def _zip_storage(path: Path, info: zipfile.ZipInfo | None, key: str, dtype: np.dtype, numel: int,
                 file_size: int) -> StorageRef:
    if info is None:
        raise VidportError(f"{path}: storage {key} is missing from the archive (truncated file?)")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
        raise VidportError(f"{path}: storage {key} is compressed or encrypted; torch writes storages uncompressed")
    nbytes = numel * dtype.itemsize
    if info.file_size != nbytes or info.compress_size != nbytes:
        raise VidportError(f"{path}: storage {key} holds {info.file_size:,} bytes, but the pickle declares "
                           f"{numel:,} x {dtype.itemsize} bytes (damaged file?)")
    start = _member_data_start(path, info)
    if start + nbytes > file_size:
        raise VidportError(f"{path}: storage {key} ends past the end of the file (truncated file?)")
    return StorageRef(key, dtype, numel, _reader(path, start, nbytes, f"storage {key}"))


def _reader(path: Path, start: int, nbytes: int, what: str) -> Callable[[int, int], memoryview]:
    """Reads inside [start, start + nbytes) of the file and nowhere else."""
    def read(offset: int, count: int) -> memoryview:
        if offset < 0 or count < 0 or offset + count > nbytes:
            raise VidportError(f"{path}: a read of {count} bytes at {offset} falls outside {what} ({nbytes} bytes)")
        return map_range(path, start + offset, count, what)
    return read


def _member_data_start(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes begin: after its local header, whose name and extra
    field lengths may differ from the central directory's."""
    name = info.filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30 + len(name))
    if len(local) != 30 + len(name) or local[:4] != b"PK\x03\x04":
        raise VidportError(f"{path}: corrupted zip member {info.filename}: no local header where the directory "
                           "says (truncated file?)")
    name_length, extra_length = struct.unpack("<HH", local[26:30])
    if local[30:] != name or name_length != len(name):  # as Python's zipfile checks every member it opens
        raise VidportError(f"{path}: corrupted zip member {info.filename}: its local header names another "
                           f"({local[30:30 + name_length][:60]!r})")
    return info.header_offset + 30 + name_length + extra_length


# ---------------------------------------------------------------- legacy format


def read_torch_legacy(path: Path) -> Any:
    """The object tree of a legacy (pre-1.6, non-zip) torch checkpoint, tensors as TensorRefs.

    Layout: magic pickle, protocol pickle, sys-info pickle, the main pickle, a pickled list of
    storage keys, then each storage as an 8-byte element count and its raw bytes, to the end of
    the file. Each count must be the one the pickle declares and the last storage must end
    exactly at the end of the file: a block of zeros or a cut inside shifts every later storage.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(min(size, MAX_PICKLE_BYTES))
    cut, budget = len(head) < size, _Budget(path)
    magic, pos = _run(head, 0, path, budget, cut)
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise VidportError(f"{path}: a pickle file, but not a torch checkpoint")
    protocol, pos = _run(head, pos, path, budget, cut)
    if protocol != LEGACY_PROTOCOL:
        raise VidportError(f"{path}: legacy torch protocol {_short(protocol)} is not supported")
    sys_info, pos = _run(head, pos, path, budget, cut)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise VidportError(f"{path}: big-endian checkpoints are not supported")

    declared: dict[str, tuple[np.dtype, int]] = {}
    offsets: dict[str, int] = {}
    storages: dict[str, StorageRef] = {}

    def storage_for(pid: tuple) -> StorageRef:
        dtype, key, numel = _storage_pid(pid, path, 6)
        if pid[5] is not None:
            raise VidportError(f"{path}: legacy storage views are not supported")
        if key not in storages:  # torch keeps the first declaration of a key, so do we
            declared[key] = (dtype, numel)

            def read(offset: int, count: int, key: str = key) -> memoryview:
                return _reader(path, offsets[key], numel * dtype.itemsize, f"storage {key}")(offset, count)

            storages[key] = StorageRef(key, dtype, numel, read)
        return storages[key]

    tree, pos = _run(head, pos, path, budget, cut, storage_for)
    keys, pos = _run(head, pos, path, budget, cut)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise VidportError(f"{path}: the list of storage keys is a {type(keys).__name__} (damaged file?)")
    offsets.update(_legacy_storages(path, pos, size, keys, declared))
    _check_tree(tree, path)
    return tree


def _legacy_storages(path: Path, pos: int, size: int, keys: list[str],
                     declared: dict[str, tuple[np.dtype, int]]) -> dict[str, int]:
    """Where each storage's bytes start, after checking counts and that they fill the file."""
    offsets: dict[str, int] = {}
    with open(path, "rb") as handle:
        for key in keys:
            if key not in declared:
                raise VidportError(f"{path}: the file stores storage {key}, which the pickle never uses "
                                   "(damaged file?)")
            if key in offsets:
                raise VidportError(f"{path}: storage {key} is stored twice (damaged file?)")
            dtype, numel = declared[key]
            handle.seek(pos)
            header = handle.read(8)
            if len(header) != 8:
                raise VidportError(f"{path}: storage {key} is missing (truncated file?)")
            (count,) = struct.unpack("<q", header)
            if count != numel:
                raise VidportError(f"{path}: storage {key} records {count:,} elements where the pickle declares "
                                   f"{numel:,} (damaged file?)")
            offsets[key] = pos + 8
            pos += 8 + numel * dtype.itemsize
            if pos > size:
                raise VidportError(f"{path}: storage {key} ends past the end of the file (truncated file?)")
    missing = sorted(set(declared) - set(offsets))
    if missing:
        raise VidportError(f"{path}: storage(s) {', '.join(missing[:4])} used by the pickle are not in the file "
                           "(truncated file?)")
    if pos != size:
        raise VidportError(f"{path}: {size - pos:,} unexpected bytes after the last storage (damaged file?)")
    return offsets

