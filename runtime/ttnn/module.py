"""The base of TTNN model classes, and strict access to converted parameters.

Modules mirror the canonical (diffusers) tree: a module's children are its attributes that are
modules or lists of modules, named as diffusers names them (`transformer_blocks.0`, `to_out.0`),
so golden comparison aligns layers by name. Calling a module tells `Module.observer` (the golden
tap) about the call; nothing per layer is needed for that.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, ClassVar

from vidport.converter.core.errors import VidportError, closest, listing
from vidport.runtime.ttnn.ops import Ops, Tensor

TTNN_MANIFEST = "ttnn_manifest.json"


class Module:
    observer: ClassVar[Callable[["Module", Any], None] | None] = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self.forward(*args, **kwargs)
        if Module.observer is not None:
            Module.observer(self, output)
        return output

    def children(self) -> Iterator[tuple[str, "Module"]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for index, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{index}", item

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        for name, child in self.children():
            path = f"{prefix}{name}"
            yield path, child
            yield from child.named_modules(path + ".")


class Parameters:
    """The converted tensors of one folder, by canonical name; each must be taken exactly once."""

    def __init__(self, folder: str | Path, ops: Ops) -> None:
        self.folder = Path(folder)
        path = self.folder / TTNN_MANIFEST
        if not path.exists():
            raise VidportError(f"{folder}: no {TTNN_MANIFEST}; not a TTNN conversion",
                               hint="convert with: vidport convert FAMILY SRC --target ttnn --out DIR")
        try:
            self.manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise VidportError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("tensors"), dict):
            raise VidportError(f"{path}: a JSON object with 'tensors' (name -> file entry) expected")
        self.entries: dict[str, dict[str, Any]] = self.manifest["tensors"]
        self.ops = ops
        self.taken: set[str] = set()

    @property
    def grid(self) -> tuple[int, int]:
        return self.manifest["grid"]["x"], self.manifest["grid"]["y"]

    def take(self, name: str, optional: bool = False) -> Tensor | None:
        if name not in self.entries:
            if optional:
                return None
            near = closest(name, self.entries)
            raise VidportError(f"{self.folder}: the model needs {name}, which the conversion lacks",
                               hint=f"closest converted tensor: {near}" if near else None)
        self.taken.add(name)
        entry = self.entries[name]
        return self.ops.parameter(self.folder / entry["file"], entry)

    def check_all_taken(self) -> None:
        unused = sorted(set(self.entries) - self.taken)
        if unused:
            raise VidportError(f"{self.folder}: {len(unused)} converted tensor(s) the model does not use: {listing(unused)}",
                               hint="the conversion and the runtime model disagree on the architecture")
