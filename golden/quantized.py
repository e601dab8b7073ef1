"""What a quantized port is held to: each layer that is, or holds, a quantized layer by its format's
thresholds (golden/metrics.py, keyed by the format's name); every other layer, run on the
reference's own inputs, still by its float dtype's. A pipeline folder by its denoisers' format."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from vidport.converter.core.errors import VidportError
from vidport.golden.metrics import PIPELINE_THRESHOLDS, THRESHOLDS, Threshold


def measured(name: str) -> Threshold:
    """The per-layer thresholds of format `name`: only measured ones exist."""
    if name not in THRESHOLDS:
        raise VidportError(f"no per-layer thresholds measured for {name}",
                           hint="golden/metrics.py's THRESHOLDS lists the measured formats")
    return THRESHOLDS[name]


def layer_thresholds(manifest: dict[str, Any]) -> Callable[[str], tuple[str, Threshold] | None] | None:
    """Module path -> (format, thresholds) for the layers a quantized folder's manifest quantizes and
    those holding them ("" is the whole model); None where the folder is not quantized. A layer
    holding several formats is held to the loosest."""
    from vidport.converter.quantize import read_quantization

    formats = {path: fmt.name for path, fmt in read_quantization(manifest).items()}
    if not formats:
        return None
    table = {name: measured(name) for name in set(formats.values())}

    def of(module: str) -> tuple[str, Threshold] | None:
        held = {name for path, name in formats.items()
                if not module or path == module or path.startswith(module + ".")}
        if not held:
            return None
        loosest = min(held, key=lambda name: table[name].min_pcc)
        return loosest, table[loosest]

    return of


def pipeline_format(folder: Path) -> str | None:
    """The format of a pipeline folder's quantized components (the denoisers), None if all float;
    several formats: the loosest, by its pipeline thresholds."""
    from vidport.runtime.pipelines.folder import PipelineFolder

    names = {manifest["quantization"]["name"] for manifest in PipelineFolder.open(folder).components.values()
             if manifest.get("quantization")}
    for name in names:
        if name not in PIPELINE_THRESHOLDS:
            raise VidportError(f"{folder}: no pipeline thresholds measured for {name}",
                               hint="golden/metrics.py's PIPELINE_THRESHOLDS lists the measured formats")
    return min(names, key=lambda name: PIPELINE_THRESHOLDS[name].min_step_pcc, default=None)
