"""`vidport inspect`: what a checkpoint or converted folder is, read from headers only."""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from vidport.converter.checkpoint import read_checkpoint, unwrap
from vidport.converter.detect import COMMON_WRAPPERS, detect
from vidport.converter.dtypes import dtype_name
from vidport.converter.infer import assumption_note
from vidport.converter.core.errors import VidportError
from vidport.converter.spec import load_catalog
from vidport.converter.core.manifest import MANIFEST, read_manifest


def describe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).exists():
        manifest = read_manifest(path)
        if manifest.get("kind") == "pipeline":
            return _pipeline_rows(manifest)
        return {"kind": f"vidport output ({manifest['target']['name']})", "family": manifest["family"],
                "source": manifest["source"], "spec": f"{manifest['spec']['name']} v{manifest['spec']['version']}",
                "variant": manifest.get("variant"), "dtype": manifest["dtype"], "tensors": manifest["tensors"],
                "parameters": f"{manifest['parameters']:,}", "config": manifest["config"],
                "files": ", ".join(manifest["files"])}
    source = read_checkpoint(path)
    if not isinstance(source.tree, dict):  # a pickle may hold anything; a model's weights are a dict
        raise VidportError(f"{path}: holds a {type(source.tree).__name__}, not a dict of tensors",
                           hint="vidport reads checkpoints of model weights")
    rows: dict[str, Any] = {"format": source.format}
    try:
        found = detect(source, load_catalog())
        tensors = found.tensors
        rows["family"] = found.family.name
        rows["source spec"] = found.spec.name
        from vidport.converter.convert import plan_conversion

        plan = plan_conversion(path, "mlx", found.family.name)
        rows["variant"] = plan.variant or "-"
        if plan.assumed:
            rows["assumed"] = assumption_note(plan.assumed)
        rows["config"] = {k: v for k, v in plan.config.items() if not k.startswith("_")}
        if found.spec.settings:
            rows["settings"] = found.spec.settings
        if plan.ema:
            rows["weights"] = "EMA (the default of this format; --no-ema converts the others)"
        tensors = plan.detected.tensors
    except VidportError as err:
        tensors = unwrap(source.tree, COMMON_WRAPPERS, ["module."])
        rows["family"] = f"unknown ({err.message.split(': ', 1)[-1]})"
    dtypes = collections.Counter(dtype_name(r.dtype) for r in tensors.refs.values())
    rows["tensors"] = len(tensors.refs)
    rows["parameters"] = f"{sum(int(np.prod(r.shape, dtype=np.int64)) for r in tensors.refs.values()):,}"
    rows["dtypes"] = ", ".join(f"{k} x{v}" for k, v in dtypes.most_common())
    rows["wrappers"] = ", ".join(tensors.wrappers) or "none"
    rows["skipped entries"] = ", ".join(tensors.skipped) or "none"
    if tensors.dropped:
        rows["dropped entries"] = ", ".join(f"{key} ({count} tensors: {why})" for key, why, count in tensors.dropped)
    rows["files"] = ", ".join(str(f) for f in source.files)
    return rows


def _pipeline_rows(manifest: dict[str, Any]) -> dict[str, Any]:
    """A pipeline folder (vidport convert animatediff|sd15): its components and extras."""
    rows: dict[str, Any] = {"kind": f"vidport pipeline folder ({manifest['target']['name']})",
                            "pipeline": f"{manifest['pipeline']} ({manifest['diffusers_class']})",
                            "inputs": ", ".join(f"{k}: {v['path']} ({v['layout']})" for k, v in manifest["inputs"].items())}
    for name, entry in manifest["components"].items():
        rows[name] = (f"{entry['family']} from {entry['spec']}" + (f", {entry['variant']}" if entry.get("variant") else "")
                      + f"; {entry['dtype']}, {entry['parameters']:,} parameters")
    rows["tokenizer"] = (manifest.get("tokenizer") or {}).get("from", "-")
    scheduler = manifest.get("scheduler") or {}
    rows["scheduler"] = f"{scheduler.get('class', '-')} ({scheduler.get('from', '-')})"
    rows["parameters"] = f"{manifest['parameters']:,}"
    return rows
