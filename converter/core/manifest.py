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
    return manifest
