"""Load a converted folder: build the runtime model from the manifest's config, load strictly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

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
    weights = load_weights(folder)
    quantize_layers(model, manifest, weights, folder)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise VidportError(f"{folder}: weights do not fit the model: {err}") from err
    model.eval()
    return model


def quantize_layers(model: nn.Module, manifest: dict[str, Any], weights: dict[str, mx.array], folder: Path) -> None:
    """Make the layers the manifest says are quantized MLX's quantized layers, each in its recorded
    format, after checking that the packed tensors have exactly the shapes that format gives the
    layer: bits and group size cannot be read from the packed shapes, so a file whose manifest
    disagrees with it (4-bit weights recorded as 2-bit, ...) is refused, not misread."""
    from vidport.converter.quantize import read_quantization

    formats = read_quantization(manifest)
    modules = dict(model.named_modules())
    for path, fmt in formats.items():
        module = modules.get(path)
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            raise VidportError(f"{folder}: the manifest quantizes {path}, which is not a linear or embedding layer of "
                               f"{type(model).__name__}", hint="convert again with this version of vidport")
        shape = tuple(module.weight.shape)
        for suffix, (_, packed) in fmt.packed(shape, np.float32).items():
            got = weights.get(f"{path}.{suffix}")
            if got is None or tuple(got.shape) != packed:
                held = "missing" if got is None else f"of shape {list(got.shape)}"
                raise VidportError(f"{folder}: {path}.{suffix} is {held}; the manifest records {fmt.name} "
                                   f"({fmt.bits} bits, groups of {fmt.group_size}), which packs a {list(shape)} "
                                   f"layer into {list(packed)}",
                                   hint="the manifest and the weights disagree: convert again")
    stray = sorted(key for key in weights if key.endswith(".scales") and key.rsplit(".", 1)[0] not in formats)
    if stray:
        raise VidportError(f"{folder}: {stray[0]} is a quantized layer's scales, but the manifest records no "
                           f"quantization of {stray[0].rsplit('.', 1)[0]}", hint="convert again")
    if formats:
        nn.quantize(model, class_predicate=lambda path, _: formats[path].as_json() if path in formats else False)
