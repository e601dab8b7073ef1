"""Build the TTNN model of a converted folder on an ops backend, loading every tensor strictly.

A model runs the cache styles whose layouts it reads: by default those that keep the ttnn
target's role layouts (`as_tensor`, `model_cache`, and `tt_dit` where the family declares no tt_dit
layout of its own); a style the family redefines (`sd_demo`'s role table, a `tt_dit/cache.yaml`)
only where the model class lists it in `cache_styles`. `runtime_class` refuses the others before
anything is built, so `vidport verify` says so up front. A model reading tt_dit's parameters
(`parameter_layout = "tt_dit"`) reads other styles' folders through the family's tt_dit layout:
fusions and packings composed on the host from the converted values, exactly; and a tt_dit cache
for a mesh with its per-device shards put back together (ttnn reads those files), each tensor
whole, still in the tensor-parallel layout the model undoes.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError, closest
from vidport.converter.core.manifest import MANIFEST, read_manifest
from vidport.runtime.ttnn.module import TTNN_MANIFEST, Module, Parameters
from vidport.runtime.ttnn.ops import Ops, Tensor

# cache styles that store the ttnn target's role layouts unless the family redefines them
TARGET_LAYOUT_STYLES = ("as_tensor", "model_cache", "tt_dit")


def make_ops(device: bool = False) -> Ops:
    """The emulator (any machine), or real ttnn on card 0."""
    if device:
        from vidport.runtime.ttnn.device import DeviceOps

        return DeviceOps()
    from vidport.runtime.ttnn.emulator import EmulatorOps

    return EmulatorOps()


def _family(folder: Path, manifest: dict[str, Any]) -> Any:
    from vidport.converter.spec import load_catalog

    try:
        return load_catalog().family(manifest["family"])
    except VidportError as err:
        raise VidportError(f"{folder / MANIFEST}: {err.message}", hint=err.hint) from err


def _tt_dit_layout(family: Any) -> Path:
    from vidport.converter.targets.tt_dit import LAYOUT_FILE

    return family.path.parent / LAYOUT_FILE


def runnable_styles(model: type, family: Any) -> tuple[str, ...]:
    """The cache styles `model` reads: its `cache_styles`, else the target-layout styles the family keeps."""
    declared = getattr(model, "cache_styles", None)
    if declared is not None:
        return tuple(declared)
    extras = family.targets.get("ttnn")
    own = set(extras.styles if extras else ()) | ({"tt_dit"} if _tt_dit_layout(family).is_file() else set())
    return tuple(s for s in TARGET_LAYOUT_STYLES if s not in own)


def _mesh(folder: Path) -> list[int]:
    """The mesh a tt_dit-layout cache was sharded for (ttnn_manifest.json's cache_style.parallel_config)."""
    try:
        found = json.loads((folder / TTNN_MANIFEST).read_text())["cache_style"]["parallel_config"]["mesh"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VidportError(f"{folder / TTNN_MANIFEST}: no cache_style.parallel_config.mesh ({err})",
                           hint="reconvert the folder with --cache-style tt_dit") from err
    return list(found)


def runtime_class(folder: str | Path, manifest: dict[str, Any]) -> type:
    """The family's TTNN model class (its `targets.ttnn.runtime`) for a converted folder; refused,
    naming why, where the family has none, the model does not read the folder's cache style, or a
    tt_dit-layout cache for a mesh (multi-device files) is to be read where ttnn is not."""
    folder = Path(folder)
    family = _family(folder, manifest)
    extras = family.targets.get("ttnn")
    style = (manifest.get("ttnn") or {}).get("cache_style", "as_tensor")
    if extras is None or not extras.runtime:
        raise VidportError(f"{folder}: family {family.name} has no TTNN model, so its {style} cache cannot be run "
                           "or verified", hint=f"a TTNN model is named by targets: ttnn: runtime: in {family.path}")
    module, name = extras.runtime.split(":")
    model = getattr(importlib.import_module(module), name)
    styles = runnable_styles(model, family)
    if style not in styles:
        raise VidportError(f"{folder}: a {style} cache, whose layouts {family.name}'s TTNN model ({extras.runtime}) "
                           f"does not read; it reads {', '.join(styles)}",
                           hint=f"to run or verify it, convert with --cache-style {styles[0]}")
    if getattr(model, "parameter_layout", None) == "tt_dit" and not _tt_dit_layout(family).is_file():
        raise VidportError(f"{folder}: {extras.runtime} reads tt_dit's parameters, and family {family.name} has no "
                           f"tt_dit layout ({_tt_dit_layout(family).relative_to(family.path.parent.parent)}) to "
                           "read its tensors by", hint=f"{family.name} has no TTNN model of its own")
    if getattr(model, "parameter_layout", None) == "tt_dit" and style == "tt_dit" and _mesh(folder) != [1, 1]:
        from vidport.converter.ttnn_support import import_ttnn

        if import_ttnn() is None:
            raise VidportError(f"{folder}: a tt_dit cache sharded for mesh {'x'.join(map(str, _mesh(folder)))}, whose "
                               "multi-device files only ttnn reads, and ttnn cannot be imported here",
                               hint="install ttnn (CPython 3.10 / 3.12, Linux), or convert with no --ttnn-mesh (1x1)")
    return model


class TtDitView(Parameters):
    """Another cache style's folder read by tt_dit's parameter names: each tt_dit parameter made from
    the converted tensors its rule in the family's tt_dit/cache.yaml names, laid out for one device
    (tp 1: no head interleave, no bias padding).
    A parameter that is one file as it is loads as that file; a fused or repacked one is composed
    on the host from the files' exact values (concatenations and reshapes: nothing is rounded, so
    bfloat8_b weights stay the values the card would hold)."""

    def __init__(self, params: Parameters, layout_file: Path) -> None:
        from vidport.converter.targets.tt_dit import MeshPlan, _jobs, load_layout

        self.folder, self.manifest, self.ops, self.taken = params.folder, params.manifest, params.ops, params.taken
        self.inner = params
        self.plan = MeshPlan((1, 1), 1, 0, False)
        self.jobs = {job.name: job for job in _jobs(load_layout(layout_file), list(params.entries))}
        self.entries = {name: {} for name in self.jobs}

    def take(self, name: str, optional: bool = False) -> Tensor | None:
        from vidport.converter.core.tensorbin import read_tensorbin
        from vidport.converter.targets.tt_dit import build

        job = self.jobs.get(name)
        if job is None:
            if optional:
                return None
            near = closest(name, self.jobs)
            raise VidportError(f"{self.folder}: the model needs {name}, which the conversion's tt_dit layout lacks",
                               hint=f"closest: {near}" if near else None)
        entries = [self.inner.entries[i] for i in job.inputs]
        self.taken.update(job.inputs)
        rule = job.rule
        if len(job.inputs) == 1 and not rule.interleave and not rule.transforms and entries[0]["layout"] == rule.layout:
            return self.ops.parameter(self.folder / entries[0]["file"], entries[0])
        dtypes = {e["dtype"] for e in entries}
        if len(dtypes) != 1:
            raise VidportError(f"{self.folder}: {name} fuses {', '.join(job.inputs)}, stored in {sorted(dtypes)}",
                               hint="a fused tt_dit parameter needs its parts in one dtype")
        values = []
        for entry in entries:
            found, info = read_tensorbin(self.folder / entry["file"])
            if (info["dtype"], list(info["logical_shape"])) != (entry["dtype"], entry["shape"]):
                raise VidportError(f"{self.folder / entry['file']}: holds {info['dtype']} "
                                   f"{list(info['logical_shape'])}, the manifest says {entry['dtype']} {entry['shape']}")
            values.append(found)
        return self.ops.host_parameter(build(job, values, self.plan), dtypes.pop(), rule.layout)


class MeshShards(Parameters):
    """A tt_dit cache for a mesh: each file's per-device shards (ttnn.load_tensor, ttnn.dump_tensor's
    LOCAL format) placed back at their mesh coordinates along the tensor axes its manifest entry's
    mesh_axes names (tp, sp, fsdp: the parallel config's mesh axes), giving the whole tensor."""

    def __init__(self, folder: Path, ops: Ops) -> None:
        super().__init__(folder, ops)
        plan = self.manifest["cache_style"]["parallel_config"]
        sp_axis = plan["sequence_parallel"]["mesh_axis"]
        self.axes = {None: None, "tp": plan["tensor_parallel"]["mesh_axis"], "sp": sp_axis,
                     "fsdp": sp_axis if plan["is_fsdp"] else None}

    def take(self, name: str, optional: bool = False) -> Tensor | None:
        from vidport.converter.ttnn_support import import_ttnn

        if name not in self.entries:
            return super().take(name, optional)  # the same refusal
        self.taken.add(name)
        entry = self.entries[name]
        ttnn = import_ttnn()
        tensor = ttnn.load_tensor(str(self.folder / entry["file"]))
        axes = [self.axes[a] for a in entry["mesh_axes"]]
        total = np.zeros(entry["shape"], dtype=np.float32)
        for coord, shard in zip(tensor.tensor_topology().mesh_coords(), ttnn.get_device_tensors(tensor)):
            coord = tuple(coord)
            wanted = (getattr(ttnn, entry["dtype"]), getattr(ttnn, f"{entry['layout']}_LAYOUT"))
            if (shard.dtype, shard.layout) != wanted:
                raise VidportError(f"{self.folder / entry['file']}: a {shard.dtype} {shard.layout} shard, the manifest "
                                   f"says {entry['dtype']} {entry['layout']}")
            local = entry["local_shape"]
            index = tuple(slice(coord[a] * n, (coord[a] + 1) * n) if a is not None else slice(None)
                          for a, n in zip(axes, local))
            total[index] = ttnn.to_torch(shard).float().numpy()
        return self.ops.host_parameter(total, entry["dtype"], entry["layout"])


def load_model(folder: str | Path, ops: Ops | None = None) -> Module:
    """The family's TTNN model (its `targets.ttnn.runtime`) over the folder's converted tensors."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["target"]["name"] != "ttnn":
        raise VidportError(f"{folder}: not a TTNN conversion", hint="convert with --target ttnn")
    model = runtime_class(folder, manifest)
    style = (manifest.get("ttnn") or {}).get("cache_style", "as_tensor")
    tt_dit = getattr(model, "parameter_layout", None) == "tt_dit"
    sharded = tt_dit and style == "tt_dit" and _mesh(folder) != [1, 1]
    params = MeshShards(folder, ops or make_ops()) if sharded else Parameters(folder, ops or make_ops())
    view = params
    if tt_dit and style != "tt_dit":
        view = TtDitView(params, _tt_dit_layout(_family(folder, manifest)))
    try:
        built = model.from_config(manifest["config"], view)
    except TypeError as err:
        raise VidportError(f"config does not fit {model.__module__}.{model.__name__}: {err}") from err
    params.check_all_taken()
    return built

