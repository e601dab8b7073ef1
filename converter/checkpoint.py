"""Open any supported source, chosen by content: torch zip/legacy pickles, safetensors (single or
sharded), or a Diffusers / transformers model folder. Nothing is read beyond headers until a
tensor is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.converter.core.jsonfile import read_json_object
from vidport.converter.safetensors_io import looks_like_safetensors, read_safetensors
from vidport.converter.torch_pickle import TensorRef, read_torch_legacy, read_torch_zip


class LazyTensor(Protocol):
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def nbytes(self) -> int: ...

    def load(self) -> np.ndarray: ...


@dataclass
class Source:
    """An opened source: its raw object tree and what we know about the files behind it."""

    path: Path
    format: str  # torch-zip | torch-legacy | safetensors | safetensors-sharded | *-folder
    files: list[Path]
    tree: Any
    config: dict | None = None


@dataclass
class Tensors:
    """A flat name -> lazy tensor mapping after unwrapping, with what unwrapping found."""

    refs: dict[str, LazyTensor]
    wrappers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str, int]] = field(default_factory=list)  # (entry, why, tensors): the spec's `drop`


def is_tensor(value: Any) -> bool:
    return hasattr(value, "load") and hasattr(value, "shape")


def read_checkpoint(path: str | Path) -> Source:
    """Open a checkpoint file or model folder by what it contains, not what it is called."""
    path = Path(path)
    if not path.exists():
        raise VidportError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_folder(path)
    if path.name.endswith(".index.json"):
        return _read_sharded(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as err:
        raise VidportError(f"{path}: cannot read ({err.strerror or err})") from err
    if head[:4] == b"PK\x03\x04":
        return Source(path, "torch-zip", [path], read_torch_zip(path))
    if looks_like_safetensors(path):  # before the pickle check: a header length may start with 0x80
        refs, _meta = read_safetensors(path)
        return Source(path, "safetensors", [path], refs)
    if head[:1] == b"\x80":
        return Source(path, "torch-legacy", [path], read_torch_legacy(path))
    raise VidportError(
        f"{path}: unrecognized file format",
        hint="vidport reads .ckpt/.pt/.pth (torch), .safetensors, sharded *.index.json, and model folders",
    )


def _shard_path(index: Path, name: object) -> Path:
    """A shard the index names: a relative path inside the index's folder, never the index or
    another index (an index naming itself would be read forever). Checked by its text, not by
    resolving links: a Hugging Face cache keeps every shard as a link into its blob store."""
    if not isinstance(name, str) or not name:
        raise VidportError(f"{index}: weight_map names a shard {str(name)[:80]!r}, not a file name")
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or parts[0] in ("/", "\\") or ":" in parts[0] or ".." in parts:
        raise VidportError(f"{index}: shard {name!r} lies outside the index's folder; refused",
                           hint="an index names shards beside it, such as model-00001-of-00002.safetensors")
    shard = index.parent.joinpath(*parts)
    if shard.name.endswith(".index.json"):
        raise VidportError(f"{index}: shard {name!r} is an index itself; refused")
    if not shard.is_file():
        raise VidportError(f"{index}: shard {name} is missing")
    return shard


def _read_sharded(index: Path) -> Source:
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise VidportError(f"{index}: not a valid shard index (its weight_map is a {type(weight_map).__name__}, "
                           "not an object of tensor name -> shard file)")
    wanted: dict[str, list[str]] = {}
    for name, shard_name in weight_map.items():
        wanted.setdefault(shard_name if isinstance(shard_name, str) else repr(shard_name), []).append(name)
    refs: dict[str, Any] = {}
    files = []
    for shard_name, names in sorted(wanted.items()):
        shard = _shard_path(index, weight_map[names[0]])
        files.append(shard)
        if looks_like_safetensors(shard):
            shard_refs, _ = read_safetensors(shard)
        else:
            shard_refs = read_checkpoint(shard).tree
        if not isinstance(shard_refs, dict):
            raise VidportError(f"{shard}: holds a {type(shard_refs).__name__}, not a dict of tensors")
        for name in names:
            if not is_tensor(shard_refs.get(name)):
                raise VidportError(f"{shard}: missing tensor {name} listed in {index.name}")
            refs[name] = shard_refs[name]
    return Source(index, "safetensors-sharded", [index, *files], refs)


WEIGHT_FILE_PREFERENCE = (
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def _read_folder(folder: Path) -> Source:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise VidportError(
            f"{folder}: a folder without config.json",
            hint="give a Diffusers/transformers model folder, or a checkpoint file",
        )
    config = read_json_object(config_path, MAX_CONFIG_BYTES)
    kind = "diffusers-folder" if "_diffusers_version" in config else "transformers-folder"
    for name in WEIGHT_FILE_PREFERENCE:
        if (folder / name).is_file():
            inner = read_checkpoint(folder / name)
            return Source(folder, kind, [config_path, *inner.files], inner.tree, config)
    raise VidportError(f"{folder}: config.json but no weights file", hint=f"expected one of {WEIGHT_FILE_PREFERENCE}")


@dataclass(frozen=True)
class EmaCopies:
    """Where a file keeps EMA weights. Either a copy of each selected weight: key `k`'s (after
    `select_prefix`) is `prefix + k`, with k's dots removed when `dotless` (LDM's LitEma names
    `model.diffusion_model.a.0.weight`'s copy `model_ema.diffusion_modela0weight`); or a whole
    state dict of its own under one of the entries `descend` names, stepped into in place of the
    spec's `descend` (Self-Forcing keeps `generator_ema` beside `generator`). `default`: taken,
    where the file has them, when the user asks for neither the EMA nor the plain weights."""

    prefix: str = ""
    dotless: bool = False
    descend: tuple[str, ...] = ()
    default: bool = False

    def name_of(self, key: str) -> str:
        return self.prefix + (key.replace(".", "") if self.dotless else key)


class NoEmaWeights(VidportError):
    """The file keeps no EMA weights where its format would."""


def unwrap(tree: Any, descend: list[str], strip_prefixes: list[str], select_prefixes: list[str] | None = None,
           ema: EmaCopies | None = None, drop: dict[str, str] | None = None) -> Tensors:
    """Flatten a checkpoint's object tree to named tensors by the spec's unwrap rules.

    `descend`: wrapper keys (such as `state_dict`) to step into when present; their siblings
    (`global_step`, `optimizer`, ...) are skipped and reported, or, when `drop` names them, dropped
    with its reason (a training file's critic). `select_prefixes`: for a file that
    holds several models (an LDM single file: `first_stage_model.`, `cond_stage_model.`, ...),
    keep only the sub-tree under the first of these prefixes that some key carries, prefix
    removed; the rest belongs to other families and is neither mapped nor reported as unmatched.
    `ema`: take the EMA weights instead (an error if the file has none).
    `strip_prefixes`: a prefix (such as `module.`) removed when every key carries it.
    """
    wrappers: list[str] = []
    skipped: list[str] = []
    dropped: list[tuple[str, str, int]] = []
    if ema is not None and ema.descend:
        descend = list(ema.descend)
    stepped: list[str] = []
    while isinstance(tree, dict) and not any(is_tensor(v) for v in tree.values()):
        step = next((k for k in descend if isinstance(tree.get(k), dict)), None)
        if step is None:
            break
        wrappers.append(f"nested under '{step}'")
        stepped.append(step)
        for key, value in tree.items():
            if key != step and drop and key in drop:
                dropped.append((key, drop[key], sum(1 for _ in _tensors_in(value))))
            elif key != step:
                skipped.append(f"{key} ({_describe(value)})")
        tree = tree[step]
    if ema is not None and ema.descend and not stepped:
        raise NoEmaWeights(f"no EMA weights in this file (no {' or '.join(repr(k) for k in ema.descend)} entry)",
                           hint="convert without --ema: the weights it holds are the ones to use")
    if not isinstance(tree, dict):
        raise VidportError(f"checkpoint holds a {type(tree).__name__}, not a dict of tensors")
    refs: dict[str, Any] = {}
    _flatten(tree, "", refs, skipped)
    everything = refs
    if select_prefixes:
        refs = _select(refs, select_prefixes, wrappers)
    if ema is not None and not ema.descend:
        refs = _ema(refs, everything, ema, wrappers)
    for prefix in strip_prefixes:
        if refs and all(k.startswith(prefix) for k in refs):
            refs = {k[len(prefix):]: v for k, v in refs.items()}
            wrappers.append(f"key prefix '{prefix}'")
    return Tensors(refs, wrappers, skipped, dropped)


def _select(refs: dict[str, Any], prefixes: list[str], wrappers: list[str]) -> dict[str, Any]:
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in refs)), None)
    if prefix is None:
        raise VidportError(f"no key starts with {' or '.join(repr(p) for p in prefixes)}")
    if not prefix:  # "" as the last choice: the file holds this model alone
        return refs
    selected = {k[len(prefix):]: v for k, v in refs.items() if k.startswith(prefix)}
    others = len(refs) - len(selected)
    wrappers.append(f"sub-tree '{prefix}' ({others} other tensors left to other models)" if others
                    else f"key prefix '{prefix}'")
    return selected


def _ema(refs: dict[str, Any], everything: dict[str, Any], ema: EmaCopies, wrappers: list[str]) -> dict[str, Any]:
    lacking = [k for k in refs if ema.name_of(k) not in everything]
    if len(lacking) == len(refs):
        raise NoEmaWeights(f"no EMA weights in this file (no key starts with '{ema.prefix}')",
                           hint="convert without --ema: the weights it holds are the ones to use")
    if lacking:
        raise VidportError(f"{len(lacking)} weight(s) have no EMA copy: {', '.join(lacking[:4])}"
                           + (" ..." if len(lacking) > 4 else ""), hint=f"EMA copies are named {ema.name_of(lacking[0])}")
    wrappers.append(f"EMA copies '{ema.prefix}...' in place of the weights")
    return {k: everything[ema.name_of(k)] for k in refs}


def _flatten(tree: dict, prefix: str, out: dict[str, Any], skipped: list[str]) -> None:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if is_tensor(value):
            out[name] = value
        elif isinstance(value, dict) and any(True for _ in _tensors_in(value)):
            _flatten(value, name + ".", out, skipped)
        else:
            skipped.append(f"{name} ({_describe(value)})")


def _tensors_in(tree: Any):
    if is_tensor(tree):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors_in(value)


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return f"dict, {sum(1 for _ in _tensors_in(value))} tensors"
    return type(value).__name__


__all__ = ["Source", "Tensors", "TensorRef", "EmaCopies", "NoEmaWeights", "read_checkpoint", "unwrap", "is_tensor"]
