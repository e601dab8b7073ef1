"""The writer of safetensors targets (MLX, Diffusers): weights, config.json and the manifest."""
from __future__ import annotations

import json
from pathlib import Path

from vidport.converter.convert import (ConversionPlan, Progress, canonical_config_file, iter_outputs, parameter_count,
                                      planned_outputs, quantized_part, write_manifest)
from vidport.converter.dtypes import dtype_name
from vidport.converter.safetensors_io import SafetensorsWriter


def write(plan: ConversionPlan, folder: Path, shard_bytes: int, progress: Progress | None) -> dict:
    stem = plan.target.stem_for(plan.library)
    # the layout is known from the plan: headers go first and tensor bytes are written once
    writer = SafetensorsWriter(folder, stem, shard_bytes, plan.target.metadata, layout=planned_outputs(plan))
    dtypes: set[str] = set()
    count = parameters = 0
    for name, array in iter_outputs(plan, progress):
        writer.add(name, array)
        if not quantized_part(plan, name):  # the manifest's dtype is what the model computes in
            dtypes.add(dtype_name(array.dtype))
        count += 1
        parameters += parameter_count(plan, name, array)
    files = writer.close()
    (folder / "config.json").write_text(json.dumps(canonical_config_file(plan), indent=2))
    return write_manifest(folder, plan, files, dtypes, count, parameters)
