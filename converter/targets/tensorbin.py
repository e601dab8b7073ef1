"""The writer of the TTNN target: one ``.tensorbin`` per tensor, in the dtype and layout its role
names, under the file naming of the chosen cache style (see cache_styles.py), plus
``ttnn_manifest.json`` (canonical name -> file, dtype, layout, logical and padded shape, role,
transforms, hash of the float32 values packed) and the usual vidport_manifest.json.

Files are written by the real ``ttnn.dump_tensor`` when ``import_ttnn()`` gives ttnn, else by
vidport's own codec (the same bytes; VIDPORT_TENSORBIN_ENCODER=numpy|ttnn forces one). Every
tensor is packed from float32 (a bfloat16 source upcasts exactly), so bfloat8_b is never a
re-rounding of bfloat16.  Output is deterministic: same source and options, same bytes
(vidport_manifest.json aside, which records when and where).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vidport.converter.convert import ConversionPlan, Progress, canonical_config_file, iter_outputs, write_manifest
from vidport.converter.dtypes import is_floating
from vidport.converter.core.errors import VidportError
from vidport.converter.targets.cache_styles import STYLES
from vidport.converter.ttnn_support import PINNED_TTNN_VERSION, import_ttnn
from vidport.converter.core.tensorbin import BLOCK_MANTISSA, DTYPES, LAYOUTS, padded_shape, write_tensorbin

TTNN_MANIFEST = "ttnn_manifest.json"
FORMAT = "vidport-ttnn/1"

Encoder = Callable[[Path, np.ndarray, str, str], None]


def pick_encoder() -> tuple[str, Encoder]:
    """(name, function writing float32 values as a .tensorbin of a dtype and layout)."""
    choice = os.environ.get("VIDPORT_TENSORBIN_ENCODER", "auto")
    ttnn = import_ttnn() if choice in ("auto", "ttnn") else None
    if choice == "ttnn" and ttnn is None:
        raise VidportError("VIDPORT_TENSORBIN_ENCODER=ttnn, but ttnn cannot be imported here")
    if ttnn is None:
        return "vidport", write_tensorbin

    def dump(path: Path, values: np.ndarray, dtype: str, layout: str) -> None:
        writable = np.require(values, requirements=["C", "W"])  # ttnn takes no read-only buffers
        tensor = ttnn.Tensor(writable, getattr(ttnn, dtype), layout=ttnn.TILE_LAYOUT if layout == "TILE" else ttnn.ROW_MAJOR_LAYOUT)
        ttnn.dump_tensor(str(path), tensor)

    return "ttnn.dump_tensor", dump


def check_formats(plan: ConversionPlan) -> None:
    """Every output has a dtype and layout ttnn stores (before any tensor is read)."""
    for name in plan.final.recipes:
        fmt = plan.formats.get(name)
        if fmt is None or fmt.dtype not in DTYPES or fmt.layout not in LAYOUTS or (fmt.dtype in BLOCK_MANTISSA and fmt.layout == "ROW_MAJOR"):
            found = f"{fmt.dtype} {fmt.layout}" if fmt else "no format"
            raise VidportError(f"{name}: {found} is not a TTNN storage format (role {fmt.role if fmt else '?'})",
                               hint=f"dtype one of {', '.join(DTYPES)}; layout one of {', '.join(LAYOUTS)}; "
                                    f"{' and '.join(BLOCK_MANTISSA)} need TILE")


def _write_tensors(plan: ConversionPlan, folder: Path, style, encode: Encoder,
                   progress: Progress | None) -> tuple[dict[str, dict[str, Any]], int]:
    """One file per output tensor, named by the style: (manifest entries, parameter count)."""
    tensors: dict[str, dict[str, Any]] = {}
    parameters = 0
    for name, array in iter_outputs(plan, progress):
        fmt = plan.formats[name]
        if not is_floating(array.dtype):
            raise VidportError(f"{name}: {array.dtype} tensors have no TTNN role format here", hint="give the role a cast")
        values = np.ascontiguousarray(array, dtype=np.float32)
        relative = style.path_for(name, fmt.dtype, fmt.layout)
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        encode(folder / relative, values, fmt.dtype, fmt.layout)
        recipe = plan.final.recipes[name]
        tensors[name] = {"file": relative, "dtype": fmt.dtype, "layout": fmt.layout, "shape": list(values.shape),
                         "padded_shape": list(padded_shape(values.shape, fmt.layout)), **fmt.as_json(),
                         "from": list(recipe.inputs), "source_sha256": hashlib.sha256(values.tobytes()).hexdigest()}
        if recipe.gather_axis is not None:
            tensors[name]["gather_axis"] = recipe.gather_axis
        parameters += int(values.size)
    return tensors, parameters


def write(plan: ConversionPlan, folder: Path, shard_bytes: int, progress: Progress | None) -> dict:
    check_formats(plan)
    style = STYLES[plan.options.get("cache_style", "as_tensor")](plan)
    if hasattr(style, "write_tensors"):  # the style lays the files out itself (tt_dit: fused, per device)
        encoder_name = style.encoder
        tensors, parameters = style.write_tensors(folder, iter_outputs(plan, progress))
    else:
        encoder_name, encode = pick_encoder()
        tensors, parameters = _write_tensors(plan, folder, style, encode, progress)
    (folder / "config.json").write_text(json.dumps(canonical_config_file(plan), indent=2))
    # options left at an empty default (the tt_dit style's mesh and plan) are not recorded
    options = {k: v for k, v in plan.options.items() if "." not in k and v != ""}
    manifest = write_manifest(folder, plan, [folder / TTNN_MANIFEST, folder / "config.json"], {plan.options["dtype"]},
                              len(tensors), parameters,
                              {"ttnn": {**options, "manifest": TTNN_MANIFEST, "encoder": encoder_name,
                                        **({"quantize": plan.block_quantization.as_json()}
                                           if plan.block_quantization else {})}})
    style_info = style.finish(folder, list(tensors), [s["sha256"] for s in manifest["sources"]])
    ttnn_manifest = {
        "format": FORMAT,
        "tensorbin_format": f"ttnn {PINNED_TTNN_VERSION}",
        "family": manifest["family"],
        "canonical": manifest["canonical"],
        "spec": manifest["spec"],
        "target": manifest["target"],
        "config": manifest["config"],
        "options": options,
        "grid": {"x": plan.options["grid.x"], "y": plan.options["grid.y"]},
        "cache_style": {"name": options["cache_style"], **style_info},
        "sources": [{"name": Path(s["path"]).name, "sha256": s["sha256"]} for s in manifest["sources"]],
        "tensors": tensors,
    }
    (folder / TTNN_MANIFEST).write_text(json.dumps(ttnn_manifest, indent=1, sort_keys=True))
    return manifest
