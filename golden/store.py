"""Golden files: a reference run saved as safetensors (every probe input and every layer's inputs
and output) plus a JSON manifest (order, plain arguments, seed, versions). Reading one needs
neither torch nor diffusers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.converter.safetensors_io import SafetensorsWriter, read_safetensors
from vidport.reference.probe import Probe
from vidport.golden.records import Call

FORMAT = "vidport-golden/1"


def _split(value: Any, prefix: str, tensors: dict[str, np.ndarray]) -> Any:
    """Replace arrays by references into the tensor file; keep plain values."""
    if isinstance(value, np.ndarray):
        tensors[prefix] = value
        return {"tensor": prefix}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {"dict": {k: _split(v, f"{prefix}.{k}", tensors) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise VidportError(f"cannot store a {type(value).__name__} in a golden file ({prefix})")


def _join(spec: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(spec, list):
        return [_join(v, tensors) for v in spec]
    if "tensor" in spec:
        return tensors[spec["tensor"]].load()
    if "dict" in spec:
        return {k: _join(v, tensors) for k, v in spec["dict"].items()}
    return spec["value"]


def save_golden(path: Path, probes: list[Probe], calls: list[Call], info: dict[str, Any]) -> None:
    path = Path(path)
    tensors: dict[str, np.ndarray] = {}
    manifest = {
        "format": FORMAT,
        **info,
        "probes": [{"module": p.module, "args": _split(p.args, f"probe{i}.args", tensors),
                    "kwargs": _split(p.kwargs, f"probe{i}.kwargs", tensors), "method": p.method}
                   for i, p in enumerate(probes)],
        "calls": [{"name": c.name, "module": c.module, "kind": c.kind,
                   "args": _split(c.args, f"call{i}.args", tensors), "kwargs": _split(c.kwargs, f"call{i}.kwargs", tensors),
                   "output": _split(c.output, f"call{i}.output", tensors)} for i, c in enumerate(calls)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = SafetensorsWriter(path.parent, path.name + ".partial", shard_bytes=1 << 62)
    for name, array in tensors.items():
        writer.add(name, np.asarray(array, order="C"))
    (written,) = writer.close()
    written.replace(path)
    manifest_path(path).write_text(json.dumps(manifest, indent=1))


def manifest_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def load_golden(path: Path) -> tuple[list[Probe], list[Call], dict[str, Any]]:
    path = Path(path)
    if not path.exists() or not manifest_path(path).exists():
        raise VidportError(f"{path}: golden file or its manifest {manifest_path(path).name} is missing")
    manifest = json.loads(manifest_path(path).read_text())
    if manifest.get("format") != FORMAT:
        raise VidportError(f"{path}: not a {FORMAT} golden file")
    tensors, _ = read_safetensors(path)
    probes = [Probe(p["module"], _join(p["args"], tensors), _join(p["kwargs"], tensors), p.get("method"))
              for p in manifest["probes"]]
    calls = [Call(c["name"], c["module"], c["kind"], _join(c["args"], tensors), _join(c["kwargs"], tensors),
                  _join(c["output"], tensors)) for c in manifest["calls"]]
    info = {k: v for k, v in manifest.items() if k not in ("probes", "calls")}
    return probes, calls, info
