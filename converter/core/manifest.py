"""The manifest every vidport output folder carries (`vidport_manifest.json`), read in one place."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vidport.converter.core.errors import VidportError

MANIFEST = "vidport_manifest.json"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest as a dict; one clear error when it is missing, not JSON or not an object."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise VidportError(f"{folder}: no {MANIFEST}; not a vidport output folder",
                           hint="convert first: vidport convert FAMILY SRC --target mlx --out DIR")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VidportError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise VidportError(f"{path}: a manifest must be a JSON object, not {type(manifest).__name__}")
    _check_fields(path, manifest)
    return manifest


# what every reader indexes: a model folder's manifest, and a pipeline's (kind: pipeline)
MODEL_FIELDS = {"family": str, "source": str, "dtype": str, "config": dict, "spec": dict, "target": dict}
PIPELINE_FIELDS = {"pipeline": str, "components": dict, "target": dict}


def _check_fields(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse, naming the file and the field, a manifest that lacks what its readers use."""
    fields = PIPELINE_FIELDS if manifest.get("kind") == "pipeline" else MODEL_FIELDS
    for name, kind in fields.items():
        if name not in manifest:
            raise VidportError(f"{path}: no '{name}'; the manifest is incomplete",
                               hint="convert again: vidport convert ... --overwrite")
        if not isinstance(manifest[name], kind):
            raise VidportError(f"{path}: '{name}' must be a JSON {'object' if kind is dict else 'string'}, "
                               f"not {type(manifest[name]).__name__}")
    for name in ("target", "spec") if fields is MODEL_FIELDS else ("target",):
        if not isinstance(manifest[name].get("name"), str):
            raise VidportError(f"{path}: '{name}' names no 'name' (a string)",
                               hint="convert again: vidport convert ... --overwrite")
