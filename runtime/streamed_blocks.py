"""Low-memory mode: a model whose blocks' weights stay on disk until each block runs.

`load_streamed(folder)` loads a converted folder as `runtime.loading.load_model` does, except the
blocks of one list attribute (LTX-2's `transformer_blocks`, Wan's `blocks`): their parameters are
empty placeholders, and each block's call reads its tensors from the folder's safetensors files
just before it runs, evaluates the block's output and drops them again. Resident are the other
weights and one block's, so a model larger than RAM runs; each forward reads every block once
(from the page cache while the files fit in it, else from disk).

Tensors are read by MLX's own lazy `mx.load`: it parses a file's header and reads a tensor's bytes
into an MLX buffer only when the tensor is evaluated, mapping nothing, so RSS holds one copy. A
numpy route (`safetensors.safe_open(framework="numpy")`, the converter's memory maps) would count
the mapped file pages in RSS beside the MLX copy, and numpy has no bfloat16.

`load_model` reads no tensor either (its arrays are mx.load's, unevaluated), so it builds and
checks the model here: every file present and whole, every name and shape. The blocks' arrays are
replaced before anything evaluates them.

No prefetch: reading the next block's bytes into the page cache on background threads while a
block computes made a forward slower, not faster (bench/ltx2_low_memory.py, 8 blocks of LTX-2 at
the real widths on 2 cores: +112 ms a block from the page cache and from the disk alike), as
the threads take CPU from the block and MLX's own read is already parallel.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from vidport.converter.core.errors import VidportError
from vidport.runtime.loading import load_model, weight_files

REPAIR = "convert again: vidport convert ... --overwrite"


@dataclass(frozen=True)
class BlockWeights:
    """Where one block's tensors lie, and the empty arrays that stand in for them between calls."""

    files: dict[Path, list[tuple[str, str]]]  # file -> (name in the file, name in the block)
    shapes: dict[str, tuple[int, ...]]  # name in the block -> shape
    placeholders: dict[str, Any]  # the block's parameter tree, every array empty

    def read(self) -> dict[str, Any]:
        """The block's parameter tree, lazy: the bytes are read when the block's output is evaluated."""
        found = []
        for path, names in self.files.items():
            try:
                tensors = mx.load(str(path))
            except (RuntimeError, ValueError) as err:
                raise VidportError(f"{path}: no longer readable ({err})", hint=REPAIR) from err
            for stored, local in names:
                if stored not in tensors or tensors[stored].shape != self.shapes[local]:
                    raise VidportError(f"{path}: tensor {stored} is gone or changed shape since the model was loaded",
                                       hint=REPAIR)
                found.append((local, tensors[stored]))
        return tree_unflatten(found)


class StreamedBlock:
    """Mixed in before a block's own class (`streamed_class`), so the block keeps its parameter
    tree, names and attributes; its call brings its weights in and sends them back out."""

    streamed_weights: BlockWeights  # a plain attribute, not a parameter (set by load_streamed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        weights = self.streamed_weights
        self.update(weights.read())
        try:
            out = super().__call__(*args, **kwargs)
            mx.eval(out)  # the weights are read and used now, while they are in place
        finally:
            self.update(weights.placeholders)
        return out


_CLASSES: dict[type, type] = {}


def streamed_class(cls: type) -> type:
    """`cls` with StreamedBlock's call in front (one class per block class)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Streamed{cls.__name__}", (StreamedBlock, cls), {"__module__": __name__})
    return _CLASSES[cls]


def load_streamed(folder: str | Path, blocks_attr: str = "transformer_blocks") -> nn.Module:
    """The MLX model of a converted folder with the blocks of `blocks_attr` (a list attribute of the
    model) streamed from the folder's files. Errors (a file missing or truncated, a name or shape
    that does not fit) come here, before anything runs."""
    folder = Path(folder)
    model = load_model(folder)
    blocks = model.get(blocks_attr)
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise VidportError(f"{folder}: {type(model).__name__} has no list of blocks named '{blocks_attr}'")
    files = weight_files(folder)
    empty = {dtype: mx.zeros((0,), dtype) for dtype in {v.dtype for _, v in tree_flatten(model.parameters())}}
    for index, block in enumerate(blocks):
        parameters = tree_flatten(block.parameters())
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name, _ in parameters:
            stored = f"{blocks_attr}.{index}.{name}"
            by_file.setdefault(files[stored], []).append((stored, name))
        placeholders = tree_unflatten([(name, empty[value.dtype]) for name, value in parameters])
        block.update(placeholders)
        block.__class__ = streamed_class(type(block))
        block.streamed_weights = BlockWeights(by_file, {name: value.shape for name, value in parameters},
                                              placeholders)
    mx.eval(model.parameters())  # the other weights, resident from now on
    return model
