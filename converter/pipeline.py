"""Convert a whole pipeline (AnimateDiff, SD 1.5) into one folder: each component by its family's
own specs into a sub-folder (unet/, motion_adapter/, vae/, text_encoder/), the tokenizer and the
scheduler config beside them, model_index.json and one manifest listing the components'.

Every component is planned, the components' configs checked against each other, the tokenizer
and scheduler found, before any tensor is read; the folder is written atomically as a whole.
"""
from __future__ import annotations

import datetime
import importlib
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from vidport.converter.checkpoint import read_checkpoint
from vidport.converter.core.named import named_object
from vidport.converter.convert import MANIFEST, ConversionPlan, Progress, plan_conversion, tool_version
from vidport.converter.detect import detect, holds_part
from vidport.converter.spec import load_catalog
from vidport.converter.core.errors import VidportError
from vidport.converter.core.jsonfile import read_json_object
from vidport.converter.hashing import hash_in_background
from vidport.converter.infer import ConfigNeeded, public
from vidport.converter.output import Notice, atomic_folder, copy_files, source_files
from vidport.converter.quantize import QuantFormat
from vidport.converter.pipeline_spec import Component, Layout, PipelineSpec, pipeline_spec

SCHEDULER_FILE = "scheduler/scheduler_config.json"
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # a fast tokenizer, or BPE files


@dataclass
class PipelinePlan:
    """Everything decided before any tensor is read."""

    spec: PipelineSpec
    target: str
    sources: dict[str, Path]  # input name (sd, motion) -> path
    layouts: dict[str, Layout]  # input name -> the layout that fits it
    components: dict[str, ConversionPlan]  # sub-folder -> its conversion
    tokenizer: Path | None = None  # the folder copied to tokenizer/
    scheduler: dict[str, Any] = field(default_factory=dict)  # scheduler_config.json as written
    scheduler_from: str = "default"  # the file it was read from, or "default" (the spec's)
    copies: dict[str, Path] = field(default_factory=dict)  # part -> the file or folder copied as it is
    index_values: dict[str, Any] = field(default_factory=dict)  # the spec's model_index_from_source, read
    files: dict[str, list[tuple[Path, Path]]] = field(default_factory=dict)  # copied part -> its files, checked
    absent: dict[str, str] = field(default_factory=dict)  # optional component the sources lack -> why
    classes: dict[str, tuple[str, str]] = field(default_factory=dict)  # component -> the class it was taken as

    @property
    def total_tensors(self) -> int:
        return sum(len(plan.final.recipes) for plan in self.components.values())


def split_overrides(spec: PipelineSpec, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`--set text_encoder.num_attention_heads=12` -> {text_encoder: {num_attention_heads: 12}}."""
    names = [c.name for c in spec.components]
    found: dict[str, dict[str, Any]] = {name: {} for name in names}
    for key, value in overrides.items():
        component, _, option = key.partition(".")
        if component not in found or not option:
            raise VidportError(f"--set {key}: a pipeline's overrides name their component",
                               hint=f"write COMPONENT.KEY=VALUE with COMPONENT one of {', '.join(names)}, "
                                    "e.g. --set text_encoder.num_attention_heads=12")
        found[component][option] = value
    return found


def _layout(spec: PipelineSpec, input_name: str, source: Path) -> Layout:
    entry = spec.inputs[input_name]
    for layout in entry.layouts:
        if layout.fits(source):
            return layout
    tried = ", ".join(f"{layout.name} ({'a folder with ' + layout.has if layout.has else 'a file' if layout.file else 'any'})"
                      for layout in entry.layouts)
    raise VidportError(f"{source}: not a source the {spec.name} pipeline reads as {input_name}", hint=f"expected {tried}")


def _holder(spec: PipelineSpec, part: str, layouts: dict[str, Layout] | None = None) -> str:
    """The input that holds `part`: the first given input whose layout names it (an LTX-2 Diffusers
    folder holds latent_upsampler/, an original file leaves it to --input upsampler=FILE), else the
    first input whose layouts can name it, else the first input."""
    if layouts:
        given = next((name for name, layout in layouts.items() if part in layout.parts), None)
        if given is not None:
            return given
    return next((name for name, entry in spec.inputs.items() if any(part in layout.parts for layout in entry.layouts)),
                next(iter(spec.inputs)))


def _part(spec: PipelineSpec, sources: dict[str, Path], layouts: dict[str, Layout], part: str) -> Path | None:
    """Where `part` lies in its input's source, or None where no given source's layout has such a part."""
    holder = _holder(spec, part, layouts)
    if holder not in layouts:
        return None
    relative = layouts[holder].parts.get(part)
    if relative is None:
        return None
    return sources[holder] / relative if relative else sources[holder]


def _absent(spec: PipelineSpec, component: Component, path: Path | None) -> bool:
    """An optional component the sources lack: no such part, or a single file that holds the other
    models but none of this one's keys (an LTX-2 file without its audio VAE and vocoder)."""
    if path is None or not path.exists():
        return True
    catalog = load_catalog()
    return path.is_file() and not any(holds_part(read_checkpoint(path), catalog.family(family))
                                      for family, _ in component.choices())


def _choose(component: Component, path: Path) -> tuple[str, tuple[str, str]]:
    """The component's (family, class): the first whose specs detect the part; the first choice
    where none does (its conversion then says why)."""
    if not component.alternatives:
        return component.choices()[0]
    source, catalog = read_checkpoint(path), load_catalog()
    for family, library_class in component.choices():
        try:
            detect(source, catalog, family)
        except VidportError:
            continue
        return family, library_class
    return component.choices()[0]


def _ema(family: str, wanted: bool | None) -> bool | None:
    """--ema / --no-ema concern the components whose family keeps EMA copies in some source format
    (Self-Forcing's generator_ema, an LDM file's model_ema.*); the others convert their weights."""
    return wanted if any(source.ema is not None for source in load_catalog().family(family).sources) else None


def _tokenizer(spec: PipelineSpec, sources: dict[str, Path], layouts: dict[str, Layout],
               given: Path | None, components: dict[str, ConversionPlan]) -> Path | None:
    if spec.tokenizer_class is None:
        return None
    if spec.tokenizer_follows is not None and spec.tokenizer_follows not in components:
        return None  # no text encoder converted: nothing would use a tokenizer
    option = spec.tokenizer_option or "--tokenizer"
    if given is None:
        found = _part(spec, sources, layouts, "tokenizer")
        if found is None or not found.exists():
            holder = _holder(spec, "tokenizer", layouts)
            layout = layouts[holder].name
            raise VidportError(f"{found or sources[holder]}: a{'n' if layout[0] in 'aeiou' else ''} {layout} source "
                               "carries no tokenizer",
                               hint=f"pass {option} DIR: a {spec.tokenizer_class[1]} folder (a Diffusers pipeline's "
                                    "tokenizer/, with tokenizer.json or vocab.json + merges.txt)")
        given = found
    given = Path(given)
    if not given.is_dir() or not any(all((given / name).exists() for name in files) for files in TOKENIZER_FILES):
        raise VidportError(f"{given}: not a tokenizer folder (no tokenizer.json, nor vocab.json + merges.txt)",
                           hint=f"{option} takes a folder as transformers' save_pretrained writes it")
    return given


def _scheduler(spec: PipelineSpec, sources: dict[str, Path], layouts: dict[str, Layout],
               target: str) -> tuple[dict[str, Any], str]:
    if not spec.scheduler_default:
        return {}, "default"
    found = _part(spec, sources, layouts, "scheduler")
    if found is not None and found.exists():
        config = {**read_json_object(found), **spec.scheduler_set}
        origin = str(found.absolute())
    else:
        config, origin = dict(spec.scheduler_default), "default"
    if spec.scheduler_check and target == "mlx":  # the MLX pipeline will run it: refuse now what it cannot
        try:
            named_object(spec.scheduler_check)(config)
        except ValueError as err:
            raise VidportError(f"scheduler config ({origin}): {err}") from err
    return config, origin


def plan_pipeline(pipeline: str | PipelineSpec, sources: dict[str, str | Path], target: str = "mlx",
                  dtype: str | None = None, overrides: dict[str, Any] | None = None, tokenizer: str | Path | None = None,
                  target_options: dict[str, Any] | None = None, ema: bool | None = None,
                  quantize: QuantFormat | None = None) -> PipelinePlan:
    """`sources` by the spec's input names (sd, motion); `overrides` as COMPONENT.KEY; `ema` as
    plan_conversion takes it, for the components whose family keeps EMA copies (`_ema`);
    `quantize` for the components whose family quantizes in pipelines (the denoisers)."""
    spec = pipeline_spec(pipeline) if isinstance(pipeline, str) else pipeline
    for name, entry in spec.inputs.items():
        if sources.get(name) is None and not entry.optional:
            raise VidportError(f"the {spec.name} pipeline needs {entry.help or name}",
                               hint=f"pass it with {entry.option or '--input ' + name + '=PATH'}")
    unknown = sorted(set(sources) - set(spec.inputs))
    if unknown:
        raise VidportError(f"the {spec.name} pipeline takes no {', '.join(unknown)}")
    paths = {name: Path(path) for name, path in sources.items() if path is not None}
    for name, path in paths.items():
        if not path.exists():
            raise VidportError(f"{path}: no such file or folder")
    layouts = {name: _layout(spec, name, path) for name, path in paths.items()}
    per_component = split_overrides(spec, overrides or {})
    components: dict[str, ConversionPlan] = {}
    absent: dict[str, str] = {}
    classes: dict[str, tuple[str, str]] = {}
    for component in spec.components:
        path = _part(spec, paths, layouts, component.name)
        if component.optional and _absent(spec, component, path):
            absent[component.name] = component.why  # e.g. a Wan 2.1 folder has no transformer_2
            continue
        if path is None or not path.exists():
            input_name = _holder(spec, component.name, layouts)
            if input_name not in paths:
                entry = spec.inputs[input_name]
                raise VidportError(f"the {spec.name} pipeline needs {entry.help or input_name} for the {component.name}",
                                   hint=f"pass it with {entry.option or '--input ' + input_name + '=PATH'}")
            raise VidportError(f"{paths[input_name]}: its {layouts[input_name].name} layout has no "
                               f"{layouts[input_name].parts.get(component.name) or component.name} for the {component.name}")
        family, classes[component.name] = _choose(component, path)
        try:
            components[component.name] = plan_conversion(path, target, family, dtype, per_component[component.name],
                                                         target_options=target_options, ema=_ema(family, ema),
                                                         quantize=_quantize(family, quantize))
        except ConfigNeeded as err:
            raise err.for_component(component.name, family) from err
        except VidportError as err:
            raise VidportError(f"{component.name} ({family}): {err.message}", hint=err.hint) from err
    configs = {name: public(plan.config) for name, plan in components.items()}
    for check in spec.checks:
        named_object(check)(configs)
    scheduler, origin = _scheduler(spec, paths, layouts, target)
    copies = {part: found for part in spec.copy
              if (found := _part(spec, paths, layouts, part)) is not None and found.exists()}
    tokenizer_folder = _tokenizer(spec, paths, layouts, tokenizer, components)
    files = {part: source_files(found, paths[_holder(spec, part, layouts)]) for part, found in copies.items()}
    if tokenizer_folder is not None:  # --tokenizer is followed where it points; inside a source, regular files only
        named = Path(os.path.realpath(tokenizer_folder)) if tokenizer is not None else None
        files["tokenizer"] = [(relative, found) for relative, found in
                              source_files(named or tokenizer_folder, named or paths[_holder(spec, "tokenizer", layouts)])
                              if not spec.tokenizer_files or any(relative.match(g) for g in spec.tokenizer_files)]
    return PipelinePlan(spec, target, paths, layouts, components, tokenizer_folder, scheduler, origin, copies,
                        _index_values(spec, paths, layouts), files, absent, classes)


def _quantize(family: str, fmt: QuantFormat | None) -> QuantFormat | None:
    """`--quantize` reaches the components whose family declares `quantize.pipeline` (the DiT, the
    UNet, the motion module); text encoders and VAEs stay float."""
    declared = load_catalog().family(family).quantize
    return fmt if fmt is not None and declared is not None and declared.pipeline else None


def _index_values(spec: PipelineSpec, sources: dict[str, Path], layouts: dict[str, Layout]) -> dict[str, Any]:
    """The spec's `model_index_from_source` entries, from the source's model_index.json where it
    has one (its layout's part `model_index`), else the spec's defaults."""
    if not spec.model_index_from_source:
        return {}
    found = _part(spec, sources, layouts, "model_index")
    index: dict[str, Any] = {}
    if found is not None and found.exists():
        index = read_json_object(found)
    return {key: index.get(key, default) for key, default in spec.model_index_from_source.items()}


def _model_index(plan: PipelinePlan) -> dict[str, Any]:
    """model_index.json as diffusers writes it for this pipeline class."""
    try:
        version = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        version = "0.42.1"
    index: dict[str, Any] = {"_class_name": plan.spec.diffusers_class, "_diffusers_version": version}
    for component in plan.spec.components:
        index[component.name] = list(plan.classes[component.name]) if component.name in plan.components else [None, None]
    if plan.tokenizer is not None:
        index["tokenizer"] = list(plan.spec.tokenizer_class)
    if plan.scheduler:
        index["scheduler"] = ["diffusers", plan.scheduler["_class_name"]]
    index.update(plan.spec.model_index)
    index.update(plan.index_values)
    if plan.target != "diffusers":
        index["_vidport_target"] = plan.target  # weights in the target's layout, not diffusers'
    return dict(sorted(index.items()))


def convert_pipeline(plan: PipelinePlan, out: str | Path, overwrite: bool = False,
                     shard_bytes: int = 5 * 1024**3, progress: Progress | None = None, *, overwrite_any: bool = False,
                     notice: Notice | None = None) -> dict[str, Any]:
    """Write the planned pipeline folder atomically; returns its manifest. `overwrite` and
    `overwrite_any` as converter/output.py's atomic_folder takes them."""
    total, done = plan.total_tensors, 0

    def report(component: str) -> Callable[[int, int, str], None]:
        def step(count: int, _total: int, name: str) -> None:
            if progress:
                progress(done + count, total, f"{component}/{name}")
        return step

    sources = [*plan.sources.values(), *plan.copies.values(), *([plan.tokenizer] if plan.tokenizer else []),
               *(f for component in plan.components.values() for f in (component.source.path, *component.source.files))]
    with atomic_folder(Path(out), overwrite, overwrite_any=overwrite_any, sources=sources, notice=notice) as folder:
        hash_in_background(f for component in plan.components.values() for f in component.source.files)
        manifests: dict[str, dict[str, Any]] = {}
        for name, component in plan.components.items():
            (folder / name).mkdir()
            writer = importlib.import_module(f"vidport.converter.targets.{component.target.writer}")
            manifests[name] = writer.write(component, folder / name, shard_bytes, report(name))
            done += len(component.final.recipes)
        for part, files in plan.files.items():  # tokenizer/, image_processor/: regular files only
            copy_files(files, folder / part)
        if plan.scheduler:
            (folder / "scheduler").mkdir()
            (folder / SCHEDULER_FILE).write_text(json.dumps(plan.scheduler, indent=2))
        (folder / "model_index.json").write_text(json.dumps(_model_index(plan), indent=2))
        return write_pipeline_manifest(folder, plan, manifests)


def write_pipeline_manifest(folder: Path, plan: PipelinePlan, manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec = plan.spec
    manifest = {
        "tool": "vidport",
        "tool_version": tool_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kind": "pipeline",
        "pipeline": spec.name,
        "diffusers_class": spec.diffusers_class,
        "spec": {"name": spec.name, "version": spec.version, "file": spec.path.name},
        "target": {"name": plan.target},
        "dtype": "+".join(sorted({m["dtype"] for m in manifests.values()})),
        "inputs": {name: {"path": str(path.absolute()), "layout": plan.layouts[name].name}
                   for name, path in plan.sources.items()},
        "components": {name: {"folder": name, "family": m["family"], "manifest": f"{name}/{MANIFEST}",
                              "source": m["source"], "spec": m["spec"]["name"], "variant": m["variant"],
                              "dtype": m["dtype"], "parameters": m["parameters"]}
                       for name, m in manifests.items()},
        "tokenizer": ({"folder": "tokenizer", "from": str(plan.tokenizer.absolute()),
                       "class": list(spec.tokenizer_class)} if plan.tokenizer is not None else None),
        "scheduler": ({"file": SCHEDULER_FILE, "from": plan.scheduler_from, "class": plan.scheduler["_class_name"]}
                      if plan.scheduler else None),
        "copied": {part: str(found.absolute()) for part, found in plan.copies.items()},
        "absent": plan.absent,
        "tensors": sum(m["tensors"] for m in manifests.values()),
        "parameters": sum(m["parameters"] for m in manifests.values()),
    }
    if manifests:
        manifest["target"] = next(iter(manifests.values()))["target"]
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
