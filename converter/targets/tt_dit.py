"""The ``tt_dit`` cache style where a family declares tt-metal's tt_dit layout
(``mappings/<family>/tt_dit/cache.yaml``): the folder ``models/tt_dit``'s ``load_model`` opens as it is.

tt_dit keys a cache by checkpoint, subfolder, mesh and parallel plan
(``$TT_DIT_CACHE_DIR/<checkpoint>/<transformer|transformer_2>/TP<t>_<axis>_SP<s>_<axis>_mesh<R>x<C>_bf16[_FSDP]/``)
and its ``Module.load`` reads one ``<dotted.name>.tensorbin`` per ``Parameter``, checking dtype, layout,
memory config and the per-device shape against the model it builds for that plan. So this style
renames and fuses vidport's TTNN outputs into tt_dit's parameters, lays each out as tt_dit's
``_prepare_torch_state`` does, and writes it as ``Module.save`` does: a distributed host tensor, one
shard per device of the mesh (``ttnn.create_mesh_mapper``; replicated shards stored once), by
``ttnn.dump_tensor(mode=LOCAL)``. What goes where is the family's YAML; this module holds the
spec language: renames with captures, ``interleave`` (per tensor-parallel device), transforms
(``zero_extend``, ``zero_pad``, ``flatten_from``, ``prepare_conv3d_weights``), per-parameter table
``lookups``, ``mesh_axes``, the plan table, the parallel config the cache key names, ``unused``
inputs (what tt_dit's ``_prepare_torch_state`` pops) and a subfolder named by a hash of looked-up
values (the VAE's ``conv3d_blocking_hash``).

Families without that file keep the flat layout (``cache_styles.TtDit``: canonical names, one
device). Needs ttnn (a multi-device file has no writer in vidport's own codec) and torch (rope.pt).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from vidport.converter.core.errors import VidportError, listing
from vidport.converter.core.named import named_object
from vidport.converter.infer import public
from vidport.converter.patterns import Condition, Pattern, Template, compile_condition, compile_pattern, compile_template
from vidport.converter.transforms import Step, parse_step, register, run_steps, shape_steps

LAYOUT_FILE = Path("tt_dit") / "cache.yaml"
MESH_SYMBOLS = ("tp", "sp", "fsdp")
LAYOUTS = ("TILE", "ROW_MAJOR")
DTYPES = ("bfloat16", "float32")
# parallel/config.py DiTParallelConfig, fields in order -> the plan's factor (cfg_parallel: the Wan pipeline's None)
DIT_PARALLEL_CONFIG: tuple[tuple[str, str | None], ...] = (("cfg_parallel", None), ("tensor_parallel", "tp"),
                                                           ("sequence_parallel", "sp"))


# --------------------------------------------------------------------------- two transforms


def _zero_extend_shape(shape: tuple[int, ...], axis: int, times: int) -> tuple[int, ...]:
    out = list(shape)
    out[axis] *= times
    return tuple(out)


def _zero_extend(array: np.ndarray, axis: int, times: int) -> np.ndarray:
    zeros = np.zeros(_zero_extend_shape(array.shape, axis, times - 1), dtype=array.dtype)
    return np.concatenate([array, zeros], axis=axis)


def _flatten_from_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    if not 0 < axis < len(shape):
        raise ValueError(f"flatten_from {axis} does not fit a {len(shape)}-d tensor of shape {list(shape)}")
    return (*shape[:axis], int(np.prod(shape[axis:], dtype=np.int64)))


def _check_zero_extend(params: Any) -> str | None:
    ok = isinstance(params, dict) and set(params) == {"axis", "times"} and all(isinstance(v, int) for v in params.values())
    return None if ok and params["times"] >= 1 else "zero_extend takes {axis: N, times: N >= 1}"


# [.., n, ..] -> [.., n * times, ..]: zeros after the values (tt_dit's RowParallelLinear bias, which
# only the first tensor-parallel device adds before the reduce-scatter)
register("zero_extend", _zero_extend, _zero_extend_shape, _check_zero_extend)
# [a, b, c, d] with 1 -> [a, b * c * d]: merge the axes from one on (torch.flatten(start_dim=axis))
register("flatten_from", lambda a, axis: np.ascontiguousarray(a).reshape(_flatten_from_shape(a.shape, axis)),
         _flatten_from_shape, lambda p: None if isinstance(p, int) else "flatten_from takes one axis", param="axis")


def _zero_pad_shape(shape: tuple[int, ...], axis: int, multiple: int) -> tuple[int, ...]:
    out = list(shape)
    out[axis] = -(-out[axis] // multiple) * multiple
    return tuple(out)


def _zero_pad(array: np.ndarray, axis: int, multiple: int) -> np.ndarray:
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, _zero_pad_shape(array.shape, axis, multiple)[axis] - array.shape[axis])
    return np.pad(array, widths)


def _check_ints(name: str, keys: set[str]) -> Callable[[Any], str | None]:
    def check(params: Any) -> str | None:
        ok = isinstance(params, dict) and set(params) == keys and all(isinstance(v, int) for v in params.values())
        return None if ok else f"{name} takes {{{', '.join(sorted(keys))}}} (integers)"
    return check


# [.., n, ..] -> [.., n rounded up to `multiple`, ..]: zeros after the values (tt_dit's
# aligned_channels padding of VAE channels to 32)
register("zero_pad", _zero_pad, _zero_pad_shape, _check_ints("zero_pad", {"axis", "multiple"}))


def _conv3d_shape(shape: tuple[int, ...], c_in_block: int, alignment: int) -> tuple[int, ...]:
    if len(shape) != 5:
        raise ValueError(f"prepare_conv3d_weights takes a [O, I, kD, kH, kW] weight, not {list(shape)}")
    out, c_in, kd, kh, kw = shape
    aligned = -(-c_in // alignment) * alignment
    block = c_in_block or aligned
    if aligned % block:
        raise ValueError(f"C_in_aligned {aligned} is not divisible by C_in_block {block}")
    return (kd * kh * kw * aligned, out)


def _prepare_conv3d(array: np.ndarray, c_in_block: int, alignment: int) -> np.ndarray:
    """ttnn.experimental.prepare_conv3d_weights (groups 1, prepare_conv3d_weights.cpp): [O, I, kD,
    kH, kW] -> [kD, kH, kW, I, O], I zero-padded to `alignment`, then rows regrouped C_in_block by
    C_in_block ([blocks, kD, kH, kW, C_in_block, O]) and flattened to [rows, O]. 0 = one block."""
    rows, out = _conv3d_shape(array.shape, c_in_block, alignment)
    value = _zero_pad(np.transpose(array, (2, 3, 4, 1, 0)), 3, alignment)
    kd, kh, kw, aligned, _ = value.shape
    block = c_in_block or aligned
    value = value.reshape(kd, kh, kw, aligned // block, block, out).transpose(3, 0, 1, 2, 4, 5)
    return np.ascontiguousarray(value).reshape(rows, out)


register("prepare_conv3d_weights", _prepare_conv3d, _conv3d_shape,
         _check_ints("prepare_conv3d_weights", {"c_in_block", "alignment"}))


def interleave(arrays: list[np.ndarray], axis: int, devices: int, parts: int = 1) -> np.ndarray:
    """Lay the inputs (or `parts` equal pieces of one input) out along `axis` so that splitting it
    evenly over `devices` gives device d its d-th slice of every input in turn: tt_dit's
    ``_interleave_heads`` (attention_wan.py: fused QKV / KV, each device its own heads of q, k and v)
    and the time_proj regrouping (embeddings.py: each device its slice of the 6 modulation groups)."""
    if parts > 1:
        if len(arrays) != 1 or arrays[0].shape[axis] % parts:
            raise ValueError(f"cannot cut {len(arrays)} input(s) of shape {[list(a.shape) for a in arrays]} in {parts} parts")
        arrays = np.split(arrays[0], parts, axis=axis)
    uneven = [list(a.shape) for a in arrays if a.shape[axis] % devices]
    if uneven:
        raise ValueError(f"axis {axis} of {uneven} does not split over {devices} tensor-parallel devices")
    pieces = [np.split(a, devices, axis=axis) for a in arrays]
    return np.concatenate([piece[d] for d in range(devices) for piece in pieces], axis=axis)


# --------------------------------------------------------------------------- the layout spec


@dataclass(frozen=True)
class ParameterRule:
    """One tt_dit Parameter family: its name, the outputs it is made from and how it is stored."""

    name: Template
    inputs: tuple[Pattern | Template, ...]  # the first a pattern over output names, the others filled from it
    interleave: dict[str, int] | None
    transforms: tuple[Any, ...]  # raw entries: their `{tp}` / `{sp}` are filled per plan
    dtype: str
    layout: str
    mesh_axes: tuple[str | None, ...] | None
    lookups: dict[str, "Lookup"]
    where: str


@dataclass(frozen=True)
class Lookup:
    """A per-parameter value read from one of the layout's `tables` (tt_dit's blocking tables), keyed by
    a template over the first input's shape (`dim0`, `dim1`, ...); `default` where the key is absent."""

    table: str
    key: Template
    default: Template

    def value(self, tables: dict[str, dict[str, int]], shape: tuple[int, ...]) -> int:
        dims = {f"dim{i}": str(n) for i, n in enumerate(shape)}
        return int(tables[self.table].get(self.key.render(dims), self.default.render(dims)))


@dataclass(frozen=True)
class SubfolderHash:
    """The subfolder named `prefix` + the first `length` hex digits of sha256 over a looked-up value of
    every parameter that has it, joined by `_`, in module order (utils/conv3d.py conv3d_blocking_hash)."""

    prefix: str
    of: str
    length: int


@dataclass(frozen=True)
class TtDitLayout:
    path: Path
    tt_metal: dict[str, Any]
    dtype_key: str
    subfolders: tuple[str, ...]
    plans: dict[str, dict[str, Any]]
    requires: tuple[tuple[Condition, str], ...]
    extras: dict[str, str]
    parameters: tuple[ParameterRule, ...]
    # the load_model parallel config: (field name, tp | sp) in order; whether FSDP exists (and keys the folder)
    parallel_config: tuple[tuple[str, str | None], ...] = DIT_PARALLEL_CONFIG
    fsdp: bool = True
    tables: dict[str, dict[str, int]] | None = None
    unused: tuple[tuple[Pattern, str], ...] = ()
    subfolder_hash: SubfolderHash | None = None
    writes_subfolder: str | None = None  # the subfolder tt_dit names, where it is not the source's
    also: tuple[str, ...] = ()  # further layouts (files beside this one) the same conversion writes


def _listed(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def load_layout(path: Path, inherited: dict[str, dict[str, int]] | None = None) -> TtDitLayout:
    """Read and check a family's tt_dit/cache.yaml (or a layout it names under `also`, which sees its
    `tables` too: `inherited`); errors name the file and the entry."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise VidportError(f"{path}: not valid YAML ({err})") from err
    rules = []
    tables = {**(inherited or {}),
              **{str(name): {str(k): int(v) for k, v in table.items()} for name, table in (data.get("tables") or {}).items()}}
    for index, entry in enumerate(data.get("parameters") or []):
        where = f"{path.parent.parent.name}/{path.parent.name}/{path.name}: parameters[{index}]"
        unknown = set(entry) - {"name", "from", "interleave", "transforms", "dtype", "layout", "mesh_axes", "lookup"}
        if unknown or "name" not in entry or "from" not in entry:
            raise VidportError(f"{where}: needs name and from; unknown field(s) {sorted(unknown)}")
        sources = _listed(entry["from"])
        if len(sources) > 1 and not entry.get("interleave"):
            raise VidportError(f"{where}: {len(sources)} inputs need `interleave` to say how they are laid out")
        mesh_axes = entry.get("mesh_axes")
        if mesh_axes is not None and any(a is not None and a not in MESH_SYMBOLS for a in mesh_axes):
            raise VidportError(f"{where}: mesh_axes {mesh_axes}: each one of {', '.join(MESH_SYMBOLS)} or null")
        dtype, layout = entry.get("dtype", "bfloat16"), entry.get("layout", "TILE")
        if dtype not in DTYPES or layout not in LAYOUTS:
            raise VidportError(f"{where}: {dtype} {layout}: tt_dit Parameters here are {'/'.join(DTYPES)}, {'/'.join(LAYOUTS)}")
        lookups = {}
        for value, spec in (entry.get("lookup") or {}).items():
            if set(spec) != {"table", "key", "default"} or spec["table"] not in tables:
                raise VidportError(f"{where}: lookup {value} takes {{table, key, default}} naming one of the "
                                   f"layout's tables ({', '.join(tables) or 'none'})")
            lookups[value] = Lookup(spec["table"], compile_template(spec["key"]), compile_template(spec["default"]))
        rules.append(ParameterRule(compile_template(entry["name"]),
                                   (compile_pattern(sources[0]), *map(compile_template, sources[1:])),
                                   entry.get("interleave"), tuple(entry.get("transforms") or ()), dtype, layout,
                                   tuple(mesh_axes) if mesh_axes is not None else None, lookups, where))
    requires = tuple((compile_condition(r["when"]), r["why"]) for r in data.get("requires") or [])
    fields = data.get("parallel_config") or dict(DIT_PARALLEL_CONFIG)
    if any(axis not in ("tp", "sp", None) for axis in fields.values()):
        raise VidportError(f"{path}: parallel_config {fields}: each field's factor is tp, sp or null (unset)")
    hashed = data.get("subfolder_hash")
    return TtDitLayout(path, data.get("tt_metal") or {}, data["dtype_key"], tuple(data["subfolders"]),
                       {str(k): v for k, v in (data.get("plans") or {}).items()}, requires,
                       data.get("extras") or {}, tuple(rules), tuple(fields.items()), bool(data.get("fsdp", True)),
                       tables, tuple((compile_pattern(u["from"]), u["why"]) for u in data.get("unused") or []),
                       SubfolderHash(hashed["prefix"], hashed["of"], int(hashed["length"])) if hashed else None,
                       data.get("writes_subfolder"), tuple(data.get("also") or ()))


def family_layout(plan) -> Path:
    return plan.detected.family.path.parent / LAYOUT_FILE


# --------------------------------------------------------------------------- mesh and plan


@dataclass(frozen=True)
class MeshPlan:
    """A mesh and tt_dit's DiTParallelConfig on it (cfg_parallel unset, as the Wan pipeline has it)."""

    shape: tuple[int, int]
    tp_axis: int
    sp_axis: int
    fsdp: bool

    @property
    def tp(self) -> int:
        return self.shape[self.tp_axis]

    @property
    def sp(self) -> int:
        return self.shape[self.sp_axis]

    def axis(self, symbol: str | None) -> int | None:
        """tp / sp / fsdp -> mesh axis (fsdp: the sp axis with --fsdp, else not split)."""
        return {None: None, "tp": self.tp_axis, "sp": self.sp_axis, "fsdp": self.sp_axis if self.fsdp else None}[symbol]

    def factor(self, axis: str) -> tuple[int, int]:
        """tp / sp -> (factor, mesh axis), a ParallelFactor."""
        return (self.tp, self.tp_axis) if axis == "tp" else (self.sp, self.sp_axis)

    def key(self, dtype_key: str, fields: tuple[tuple[str, str | None], ...] = DIT_PARALLEL_CONFIG) -> str:
        """utils/cache.py model_cache_dir: config_id (the parallel config's fields in order, unset ones
        skipped: each name's initials upper-cased, then factor_axis_) + mesh, dtype, _FSDP."""
        rows, cols = self.shape
        config_id = "".join("{}{}_{}_".format("".join(w[0].upper() for w in name.split("_")), *self.factor(axis))
                            for name, axis in fields if axis is not None)
        key = f"{config_id}mesh{rows}x{cols}_{dtype_key}"
        return key + "_FSDP" if self.fsdp else key

    def as_json(self, fields: tuple[tuple[str, str | None], ...] = DIT_PARALLEL_CONFIG) -> dict[str, Any]:
        factors = {name: dict(zip(("factor", "mesh_axis"), self.factor(axis))) if axis else None for name, axis in fields}
        return {"mesh": list(self.shape), **factors, "is_fsdp": self.fsdp}


def mesh_plan(options: dict[str, Any], plans: dict[str, dict[str, Any]], fsdp_exists: bool = True) -> MeshPlan:
    """--ttnn-mesh RxC [--tp-axis A --sp-axis B --fsdp]; unset parts from tt_dit's table for that mesh
    (`fsdp_exists` false: a model tt_dit loads without FSDP, e.g. its VAE and text encoder)."""
    mesh = options.get("mesh") or "1x1"
    rows, _, cols = mesh.partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise VidportError(f"--ttnn-mesh {mesh}: not ROWSxCOLS", hint="e.g. --ttnn-mesh 2x4 (ttnn.MeshShape(2, 4))")
    given = {k: options.get(k) or None for k in ("tp_axis", "sp_axis", "fsdp")}
    default = plans.get(mesh)
    if default is None and not (given["tp_axis"] and given["sp_axis"]):
        raise VidportError(f"--ttnn-mesh {mesh}: tt_dit's Wan pipeline has no parallel plan for this mesh",
                           hint=f"give --tp-axis and --sp-axis (and --fsdp), or use one of {', '.join(plans)}")
    default = default or {"fsdp": False}
    tp_axis = int(given["tp_axis"]) if given["tp_axis"] else int(default["tp_axis"])
    sp_axis = int(given["sp_axis"]) if given["sp_axis"] else int(default["sp_axis"])
    fsdp = given["fsdp"] == "true" if given["fsdp"] else bool(default.get("fsdp"))
    if fsdp and not fsdp_exists:
        if given["fsdp"]:
            raise VidportError("--fsdp: tt_dit loads this model without FSDP (load_model is_fsdp False)",
                               hint="leave out --fsdp: its weights are not split over the sequence axis")
        fsdp = False
    if {tp_axis, sp_axis} != {0, 1}:
        raise VidportError(f"--tp-axis {tp_axis} --sp-axis {sp_axis}: tt_dit splits heads and sequence over "
                           "different mesh axes", hint="one of them 0, the other 1")
    return MeshPlan((int(rows), int(cols)), tp_axis, sp_axis, fsdp)


def cache_location(source: Path, subfolders: tuple[str, ...]) -> tuple[str, str]:
    """(checkpoint name, subfolder) as tt_dit's pipeline keys them: os.path.basename of the Hub name it
    loads from, and the pipeline folder's transformer / transformer_2. Read off the Diffusers folder
    converted: <name>/transformer, a Hub cache's models--org--<name>/snapshots/<hash>/transformer,
    or a lone transformer folder <name> (then subfolder `transformer`)."""
    if not source.is_dir():
        raise VidportError(f"{source.name}: a tt_dit cache is keyed by the Diffusers checkpoint's name and "
                           "subfolder, which a single file does not say",
                           hint="convert the Diffusers folder (<checkpoint>/transformer, <checkpoint>/transformer_2)")
    if source.name not in subfolders:
        return source.name, subfolders[0]
    parent = source.parent
    hub = parent.parent
    if hub.name == "snapshots" and hub.parent.name.startswith("models--"):
        return hub.parent.name.split("--")[-1], source.name
    return parent.name, source.name


# --------------------------------------------------------------------------- one parameter


@dataclass(frozen=True)
class Job:
    name: str
    rule: ParameterRule
    inputs: tuple[str, ...]


def _jobs(layout: TtDitLayout, outputs: list[str]) -> list[Job]:
    """Every tt_dit parameter the outputs make; each output used once, every input present."""
    jobs, used = [], {}
    unused = {key for key in outputs if any(pattern.match(key) is not None for pattern, _ in layout.unused)}
    for rule in layout.parameters:
        for key in outputs:
            values = rule.inputs[0].match(key)
            if values is None or key in unused:
                continue
            inputs = (key, *(t.render(values) for t in rule.inputs[1:]))
            missing = [i for i in inputs if i not in outputs]
            if missing:
                raise VidportError(f"{rule.where}: {rule.name.render(values)} needs {listing(missing)}, which the "
                                   "conversion does not make")
            for i in inputs:
                if i in used:
                    raise VidportError(f"{rule.where}: {i} is already used by {used[i]}")
                used[i] = rule.name.render(values)
            jobs.append(Job(rule.name.render(values), rule, inputs))
    left = sorted(set(outputs) - set(used) - unused)
    if left:
        raise VidportError(f"tt_dit layout ({layout.path.name}): {len(left)} tensor(s) have no tt_dit parameter: {listing(left)}",
                           hint="tt_dit's model has no such module (Wan: no CLIP image branch, so Wan 2.1 I2V 14B "
                                "does not load there); use another --cache-style for it")
    return jobs


def _steps(rule: ParameterRule, context: dict[str, Any]) -> list[Step]:
    from vidport.converter.layouts import substitute

    return [parse_step(substitute(entry, context, rule.where)) for entry in rule.transforms]


def build(job: Job, arrays: list[np.ndarray], plan: MeshPlan, looked_up: dict[str, int] | None = None) -> np.ndarray:
    """The total tensor of one tt_dit parameter from its inputs (role layouts applied); `looked_up`:
    the rule's lookups for this parameter, placeholders of its transforms like `{tp}`."""
    rule = job.rule
    try:
        if rule.interleave:
            value = interleave(arrays, rule.interleave["axis"], plan.tp, rule.interleave.get("parts", 1))
        else:
            value = arrays[0]
        context = {"tp": plan.tp, "sp": plan.sp, **(looked_up or {})}
        return np.ascontiguousarray(run_steps(_steps(rule, context), value))
    except ValueError as err:
        raise VidportError(f"{job.name}: {err}", hint=f"{rule.where}; mesh {plan.shape}, tp {plan.tp}") from err


def mesh_axes(job: Job, shape: tuple[int, ...], plan: MeshPlan) -> tuple[int | None, ...]:
    """tp/sp/fsdp per tensor axis -> mesh axes, checked as tt_dit's Parameter checks them."""
    symbols = job.rule.mesh_axes or (None,) * len(shape)
    if len(symbols) != len(shape):
        raise VidportError(f"{job.name}: mesh_axes {list(symbols)} for a {len(shape)}-d tensor {list(shape)}",
                           hint=job.rule.where)
    axes = tuple(plan.axis(s) for s in symbols)
    for dim, axis in enumerate(axes):
        if axis is not None and shape[dim] % plan.shape[axis]:
            raise VidportError(f"{job.name}: shape {list(shape)} cannot be evenly distributed over mesh "
                               f"{list(plan.shape)} along mesh axis {axis} and tensor dimension {dim}",
                               hint="layers/module.py Parameter: tt_dit could not build this model for that mesh either")
    return axes


def local_shape(shape: tuple[int, ...], axes: tuple[int | None, ...], mesh: tuple[int, int]) -> list[int]:
    return [n // mesh[a] if a is not None else n for n, a in zip(shape, axes)]


def mesh_dumper() -> Callable[[Path, np.ndarray, str, str, tuple[int, int], tuple[int | None, ...]], None]:
    """Write a total tensor as tt_dit's Module.save does: ``utils/tensor.py from_torch`` (a mesh mapper
    whose placements invert the tensor's mesh_axes, host tensor, DRAM memory config), then
    ``ttnn.dump_tensor(mode=DumpTensorMode.LOCAL)``."""
    from vidport.converter.ttnn_support import import_ttnn

    ttnn = import_ttnn()
    try:
        import torch
    except ImportError:
        torch = None
    if ttnn is None or torch is None:
        raise VidportError("the tt_dit style writes per-device shards with ttnn.dump_tensor, and needs ttnn and torch",
                           hint="pip install 'vidport[ttnn,reference]' (ttnn 0.81.1: CPython 3.10 / 3.12 on Linux)")

    def dump(path: Path, values: np.ndarray, dtype: str, layout: str, mesh: tuple[int, int],
             axes: tuple[int | None, ...]) -> None:
        placements = [None] * len(mesh)  # utils/tensor.py _invert_placements
        for dim, axis in enumerate(axes):
            if axis is not None:
                placements[axis] = dim
        mapper = ttnn.create_mesh_mapper(ttnn.MeshShape(*mesh), ttnn.MeshMapperConfig(
            [ttnn.PlacementShard(p) if p is not None else ttnn.PlacementReplicate() for p in placements]))
        tensor = ttnn.from_torch(torch.from_numpy(np.require(values, np.float32, ["C", "W"])), dtype=getattr(ttnn, dtype),
                                 layout=ttnn.TILE_LAYOUT if layout == "TILE" else ttnn.ROW_MAJOR_LAYOUT,
                                 memory_config=ttnn.DRAM_MEMORY_CONFIG, mesh_mapper=mapper)
        ttnn.dump_tensor(str(path), tensor, mode=ttnn.DumpTensorMode.LOCAL)

    return dump


def _empty_state_dict(path: Path) -> None:
    """rope.pt: ``torch.save(self.rope.state_dict())`` of diffusers' WanRotaryPosEmbed, whose
    freqs_cos / freqs_sin are non-persistent buffers (an empty OrderedDict)."""
    import torch

    torch.save(OrderedDict(), path)


EXTRAS = {"empty_state_dict": _empty_state_dict}


# --------------------------------------------------------------------------- the style


class _Part:
    """One tt_dit model's keyed folder: a layout's parameters, made from the outputs it claims."""

    def __init__(self, plan, layout: TtDitLayout, outputs: list[str]) -> None:
        self.layout = layout
        self.mesh = mesh_plan(plan.options, layout.plans, layout.fsdp)
        values = {k: str(int(v)) for k, v in public(plan.config).items() if isinstance(v, (int, bool))}
        values.update(tp=str(self.mesh.tp), sp=str(self.mesh.sp))
        for condition, why in layout.requires:
            if not condition.holds(values):
                raise VidportError(f"tt_dit cannot build this model for mesh {'x'.join(map(str, self.mesh.shape))}, "
                                   f"tp {self.mesh.tp}: {condition.text} does not hold", hint=why)
        self.checkpoint, self.subfolder = cache_location(plan.source.path, layout.subfolders)
        self.subfolder = layout.writes_subfolder or self.subfolder
        self.jobs = _jobs(layout, outputs)
        self.looked_up = {job.name: {value: lookup.value(layout.tables or {}, tuple(plan.final.shapes[job.inputs[0]]))
                                     for value, lookup in job.rule.lookups.items()} for job in self.jobs}
        hashed = layout.subfolder_hash
        if hashed is not None:  # in module order: the canonical model's parameter order (its state dict)
            modules = list(named_object(plan.target.shapes)(plan.detected.family.canonical, public(plan.config)))
            order = sorted((modules.index(j.inputs[0]), self.looked_up[j.name][hashed.of]) for j in self.jobs
                           if hashed.of in self.looked_up[j.name])
            digest = hashlib.sha256("_".join(str(v) for _, v in order).encode()).hexdigest()
            self.subfolder = hashed.prefix + digest[:hashed.length]
        self.folder = f"{self.checkpoint}/{self.subfolder}/{self.mesh.key(layout.dtype_key, layout.parallel_config)}"

    def info(self) -> dict[str, Any]:
        return {"cache_dir": self.folder, "model_name": self.checkpoint, "subfolder": self.subfolder,
                "parallel_config": self.mesh.as_json(self.layout.parallel_config),
                "extras": sorted(self.layout.extras), "tt_metal": self.layout.tt_metal}


class TtDitCache:
    """The keyed tt_dit cache folder(s) under DIR (DIR is what TT_DIT_CACHE_DIR names): the family's
    layout, and those it names under `also` (one conversion, several tt_dit models: the Wan VAE's
    decoder and encoder)."""

    encoder = "ttnn.dump_tensor(mode=LOCAL), distributed host tensors"

    def __init__(self, plan) -> None:
        self.plan = plan
        if plan.options.get("dtype") != "bfloat16" or plan.block_quantization is not None:
            raise VidportError("the tt_dit style writes tt_dit's own dtypes (bfloat16, float32 where it builds float32)",
                               hint="leave out --ttnn-dtype and --quantize: tt_dit's Parameters would reject other dtypes")
        main = load_layout(family_layout(plan))
        layouts = [main, *(load_layout(main.path.parent / name, main.tables) for name in main.also)]
        outputs = list(plan.final.recipes)
        self.parts = [_Part(plan, layout, outputs) for layout in layouts]
        self.job_of: dict[str, tuple[_Part, Job]] = {}
        for part in self.parts:
            for job in part.jobs:
                for name in job.inputs:
                    if name in self.job_of:
                        raise VidportError(f"{name} is claimed by {self.job_of[name][0].layout.path.name} and "
                                           f"{part.layout.path.name}", hint="one tt_dit parameter per output")
                    self.job_of[name] = (part, job)
        self.dump = mesh_dumper()  # before any file is written: ttnn and torch are there

    def write_tensors(self, folder: Path, outputs) -> tuple[dict[str, dict[str, Any]], int]:
        """Consume the plan's outputs (name, float array) and write each tt_dit parameter once all its
        inputs are in; memory holds the inputs of unfinished parameters only. Outputs no layout
        claims (its `unused`) are skipped."""
        held: dict[str, np.ndarray] = {}
        tensors: dict[str, dict[str, Any]] = {}
        parameters = 0
        for part in self.parts:
            (folder / part.folder).mkdir(parents=True, exist_ok=True)
        for name, array in outputs:
            if name not in self.job_of:
                continue
            part, job = self.job_of[name]
            held[name] = np.asarray(array, dtype=np.float32)
            if not all(i in held for i in job.inputs):
                continue
            value = build(job, [held.pop(i) for i in job.inputs], part.mesh, part.looked_up[job.name])
            axes = mesh_axes(job, value.shape, part.mesh)
            relative = f"{part.folder}/{job.name}.tensorbin"
            self.dump(folder / relative, value, job.rule.dtype, job.rule.layout, part.mesh.shape, axes)
            key = job.name if part is self.parts[0] else f"{part.subfolder}/{job.name}"
            tensors[key] = {
                "file": relative, "dtype": job.rule.dtype, "layout": job.rule.layout, "shape": list(value.shape),
                "local_shape": local_shape(value.shape, axes, part.mesh.shape),
                "mesh_axes": list(job.rule.mesh_axes or [None] * value.ndim), "from": list(job.inputs),
                **({"looked_up": part.looked_up[job.name]} if part.looked_up[job.name] else {}),
                "source_sha256": hashlib.sha256(value.tobytes()).hexdigest()}
            parameters += int(value.size)
        unwritten = sorted(j.name for part in self.parts for j in part.jobs
                           if (j.name if part is self.parts[0] else f"{part.subfolder}/{j.name}") not in tensors)
        if unwritten:
            raise VidportError(f"tt_dit layout: {listing(unwritten)} not written (inputs never produced)")
        return tensors, parameters

    def finish(self, folder: Path, names: list[str], source_hashes: list[str]) -> dict[str, Any]:
        for part in self.parts:
            for file, how in part.layout.extras.items():
                EXTRAS[how](folder / part.folder / file)
        info = {"TT_DIT_CACHE_DIR": ".", **self.parts[0].info()}
        if len(self.parts) > 1:
            info["also"] = [part.info() for part in self.parts[1:]]
        return info


def tt_dit_style(plan, flat: type):
    """The family's tt_dit layout where it declares one, else `flat` (canonical names, one device)."""
    if family_layout(plan).is_file():
        return TtDitCache(plan)
    if any(plan.options.get(k) for k in ("mesh", "tp_axis", "sp_axis", "fsdp")):
        raise VidportError(f"family {plan.detected.family.name} has no tt_dit layout, so no per-device shards",
                           hint=f"--ttnn-mesh / --tp-axis / --sp-axis / --fsdp need mappings/<family>/{LAYOUT_FILE}")
    return flat(plan)
