"""Load a converted folder: build the runtime model from the manifest's config, load strictly."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.converter.core.errors import VidportError
from vidport.converter.core.manifest import read_manifest



def load_weights(folder: Path) -> dict[str, mx.array]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weights: dict[str, mx.array] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            weights.update(mx.load(str(folder / shard)))
        return weights
    return mx.load(str(folder / "model.safetensors"))


def load_model(folder: str | Path) -> nn.Module:
    """The MLX model of a converted folder; every parameter must be present with its shape."""
    from vidport.runtime.registry import build_model

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["target"]["name"] != "mlx":
        raise VidportError(f"{folder}: converted for target '{manifest['target']['name']}', not mlx")
    from vidport.converter.spec import load_catalog

    family = load_catalog().family(manifest["family"])
    model = build_model(family.runtime, manifest["config"])
    try:
        model.load_weights(list(load_weights(folder).items()), strict=True)
    except ValueError as err:
        raise VidportError(f"{folder}: weights do not fit the model: {err}") from err
    model.eval()
    return model
