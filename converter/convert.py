"""One conversion, end to end: detect, plan from shapes (every check before any tensor is read),
then stream tensor groups through their recipes into an atomic output folder."""
from __future__ import annotations

import datetime
import importlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from vidport.converter.checkpoint import Source, read_checkpoint
from vidport.converter.hashing import file_sha256, hash_in_background
from vidport.converter.detect import Detected, choose_ema, detect
from vidport.converter.dtypes import NAMED_DTYPES, is_floating
from vidport.converter.core.errors import VidportError
from vidport.converter.generators import GENERATORS
from vidport.converter.infer import (ConfigNeeded, assume_defaults, check_given_config, check_limits, finish_expressions,
                                     infer_config, match_variant, public)
from vidport.converter.layouts import TargetLayout, TensorFormat, resolve_options
from vidport.converter.output import atomic_folder
from vidport.converter.plan import Mapping, Recipe, check_expected, check_source_dtypes, map_keys
from vidport.converter.quantize import MODES, BlockPlan, QuantFormat, QuantPlan
from vidport.converter.spec import Catalog, RuleSet, TargetSpec, load_catalog
from vidport.converter.transforms import Shape, run_steps
from vidport.converter.core.manifest import MANIFEST
from vidport.converter.core.named import named_object

DEFAULT_SHARD_BYTES = 5 * 1024**3
# the manifest's `settings_source` where a source spec taken only when its family is named gave the
# settings: the user asserted them by naming the family; nothing in the source records them
SETTINGS_ASSERTED = "asserted by naming the family"
Progress = Callable[[int, int, str], None]


def tool_version() -> str:
    try:
        return metadata.version("vidport")
    except metadata.PackageNotFoundError:
        return "0.1.0"


@dataclass
class ConversionPlan:
    """Everything decided before any tensor is read."""

    source: Source
    detected: Detected
    target: TargetSpec
    config: dict[str, Any]
    variant: str | None
    canonical: Mapping  # source keys -> canonical keys
    final: Mapping  # canonical keys -> target keys (generated ones included)
    dtype: np.dtype | None
    overrides: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # the target's options, resolved (TTNN: dtype, grid ...)
    formats: dict[str, TensorFormat] = field(default_factory=dict)  # output key -> role, layout, dtype
    ema: bool = False  # the source's EMA copies were converted instead of its weights
    assumed: dict[str, Any] = field(default_factory=dict)  # library defaults taken because no variant matched
    quantization: QuantPlan | None = None  # MLX: the linears written quantized (converter/quantize.py)
    block_quantization: BlockPlan | None = None  # TTNN: the tensors --quantize writes in a block format

    @property
    def library(self) -> str:
        """diffusers / transformers: the package a canonical class comes from, also when it is named
        by a sub-module (diffusers.pipelines.ltx2:LTX2LatentUpsamplerModel, which diffusers does not
        export at its top level)."""
        return self.detected.family.canonical.split(":")[0].split(".")[0]


class ResolvedConfig(NamedTuple):
    config: dict[str, Any]
    variant: str | None  # the known release the shapes matched
    assumed: dict[str, Any]  # the family's defaults taken for what no variant or override gave


def _config_section(given: dict[str, Any], section: str | None, where: str) -> dict[str, Any]:
    """The file's config, or its `section` entry where the canonical model is one part of the
    file's (the text_config of a Gemma3ForConditionalGeneration folder)."""
    if section is None:
        return given
    if not isinstance(given.get(section), dict):
        raise VidportError(f"{where}: no '{section}' object, which holds this model's config")
    return given[section]


def resolve_config(detected: Detected, source: Source, canonical_shapes: dict[str, Shape],
                   overrides: dict[str, Any]) -> ResolvedConfig:
    """Config from (in priority order) overrides, the folder's config file, inference from source
    keys, inference from canonical keys, then the matched variant's known values, or, when the
    source has a variant table and none matches, the family's declared defaults (an error names
    what has none); `expr` values that read a value only those give are evaluated last."""
    spec, family = detected.spec, detected.family
    config: dict[str, Any] = {}
    source_shapes = {k: tuple(r.shape) for k, r in detected.tensors.refs.items()}
    if spec.config.from_file:
        where = f"{source.path / spec.config.from_file}"
        config.update({k: v for k, v in _config_section(source.config or {}, spec.config.section, where).items()
                       if not k.startswith("_")})
        check_given_config(spec.config, source_shapes, config, where)
        check_given_config(family.config, canonical_shapes, config, where)
    infer_config(spec.config, source_shapes, spec.path.name, config)
    infer_config(family.config, canonical_shapes, family.path.name, config)
    variant = match_variant(spec.variants, config)
    for key, value in (variant.config if variant else {}).items():
        config.setdefault(key, value)
    config.update(overrides)
    assumed = {} if variant or not spec.variants else assume_defaults(spec.variants, family.defaults, config,
                                                                      f"{source.path.name} ({spec.name})")
    finish_expressions(spec.config, spec.path.name, config)
    finish_expressions(family.config, family.path.name, config)
    check_limits({**family.config.limits, **spec.config.limits}, config, f"{source.path.name} ({spec.name})")
    return ResolvedConfig(config, variant.name if variant else None, assumed)


def expected_shapes(plan_family, target: TargetSpec, config: dict[str, Any]) -> dict[str, Shape]:
    """The parameter shapes the output must have: the MLX runtime model's or the canonical model's.
    The config may come from a file: one the model cannot be built from (no heads, a per-block
    list of the wrong length, heads wider than the width) is one error line, not a traceback."""
    model = plan_family.runtime if target.expected == "runtime" else plan_family.canonical
    try:
        return named_object(target.shapes)(model, config)
    except (TypeError, ValueError, ArithmeticError, IndexError, KeyError) as err:
        raise VidportError(f"config does not fit {model} ({type(err).__name__}: {err})",
                           hint="check the config file's values or --set") from err


@contextmanager
def _naming_assumptions(assumed: dict[str, Any]):
    """A model that does not build (or fit) with assumed defaults says which were assumed."""
    try:
        yield
    except (VidportError, ValueError, TypeError, ArithmeticError) as err:
        if not assumed:
            raise
        message = getattr(err, "message", str(err))
        raise ConfigNeeded(f"{message} (no known release matched, so these were assumed: "
                           + ", ".join(f"{k}={v!r}" for k, v in assumed.items()) + ")", list(assumed)) from err


def plan_conversion(source_path: str | Path, target: str, family: str | None = None, dtype: str | None = None,
                    overrides: dict[str, Any] | None = None, catalog: Catalog | None = None,
                    target_options: dict[str, Any] | None = None, ema: bool | None = None,
                    quantize: QuantFormat | None = None) -> ConversionPlan:
    """`target_options` are the target's own options (TTNN: dtype, grid, cache_style); `ema`
    converts the EMA weights a source keeps (its spec's `unwrap.ema`) instead of its weights,
    False its own weights, None what the spec prefers (`ema.default`, where the file has them);
    `quantize`: the format of the tensors the family declares quantizable (MLX's, or on a target with
    block formats, TTNN, its bits pick one: 8 bfloat8_b, 4 bfloat4_b)."""
    catalog = catalog or load_catalog()
    target_spec = catalog.target(target)
    if dtype is not None and dtype not in NAMED_DTYPES:
        raise VidportError(f"--dtype {dtype}: not supported", hint=f"choose one of {', '.join(NAMED_DTYPES)}")
    if dtype is not None and "dtype" in target_spec.options:
        raise VidportError(f"--dtype {dtype}: target '{target}' sets a dtype per tensor role",
                           hint=f"use its own dtype option ({target_spec.options['dtype'].help or 'dtype'})")
    options = resolve_options(target_spec, target_options or {})
    source = read_checkpoint(source_path)
    detected = detect(source, catalog, family)
    detected, ema = choose_ema(detected, source, ema)
    shapes = {k: tuple(r.shape) for k, r in detected.tensors.refs.items()}
    canonical = map_keys(shapes, detected.spec.rules, detected.spec.path.name)
    config, variant, assumed = resolve_config(detected, source, canonical.shapes, overrides or {})

    with _naming_assumptions(assumed):
        fam = detected.family
        extras = fam.targets.get(target_spec.name)
        rules, what = extras.rules if extras else RuleSet([]), f"{fam.path.name} (target {target})"
        layout = TargetLayout(target_spec, fam, public(config), options)
        check_source_dtypes(canonical, {k: r.dtype for k, r in detected.tensors.refs.items()},
                            layout.role, catalog.float_roles, source.path.name)
        kept = {k: s for k, s in canonical.shapes.items() if layout.omitted(k) is None}
        canonical.dropped += [(k, layout.omitted(k) or "") for k in canonical.shapes if k not in kept]
        final = map_keys(kept, rules, what, pre_steps=layout.steps, identity_default=True)
        formats = layout.add_companions(final, kept) if target_spec.formats else {}
        expected = expected_shapes(fam, target_spec, public(config))
        if target_spec.expected == "canonical":  # the canonical model's tensors through the same rules
            model = {k: s for k, s in expected.items() if layout.omitted(k) is None}
            expected_map = map_keys(model, rules, f"{what}: canonical model", pre_steps=layout.steps, identity_default=True)
            if target_spec.formats:
                layout.add_companions(expected_map, model)
            expected = expected_map.shapes
        for key in sorted(set(expected) - set(final.shapes)):
            for pattern, fn in extras.generate if extras else []:
                if pattern.match(key) is not None:
                    final.recipes[key] = Recipe((), (), generate=fn)
                    final.shapes[key] = tuple(expected[key])
                    if target_spec.formats:
                        formats[key] = layout.format(key)
        def origin(key: str) -> str | None:
            recipe = final.recipes.get(key)
            if recipe is None or not recipe.inputs or recipe.inputs[0] not in canonical.recipes:
                return None
            return ", ".join(canonical.recipes[recipe.inputs[0]].inputs)

        check_expected(final.shapes, expected, f"{source.path.name} -> {target} ({detected.spec.name})", origin)
    quantization = block = None
    if quantize is not None and target_spec.block_formats:
        block = plan_block_formats(layout, target_spec, canonical, final, formats, quantize)
    elif quantize is not None:
        quantization = plan_quantization(layout, target_spec, canonical, final, quantize)
    return ConversionPlan(source, detected, target_spec, config, variant, canonical, final,
                          NAMED_DTYPES[dtype] if dtype else None, overrides or {}, options, formats, ema, assumed,
                          quantization, block)


def _declared(family, bits: int):
    """The family's `quantize:` declaration, refusing a family that declares nothing (or nothing
    worth quantizing: `roles: []`, with its reason)."""
    if family.quantize is None:
        raise VidportError(f"--quantize: the {family.name} family declares nothing to quantize",
                           hint=f"add a `quantize:` section to {family.path.name}, or convert without --quantize")
    if not family.quantize.roles:
        raise VidportError(f"--quantize {bits}: the {family.name} family has nothing to quantize: "
                           f"{family.quantize.why}", hint="convert it without --quantize")
    return family.quantize


def _selected(layout: TargetLayout, canonical: Mapping, final: Mapping):
    """(target key, shape) of each tensor the family's declaration selects, by role and key."""
    family = layout.family
    for key, shape in final.shapes.items():
        recipe = final.recipes[key]
        if recipe.generate or not recipe.inputs or recipe.inputs[0] not in canonical.recipes:
            continue
        if family.quantize.selects(key, layout.role(recipe.inputs[0])):
            yield key, tuple(shape)


def plan_block_formats(layout: TargetLayout, target: TargetSpec, canonical: Mapping, final: Mapping,
                       formats: dict[str, TensorFormat], fmt: QuantFormat) -> BlockPlan:
    """--quantize BITS on a target with block-float formats (TTNN: 8 -> bfloat8_b, 4 -> bfloat4_b):
    the tensors the family declares take that dtype in `formats` (updated here); MLX's modes and
    group sizes are refused, since the block (16 values of a tile's face row) is fixed."""
    takes = ", ".join(f"{bits} ({dtype})" for bits, dtype in sorted(target.block_formats.items(), reverse=True))
    if fmt.mode != "affine" or fmt.group_size != MODES["affine"]["default_group"]:
        raise VidportError(f"--quantize on the {target.name} target: --q-mode / --q-group-size ({fmt.name}) are "
                           f"MLX's formats; {target.name} has its own block formats, one exponent per 16 values",
                           hint=f"--quantize {takes}, without --q-mode / --q-group-size")
    if fmt.bits not in target.block_formats:
        raise VidportError(f"--quantize {fmt.bits}: the {target.name} target has no {fmt.bits}-bit block format",
                           hint=f"--quantize {takes}")
    family = layout.family
    _declared(family, fmt.bits)
    plan = BlockPlan(fmt.bits, target.block_formats[fmt.bits])
    for key, _shape in _selected(layout, canonical, final):
        if formats[key].layout != "TILE":
            plan.kept[key] = f"stored {formats[key].layout}; block formats are tiled"
            continue
        formats[key] = replace(formats[key], dtype=plan.dtype)
        plan.tensors.append(key)
    if not plan.tensors:
        raise VidportError(f"--quantize {fmt.bits}: none of the {family.name} tensors its declaration selects "
                           f"takes {plan.dtype}" + (f" ({next(iter(plan.kept.values()))})" if plan.kept else ""),
                           hint="convert without --quantize")
    return plan


def plan_quantization(layout: TargetLayout, target: TargetSpec, canonical: Mapping, final: Mapping,
                      fmt: QuantFormat) -> QuantPlan:
    """The weights `fmt` applies to: each target tensor whose role and key the family's `quantize:`
    declaration selects, unless its shape does not fit the format (then kept, with the reason)."""
    if target.name != "mlx":
        raise VidportError(f"--quantize {fmt.bits}: MLX's formats are for the mlx target",
                           hint=f"the {target.name} target stores the model's own dtypes: convert without --quantize")
    family = layout.family
    _declared(family, fmt.bits)
    plan = QuantPlan(fmt)
    for key, shape in _selected(layout, canonical, final):
        module = key.rsplit(".", 1)[0]
        reason = fmt.fits(shape)
        if reason is None:
            plan.modules[module] = fmt
        else:
            plan.kept[module] = reason
    if not plan.modules:
        raise VidportError(f"--quantize: none of the {family.name} tensors its declaration selects fits {fmt.name}"
                           + (f" ({next(iter(plan.kept.values()))})" if plan.kept else f" ({family.quantize.why})"),
                           hint="try another --q-group-size, or convert without --quantize")
    return plan


def _groups(plan: ConversionPlan) -> list[list[str]]:
    """Output keys grouped so that each group's source tensors are read once and then freed."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    sources_of: dict[str, set[str]] = {}
    for out, recipe in plan.final.recipes.items():
        sources_of[out] = {s for c in recipe.inputs for s in plan.canonical.recipes[c].inputs}
        anchor = f"out:{out}"
        for s in sources_of[out]:
            parent[find(f"src:{s}")] = find(anchor)
        find(anchor)
    groups: dict[str, list[str]] = {}
    for out in plan.final.recipes:
        groups.setdefault(find(f"out:{out}"), []).append(out)
    return list(groups.values())


def _evaluate(recipe: Recipe, inputs: Callable[[str], np.ndarray]) -> np.ndarray:
    values = [run_steps(list(recipe.steps), inputs(name)) for name in recipe.inputs]
    if recipe.gather_axis is not None:
        return np.concatenate(values, axis=recipe.gather_axis)
    value = values[0]
    return value[recipe.pick] if recipe.pick is not None else value


def iter_outputs(plan: ConversionPlan, progress: Progress | None = None):
    """Yield (target key, array) group by group; memory is bounded by the largest group."""
    refs = plan.detected.tensors.refs
    groups = _groups(plan)
    done = 0
    total = sum(len(g) for g in groups)
    for group in groups:
        loaded: dict[str, np.ndarray] = {}

        def source(name: str) -> np.ndarray:
            if name not in loaded:
                loaded[name] = refs[name].load()
            return loaded[name]

        canonical: dict[str, np.ndarray] = {}

        def canon(name: str) -> np.ndarray:
            if name not in canonical:
                canonical[name] = _evaluate(plan.canonical.recipes[name], source)
            return canonical[name]

        for out in sorted(group):
            recipe = plan.final.recipes[out]
            if recipe.generate:
                array = GENERATORS[recipe.generate](plan.final.shapes[out])
            else:
                array = _evaluate(recipe, canon)
            if plan.dtype is not None and is_floating(array.dtype):
                array = array.astype(plan.dtype)
            if tuple(array.shape) != plan.final.shapes[out]:
                raise VidportError(f"{out}: produced shape {list(array.shape)}, planned {list(plan.final.shapes[out])}")
            done += 1
            if progress:
                progress(done, total, out)
            fmt = _quantized(plan, out)
            if fmt is None:
                yield out, array
            else:
                module = out.rsplit(".", 1)[0]
                for suffix, part in fmt.quantize(array).items():
                    yield f"{module}.{suffix}", part


def _quantized(plan: ConversionPlan, key: str) -> QuantFormat | None:
    """The format `key` is written in, if it is a quantized weight."""
    if plan.quantization is None or not key.endswith(".weight"):
        return None
    return plan.quantization.modules.get(key.rsplit(".", 1)[0])


def planned_outputs(plan: ConversionPlan) -> list[tuple[str, np.dtype, Shape]]:
    """(target key, dtype, shape) of every output, in the order `iter_outputs` yields them.

    Shapes are the plan's; dtypes are a forecast (the first source tensor's dtype, float32 for
    generated tensors, then `--dtype` for floats) that writers may use to lay files out ahead
    of time, and must check against what arrives."""
    refs = plan.detected.tensors.refs
    layout = []
    for group in _groups(plan):
        for out in sorted(group):
            recipe = plan.final.recipes[out]
            sources = [s for c in recipe.inputs for s in plan.canonical.recipes[c].inputs]
            dtype = np.dtype(np.float32) if recipe.generate or not sources else np.dtype(refs[sources[0]].dtype)
            if plan.dtype is not None and is_floating(dtype):
                dtype = plan.dtype
            fmt = _quantized(plan, out)
            if fmt is None:
                layout.append((out, dtype, plan.final.shapes[out]))
            else:
                module = out.rsplit(".", 1)[0]
                layout += [(f"{module}.{suffix}", part_dtype, shape)
                           for suffix, (part_dtype, shape) in fmt.packed(plan.final.shapes[out], dtype).items()]
    return layout


def quantized_part(plan: ConversionPlan, key: str) -> bool:
    """Is `key` one of the packed tensors of a quantized weight (weight, scales, biases)?"""
    module, _, suffix = key.rpartition(".")
    return plan.quantization is not None and suffix in ("weight", "scales", "biases") \
        and module in plan.quantization.modules


def parameter_count(plan: ConversionPlan, key: str, array: np.ndarray) -> int:
    """Parameters a written tensor holds: a quantized weight counts its float shape's, its scales
    and biases none."""
    if not quantized_part(plan, key):
        return int(array.size)
    return int(np.prod(plan.final.shapes[key])) if key.endswith(".weight") else 0


def write_manifest(folder: Path, plan: ConversionPlan, files: list[Path], dtypes: set[str], count: int,
                   parameters: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    detected = plan.detected
    manifest = {
        "tool": "vidport",
        "tool_version": tool_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "family": detected.family.name,
        "canonical": detected.family.canonical,
        "source": str(plan.source.path.absolute()),
        "source_kind": plan.source.format,
        "source_format": detected.spec.source,
        "variant": plan.variant,
        "spec": {"name": detected.spec.name, "version": detected.spec.version, "file": detected.spec.path.name},
        "target": {"name": plan.target.name, "version": plan.target.version},
        "dtype": "+".join(sorted(dtypes)),
        "config": public(plan.config),
        "overrides": plan.overrides,
        "assumed": plan.assumed,
        "ema": plan.ema,
        **({"settings": detected.spec.settings} if detected.spec.settings else {}),
        **({"settings_source": SETTINGS_ASSERTED} if detected.spec.settings and detected.spec.only_when_named else {}),
        **({"quantization": plan.quantization.as_json()} if plan.quantization else {}),
        "sources": [{"path": str(f.absolute()), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
                    for f in plan.source.files],
        "source_wrappers": detected.tensors.wrappers,
        "source_skipped": detected.tensors.skipped,
        "dropped": [{"key": k, "why": why, "tensors": n} for k, why, n in detected.tensors.dropped]
                   + [{"key": k, "why": why} for k, why in plan.canonical.dropped],
        "tensors": count,
        "parameters": parameters,
        "files": sorted(f.name for f in files),
        **(extra or {}),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def canonical_config_file(plan: ConversionPlan) -> dict[str, Any]:
    """config.json as the canonical library writes it, so its own loaders read the folder."""
    class_name = plan.detected.family.canonical.split(":")[1]
    header: dict[str, Any] = {"_class_name": class_name}
    if plan.library == "diffusers":
        try:
            header["_diffusers_version"] = metadata.version("diffusers")
        except metadata.PackageNotFoundError:
            header["_diffusers_version"] = "0.42.1"
    else:
        header = {"architectures": [class_name]}
    return {**header, **public(plan.config)}


def convert(plan: ConversionPlan, out: str | Path, overwrite: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
            progress: Progress | None = None, *, overwrite_any: bool = False,
            notice: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the planned output atomically; returns the manifest. `overwrite` replaces a folder
    vidport wrote, `overwrite_any` anything but a source or the working directory (converter/output.py)."""
    writer_module = importlib.import_module(f"vidport.converter.targets.{plan.target.writer}")
    sources = [plan.source.path, *plan.source.files]
    with atomic_folder(Path(out), overwrite, overwrite_any=overwrite_any, sources=sources, notice=notice) as folder:
        hash_in_background(plan.source.files)  # for the manifest, beside the conversion
        return writer_module.write(plan, folder, shard_bytes, progress)
