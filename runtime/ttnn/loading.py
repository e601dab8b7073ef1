"""Build the TTNN model of a converted folder on an ops backend, loading every tensor strictly."""
from __future__ import annotations

import importlib
from pathlib import Path

from vidport.converter.core.errors import VidportError
from vidport.runtime.ttnn.module import Module, Parameters
from vidport.runtime.ttnn.ops import Ops
from vidport.converter.core.manifest import MANIFEST, read_manifest



def make_ops(device: bool = False) -> Ops:
    """The emulator (any machine), or real ttnn on card 0."""
    if device:
        from vidport.runtime.ttnn.device import DeviceOps

        return DeviceOps()
    from vidport.runtime.ttnn.emulator import EmulatorOps

    return EmulatorOps()


def load_model(folder: str | Path, ops: Ops | None = None) -> Module:
    """The family's TTNN model (its `targets.ttnn.runtime`) over the folder's converted tensors."""
    from vidport.converter.spec import load_catalog

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["target"]["name"] != "ttnn":
        raise VidportError(f"{folder}: not a TTNN conversion", hint="convert with --target ttnn")
    try:
        family = load_catalog().family(manifest["family"])
    except VidportError as err:
        raise VidportError(f"{folder / MANIFEST}: {err.message}", hint=err.hint) from err
    extras = family.targets.get("ttnn")
    if extras is None or not extras.runtime:
        raise VidportError(f"family {family.name} has no TTNN runtime model",
                           hint=f"add targets: ttnn: runtime: module:Class to {family.path}")
    params = Parameters(folder, ops or make_ops())
    try:
        module, name = extras.runtime.split(":")
        model = getattr(importlib.import_module(module), name).from_config(manifest["config"], params)
    except TypeError as err:
        raise VidportError(f"config does not fit {extras.runtime}: {err}") from err
    params.check_all_taken()
    return model
