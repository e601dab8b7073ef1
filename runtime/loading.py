"""Load a converted folder: build the runtime model from the manifest's config, load strictly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.converter.core.errors import VidportError
from vidport.converter.core.manifest import MANIFEST, read_manifest



def _shards(index: Path) -> list[str]:
    """The shard files a converted folder's index names: plain file names beside it."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise VidportError(f"{index}: not a JSON object with a weight_map ({err})") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise VidportError(f"{index}: 'weight_map' must map tensor names to shard file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise VidportError(f"{index}: shard '{shard}' is not a file name in the folder")
    return sorted(set(weight_map.values()))


def _load_file(path: Path) -> dict[str, mx.array]:
    """One safetensors file; a missing or damaged one is named, not a traceback."""
    if not path.is_file():
        raise VidportError(f"{path}: missing; the converted folder is incomplete",
                           hint="convert again: vidport convert ... --overwrite")
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as err:  # mx.load's errors on a damaged file
        raise VidportError(f"{path}: not a readable safetensors file ({err})",
                           hint="convert again: vidport convert ... --overwrite") from err


def load_weights(folder: Path) -> dict[str, mx.array]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weights: dict[str, mx.array] = {}
        for shard in _shards(index):
            weights.update(_load_file(folder / shard))
        return weights
    return _load_file(folder / "model.safetensors")


def weight_files(folder: Path) -> dict[str, Path]:
    """The file of a converted folder that holds each tensor, for reading part of a model on its own
    (runtime.streamed_blocks). Every file is opened and its header checked now, nothing read."""
    index = folder / "model.safetensors.index.json"
    files = [folder / shard for shard in _shards(index)] if index.exists() else [folder / "model.safetensors"]
    return {name: path for path in files for name in _load_file(path)}


def load_model(folder: str | Path) -> nn.Module:
    """The MLX model of a converted folder; every parameter must be present with its shape."""
    from vidport.runtime.registry import build_model

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["target"]["name"] != "mlx":
        raise VidportError(f"{folder}: converted for target '{manifest['target']['name']}', not mlx")
    from vidport.converter.spec import load_catalog

    try:
        family = load_catalog().family(manifest["family"])
    except VidportError as err:
        raise VidportError(f"{folder / MANIFEST}: {err.message}", hint=err.hint) from err
    model = build_model(family.runtime, manifest["config"])
    try:
        model.load_weights(list(load_weights(folder).items()), strict=True)
    except ValueError as err:
        raise VidportError(f"{folder}: weights do not fit the model: {err}") from err
    model.eval()
    return model
