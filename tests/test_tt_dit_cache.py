"""Issue 16, tt_dit: `vidport convert wan-dit SRC --target ttnn --cache-style tt_dit --ttnn-mesh RxC ...`
writes the folder tt-metal's tt_dit Wan 2.1 / 2.2 pipeline loads as it is.

What tt_dit's loader would check is re-derived here from tt-metal's code (tenstorrent/tt-metal,
models/tt_dit/; the commit of each file read is in mappings/wan-dit/tt_dit/cache.yaml), not from the
converter: the module tree and its Parameters (name, total shape, mesh_axes, dtype, layout), the
torch-state preparation that fills them, the cache folder name. Every file is then loaded with the
real `ttnn.load_tensor` (host, mock cluster) and each device's shard is compared with the slice of
the re-derived tensor at its mesh coordinate; the shards put back together and the fusions undone
equal diffusers' own tensors. Planted faults (unfused QKV, no head interleave, a wrong dtype, a
missing shard) fail the same check.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from fixtures.tt_dit_rules import Param

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

# 4 heads of 32 (D = 128): DistributedLayerNorm / RMSNorm need D % (32 * tp) == 0 for tp = 4.
SMALL = {"attention_head_dim": 32, "ffn_dim": 256}

# (mesh, tp_axis, sp_axis, is_fsdp): one device (no --ttnn-mesh), then pipelines/wan/pipeline_wan.py
# create_pipeline's plans: Blackhole's table, then Wormhole's 2x4 and 4x8
PLANS = [((1, 1), 1, 0, False), ((1, 4), 1, 0, True), ((2, 2), 1, 0, True), ((2, 4), 0, 1, False), ((4, 8), 0, 1, False),
         ((4, 32), 0, 1, False), ((2, 4), 1, 0, True), ((4, 8), 0, 1, True)]


# --------------------------------------------------------------------------- tt_dit, re-derived


def tt_dit_parameters(config: dict, tp_axis: int, sp_axis: int, mesh: tuple[int, int], fsdp: bool) -> dict[str, Param]:
    """The Parameters WanTransformer3DModel (models/transformers/wan2_2/transformer_wan.py) builds."""
    heads, dim = config["num_attention_heads"], config["num_attention_heads"] * config["attention_head_dim"]
    tp = mesh[tp_axis]
    fsdp_axis = sp_axis if fsdp else None  # transformer_wan.py / attention_wan.py: FSDP over the sp axis
    params: dict[str, Param] = {}

    def linear(name, n_in, n_out, dtype="bfloat16"):  # layers/linear.py Linear: replicated
        params[f"{name}.weight"] = Param((n_in, n_out), (None, None), dtype)
        params[f"{name}.bias"] = Param((1, n_out), (None, None), dtype)

    def col(name, n_in, n_out, dtype="bfloat16", fsdp_axis=fsdp_axis):  # ColParallelLinear
        params[f"{name}.weight"] = Param((n_in, n_out), (fsdp_axis, tp_axis), dtype)
        params[f"{name}.bias"] = Param((1, n_out), (None, tp_axis), dtype)

    def row(name, n_in, n_out, dtype="bfloat16", fsdp_axis=fsdp_axis):  # RowParallelLinear: bias [1, out * ndev]
        params[f"{name}.weight"] = Param((n_in, n_out), (tp_axis, fsdp_axis), dtype)
        params[f"{name}.bias"] = Param((1, n_out * tp), (None, tp_axis), dtype)

    kt, kh, kw = config["patch_size"]
    # layers/embeddings.py WanPatchEmbed(tp_mesh_axis=tp)
    params["patch_embedding.proj_weight"] = Param((kt * kh * kw * config["in_channels"], dim), (None, tp_axis))
    params["patch_embedding.proj_bias"] = Param((1, dim), (None, tp_axis))
    # WanTimeTextImageEmbedding(timestep_dtype=float32 default): TimestepEmbedding, time_proj, text_embedder
    linear("condition_embedder.time_embedder.linear_1", config["freq_dim"], dim, "float32")
    col("condition_embedder.time_embedder.linear_2", dim, dim, "float32", fsdp_axis=None)
    row("condition_embedder.time_proj", dim, 6 * dim, "float32", fsdp_axis=None)
    linear("condition_embedder.text_embedder.linear_1", config["text_dim"], dim)
    linear("condition_embedder.text_embedder.linear_2", dim, dim)
    assert heads % tp == 0 and dim % (32 * tp) == 0  # attention_wan.py / normalization.py asserts
    for n in range(config["num_layers"]):
        block = f"blocks.{n}"
        for attn in ("attn1", "attn2"):  # attention_wan.py WanAttention
            for norm in ("norm_q", "norm_k"):  # normalization.py DistributedRMSNorm: [1, D] TILE on tp
                params[f"{block}.{attn}.{norm}.weight"] = Param((1, dim), (None, tp_axis))
            col(f"{block}.{attn}.to_out", dim, dim)
        col(f"{block}.attn1.to_qkv", dim, 3 * dim)
        col(f"{block}.attn2.to_q", dim, dim)
        col(f"{block}.attn2.to_kv", dim, 2 * dim)
        for p in ("weight", "bias"):  # DistributedLayerNorm(affine): [D / (32 tp), 32 tp] ROW_MAJOR on tp
            params[f"{block}.norm2.{p}"] = Param((dim // (32 * tp), 32 * tp), (None, tp_axis), layout="ROW_MAJOR")
        col(f"{block}.ffn.ff1", dim, config["ffn_dim"])  # layers/feedforward.py ParallelFeedForward
        row(f"{block}.ffn.ff2", config["ffn_dim"], dim)
        params[f"{block}.scale_shift_table"] = Param((1, 1, 6, dim), (None, None, None, tp_axis), "float32")
    linear("proj_out", dim, kt * kh * kw * config["out_channels"])
    params["scale_shift_table"] = Param((1, 2, dim), (None, None, tp_axis), "float32")
    return params


def interleave_heads(tensors: list[torch.Tensor], tp: int, heads: int, head_dim: int) -> torch.Tensor:
    """attention_wan.py WanAttention._prepare_torch_state._interleave_heads ([out, in] in and out)."""
    tensors = [t.T.reshape(t.shape[1], tp, heads // tp, head_dim) for t in tensors]
    merged = torch.cat(tensors, dim=2)
    return merged.reshape(merged.shape[0], len(tensors) * heads * head_dim).T


def tt_dit_state(state: dict[str, torch.Tensor], config: dict, tp: int) -> dict[str, torch.Tensor]:
    """diffusers' state dict through tt_dit's _prepare_torch_state methods, as load_torch_state_dict
    runs them: the total tensor each Parameter is filled from."""
    s = {k: v.float() for k, v in state.items()}
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    out: dict[str, torch.Tensor] = {}
    weight = s["patch_embedding.weight"]  # embeddings.py WanPatchEmbed
    out["patch_embedding.proj_weight"] = weight.permute(2, 3, 4, 1, 0).reshape(-1, weight.shape[0])
    out["patch_embedding.proj_bias"] = s["patch_embedding.bias"].reshape(1, -1)

    def linear(name, weight, bias, pad=False):  # linear.py: transpose(0, 1), bias reshape(1, -1)
        out[f"{name}.weight"] = weight.transpose(0, 1)
        bias = bias.reshape(1, -1)
        out[f"{name}.bias"] = torch.cat([bias, torch.zeros(1, bias.shape[1] * (tp - 1))], -1) if pad else bias

    for name in ("time_embedder.linear_1", "time_embedder.linear_2", "text_embedder.linear_1", "text_embedder.linear_2"):
        linear(f"condition_embedder.{name}", s[f"condition_embedder.{name}.weight"], s[f"condition_embedder.{name}.bias"])
    # embeddings.py WanTimeTextImageEmbedding._prepare_torch_state: regroup for chunking, then RowParallelLinear
    weight = s["condition_embedder.time_proj.weight"].unflatten(0, (6, -1))
    bias = s["condition_embedder.time_proj.bias"].unflatten(0, (6, -1))
    weight = torch.cat([c.reshape(-1, weight.shape[-1]) for c in torch.chunk(weight, tp, dim=1)], 0)
    bias = torch.cat([c.reshape(-1) for c in torch.chunk(bias, tp, dim=1)], 0)
    linear("condition_embedder.time_proj", weight, bias, pad=True)
    for n in range(config["num_layers"]):
        b = f"blocks.{n}"
        for attn, fused, parts in (("attn1", "to_qkv", "qkv"), ("attn2", "to_kv", "kv")):
            p = f"{b}.{attn}"
            weight = interleave_heads([s[f"{p}.to_{w}.weight"] for w in parts], tp, heads, head_dim)
            bias = interleave_heads([s[f"{p}.to_{w}.bias"].unsqueeze(-1) for w in parts], tp, heads, head_dim).squeeze(-1)
            linear(f"{p}.{fused}", weight, bias)
            linear(f"{p}.to_out", s[f"{p}.to_out.0.weight"], s[f"{p}.to_out.0.bias"])  # rename to_out.0 -> to_out
            for norm in ("norm_q", "norm_k"):  # DistributedRMSNorm: reshape(1, D)
                out[f"{p}.{norm}.weight"] = s[f"{p}.{norm}.weight"].reshape(1, -1)
        linear(f"{b}.attn2.to_q", s[f"{b}.attn2.to_q.weight"], s[f"{b}.attn2.to_q.bias"])
        for p in ("weight", "bias"):  # normalization.py DistributedLayerNorm._prepare_torch_state
            out[f"{b}.norm2.{p}"] = s[f"{b}.norm2.{p}"].reshape(tp, -1, 32).permute(1, 0, 2).reshape(-1, 32 * tp)
        # transformer_wan.py WanTransformerBlock: ffn.net.0.proj -> ffn.ff1, ffn.net.2 -> ffn.ff2 (row-parallel)
        linear(f"{b}.ffn.ff1", s[f"{b}.ffn.net.0.proj.weight"], s[f"{b}.ffn.net.0.proj.bias"])
        linear(f"{b}.ffn.ff2", s[f"{b}.ffn.net.2.weight"], s[f"{b}.ffn.net.2.bias"], pad=True)
        out[f"{b}.scale_shift_table"] = s[f"{b}.scale_shift_table"].unsqueeze(0)
    linear("proj_out", s["proj_out.weight"], s["proj_out.bias"])
    out["scale_shift_table"] = s["scale_shift_table"]
    return out


def cache_key(mesh: tuple[int, int], tp_axis: int, sp_axis: int, fsdp: bool) -> str:
    """utils/cache.py model_cache_dir: config_id over DiTParallelConfig's fields in order (cfg_parallel
    None is skipped; each name's initials upper-cased, then factor_axis_), mesh, dtype "bf16", _FSDP."""
    from collections import namedtuple

    factor = namedtuple("ParallelFactor", "factor mesh_axis")  # parallel/config.py
    config = namedtuple("DiTParallelConfig", "cfg_parallel tensor_parallel sequence_parallel")(
        None, factor(mesh[tp_axis], tp_axis), factor(mesh[sp_axis], sp_axis))
    key = "".join(f"{''.join(w[0].upper() for w in n.split('_'))}{v.factor}_{v.mesh_axis}_"
                  for n, v in config._asdict().items() if v is not None)
    return f"{key}mesh{'x'.join(map(str, mesh))}_bf16" + ("_FSDP" if fsdp else "")


# --------------------------------------------------------------------------- the check


def check_cache(ttnn, folder: Path, params: dict[str, Param], state: dict[str, torch.Tensor],
                mesh: tuple[int, int]) -> list[str]:
    """What tt_dit's Module.load + Parameter._check_data would reject, and any value that is not the
    re-derived one on its device; [] when the folder is right."""
    problems = []
    files = {p.name for p in folder.iterdir()}
    wanted = {f"{name}.tensorbin" for name in params} | {"rope.pt"}  # transformer_wan.py load: rope.pt
    problems += [f"missing {f}" for f in sorted(wanted - files)] + [f"unexpected {f}" for f in sorted(files - wanted)]
    coords = [(r, c) for r in range(mesh[0]) for c in range(mesh[1])]
    for name, param in params.items():
        path = folder / f"{name}.tensorbin"
        if not path.is_file():
            continue
        tensor = ttnn.load_tensor(path)
        topology = tensor.tensor_topology()
        shards = ttnn.get_device_tensors(tensor)
        found = [tuple(c) for c in topology.mesh_coords()]
        if list(topology.distribution_shape()) != list(mesh) or found != coords or len(shards) != len(coords):
            problems.append(f"{name}: {len(shards)} shards at {found} for mesh {mesh}")
            continue
        expected_total = state[name]
        for (r, c), shard in zip(found, shards):
            if shard.dtype != getattr(ttnn, param.dtype) or shard.layout != getattr(ttnn, f"{param.layout}_LAYOUT"):
                problems.append(f"{name}: {shard.dtype} {shard.layout}, tt_dit builds {param.dtype} {param.layout}")
                break
            if shard.memory_config() != ttnn.DRAM_MEMORY_CONFIG or tuple(shard.shape) != param.local(mesh):
                problems.append(f"{name}: shape {tuple(shard.shape)}, expected {param.local(mesh)} (or memory config)")
                break
            index = tuple(slice((r, c)[a] * n, ((r, c)[a] + 1) * n) if a is not None else slice(None)
                          for a, n in zip(param.axes, param.local(mesh)))
            expected = expected_total[index]
            expected = expected.to(torch.bfloat16).float() if param.dtype == "bfloat16" else expected
            if not torch.equal(ttnn.to_torch(shard).float(), expected):
                problems.append(f"{name}: values on device {(r, c)} differ")
                break
    return problems


def reassemble(ttnn, path: Path, param: Param, mesh: tuple[int, int]) -> torch.Tensor:
    """The shards of a file put back into the total tensor (concatenated along their mesh axes)."""
    tensor = ttnn.load_tensor(path)
    total = torch.zeros(param.shape)
    for (r, c), shard in zip(tensor.tensor_topology().mesh_coords(), ttnn.get_device_tensors(tensor)):
        local = param.local(mesh)
        index = tuple(slice((r, c)[a] * n, ((r, c)[a] + 1) * n) if a is not None else slice(None)
                      for a, n in zip(param.axes, local))
        total[index] = ttnn.to_torch(shard).float()
    return total


# --------------------------------------------------------------------------- fixtures


def write_transformer(folder: Path, variant: str, seed: int) -> dict:
    from fixtures.wan_dit import random_wan_transformer, wan_config

    config = wan_config(variant, **SMALL)
    random_wan_transformer(config, seed).save_pretrained(str(folder))
    return config


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, dict, dict]]:
    """Wan 2.1 T2V (one transformer) and Wan 2.2 I2V A14B (transformer, transformer_2) Diffusers
    folders under their Hub names: name -> (folder, config, diffusers state dict)."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("tt-dit-src")
    found = {}
    for key, folder, variant, seed in [("wan2.1", "Wan2.1-T2V-14B-Diffusers/transformer", "t2v", 1),
                                       ("a14b-high", "Wan2.2-I2V-A14B-Diffusers/transformer", "i2v-a14b", 2),
                                       ("a14b-low", "Wan2.2-I2V-A14B-Diffusers/transformer_2", "i2v-a14b", 3)]:
        config = write_transformer(root / folder, variant, seed)
        found[key] = (root / folder, config, load_file(str(root / folder / "diffusion_pytorch_model.safetensors")))
    return found


def run(source: Path, out: Path, mesh: tuple[int, int], tp_axis=None, sp_axis=None, fsdp=None) -> dict:
    options = {"cache_style": "tt_dit", "mesh": None if mesh == (1, 1) else f"{mesh[0]}x{mesh[1]}",
               "tp_axis": None if tp_axis is None else str(tp_axis), "sp_axis": None if sp_axis is None else str(sp_axis),
               "fsdp": None if fsdp is None else str(fsdp).lower()}
    convert(plan_conversion(source, "ttnn", family="wan-dit", target_options=options), out)
    return json.loads((out / "ttnn_manifest.json").read_text())


# --------------------------------------------------------------------------- the meshes


@pytest.mark.parametrize("mesh,tp_axis,sp_axis,fsdp", PLANS, ids=[f"{m[0]}x{m[1]}-tp{t}-{'fsdp' if f else 'nofsdp'}"
                                                                   for m, t, _, f in PLANS])
def test_wan21_cache_is_what_tt_dit_loads(ttnn, sources, tmp_path, mesh, tp_axis, sp_axis, fsdp):
    folder, config, state = sources["wan2.1"]
    given = (tp_axis, sp_axis, fsdp) if (mesh, tp_axis) in {((2, 4), 1), ((4, 8), 0)} and fsdp else (None, None, None)
    out = tmp_path / "cache"
    manifest = run(folder, out, mesh, *given)  # Blackhole's plans are the defaults; Wormhole's are given
    cache = out / "Wan2.1-T2V-14B-Diffusers" / "transformer" / cache_key(mesh, tp_axis, sp_axis, fsdp)
    assert manifest["cache_style"]["cache_dir"] == str(cache.relative_to(out)) and cache.is_dir()
    params = tt_dit_parameters(config, tp_axis, sp_axis, mesh, fsdp)
    assert len(params) == 15 + 21 * config["num_layers"]  # 15 outside the blocks, 21 in each
    assert check_cache(ttnn, cache, params, tt_dit_state(state, config, mesh[tp_axis]), mesh) == []


def canonical_from_cache(ttnn, cache: Path, params: dict[str, Param], config: dict, mesh, tp: int) -> dict[str, torch.Tensor]:
    """Every file's shards put back together, and tt_dit's preparation undone: diffusers' names and
    layouts (the inverse of tt_dit_state, written from the shapes it documents)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    found: dict[str, torch.Tensor] = {}
    for name, param in params.items():
        total = reassemble(ttnn, cache / f"{name}.tensorbin", param, mesh)
        module, _, leaf = name.rpartition(".")
        if module.endswith(("to_qkv", "to_kv")):  # [in, tp * (parts * D / tp)] -> each part [D, in]
            parts = "qkv" if module.endswith("to_qkv") else "kv"
            split = total.reshape(total.shape[0], tp, len(parts), dim // tp)
            for i, w in enumerate(parts):
                found[f"{module.rsplit('.', 1)[0]}.to_{w}.{leaf}"] = split[:, :, i].reshape(total.shape[0], dim).T.squeeze(-1) \
                    if leaf == "bias" else split[:, :, i].reshape(total.shape[0], dim).T
            continue
        if module.endswith("time_proj"):  # rows unchanged; columns [tp, 6, D / tp] -> [6, D]; bias padded
            if leaf == "bias":
                assert not total[:, 6 * dim:].any()
                total = total[:, :6 * dim]
            total = total.reshape(total.shape[0], tp, 6, dim // tp).permute(0, 2, 1, 3).reshape(total.shape[0], 6 * dim)
        elif module.endswith("ffn.ff2") and leaf == "bias":
            assert not total[:, dim:].any()  # only the first device adds the bias
            total = total[:, :dim]
        elif module.endswith("norm2"):
            total = total.reshape(-1, tp, 32).permute(1, 0, 2).reshape(1, -1)
        canonical = {"proj_weight": "weight", "proj_bias": "bias"}.get(leaf, leaf)
        canonical = f"{module}.{canonical}".replace("ffn.ff1", "ffn.net.0.proj").replace("ffn.ff2", "ffn.net.2")
        canonical = canonical.replace(".to_out.", ".to_out.0.").lstrip(".")
        if leaf == "proj_weight":
            kt, kh, kw = config["patch_size"]
            total = total.reshape(kt, kh, kw, -1, dim).permute(4, 3, 0, 1, 2)
        elif name.endswith("scale_shift_table"):
            total = total.reshape(1, -1, dim)
        elif leaf == "weight" and not module.endswith(("norm_q", "norm_k", "norm2")):
            total = total.T
        found[canonical] = total.reshape(-1) if leaf == "bias" or module.endswith(("norm_q", "norm_k", "norm2")) else total
    return found


def test_wan22_a14b_experts_load_and_give_back_diffusers_tensors(ttnn, sources, tmp_path):
    """Both experts of Wan 2.2 I2V A14B, under one checkpoint name and their own subfolders; every
    tensor of each diffusers model comes back from the shards, rope.pt is the state dict tt_dit saves."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    mesh, tp_axis, sp_axis, fsdp = (2, 4), 0, 1, False  # Blackhole 2x4: tp 2 on axis 0
    for key, subfolder in (("a14b-high", "transformer"), ("a14b-low", "transformer_2")):
        folder, config, state = sources[key]
        manifest = run(folder, tmp_path / key, mesh)
        cache = tmp_path / key / "Wan2.2-I2V-A14B-Diffusers" / subfolder / cache_key(mesh, tp_axis, sp_axis, fsdp)
        assert manifest["cache_style"]["model_name"] == "Wan2.2-I2V-A14B-Diffusers"
        assert manifest["cache_style"]["subfolder"] == subfolder
        params = tt_dit_parameters(config, tp_axis, sp_axis, mesh, fsdp)
        assert params["patch_embedding.proj_weight"].shape == (1 * 2 * 2 * 36, 128)  # model_type i2v: 36 channels
        assert check_cache(ttnn, cache, params, tt_dit_state(state, config, mesh[tp_axis]), mesh) == []
        back = canonical_from_cache(ttnn, cache, params, config, mesh, mesh[tp_axis])
        assert set(back) == set(state)
        for name, value in state.items():
            dtype = params[next(n for n in params if n in manifest["tensors"] and name in manifest["tensors"][n]["from"])].dtype
            expected = value.float() if dtype == "float32" else value.float().to(torch.bfloat16).float()
            assert torch.equal(back[name].reshape(expected.shape), expected), name
        rope = WanRotaryPosEmbed(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"])
        saved = torch.load(cache / "rope.pt")
        assert list(saved) == list(rope.state_dict()) == [] and rope.load_state_dict(saved) is not None


def test_cli_writes_the_wormhole_plan(ttnn, sources, tmp_path):
    folder, config, state = sources["a14b-low"]
    out = tmp_path / "cli"
    result = runner.invoke(app, ["convert", "wan-dit", str(folder), "--target", "ttnn", "--cache-style", "tt_dit",
                                 "--ttnn-mesh", "2x4", "--tp-axis", "1", "--sp-axis", "0", "--fsdp", "--out", str(out)])
    assert result.exit_code == 0, result.output
    cache = out / "Wan2.2-I2V-A14B-Diffusers" / "transformer_2" / "TP4_1_SP2_0_mesh2x4_bf16_FSDP"
    assert cache_key((2, 4), 1, 0, True) == cache.name
    found = json.loads((out / "ttnn_manifest.json").read_text())
    assert found["options"] == {"cache_style": "tt_dit", "dtype": "bfloat16", "grid": "8x8", "mesh": "2x4",
                                "tp_axis": "1", "sp_axis": "0", "fsdp": "true"}
    params = tt_dit_parameters(config, 1, 0, (2, 4), True)
    assert check_cache(ttnn, cache, params, tt_dit_state(state, config, 4), (2, 4)) == []
    run(folder, tmp_path / "again", (2, 4), 1, 0, True)  # the same bytes again (vidport_manifest.json aside)

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
                if p.is_file() and p.name != "vidport_manifest.json"}

    assert files(out) == files(tmp_path / "again") and len(files(out)) == len(params) + 3  # rope.pt, ttnn_manifest.json, config.json


# --------------------------------------------------------------------------- planted faults


def layout_copy(tmp_path: Path, old: str, new: str) -> Path:
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    layout = mappings / "wan-dit" / "tt_dit" / "cache.yaml"
    text = layout.read_text()
    assert text.count(old) == 1, old
    layout.write_text(text.replace(old, new))
    return mappings


PLANTS = {
    "time_proj in bfloat16": ("interleave: {axis: 1, parts: 6}, dtype: float32, mesh_axes: [tp, null]",
                              "interleave: {axis: 1, parts: 6}, mesh_axes: [tp, null]",
                              "condition_embedder.time_proj.weight: DataType.BFLOAT16"),
    "unfused qkv": ('''  - {name: "blocks.{n}.attn1.to_qkv.weight", interleave: {axis: 1}, mesh_axes: [fsdp, tp],
     from: ["blocks.{n}.attn1.to_q.weight", "blocks.{n}.attn1.to_k.weight", "blocks.{n}.attn1.to_v.weight"]}''',
                    '''  - {name: "blocks.{n}.attn1.{w}.weight", mesh_axes: [fsdp, tp], from: "blocks.{n}.attn1.{w:to_q|to_k|to_v}.weight"}''',
                    "missing blocks.0.attn1.to_qkv.weight.tensorbin"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_fault_fails_the_check(ttnn, sources, tmp_path, monkeypatch, plant):
    old, new, message = PLANTS[plant]
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(layout_copy(tmp_path, old, new)))
    folder, config, state = sources["wan2.1"]
    mesh = (1, 4)
    run(folder, tmp_path / "out", mesh)
    cache = tmp_path / "out" / "Wan2.1-T2V-14B-Diffusers" / "transformer" / cache_key(mesh, 1, 0, True)
    problems = check_cache(ttnn, cache, tt_dit_parameters(config, 1, 0, mesh, True), tt_dit_state(state, config, 4), mesh)
    assert any(p.startswith(message) for p in problems), problems


def test_planted_files_fail_the_check(ttnn, sources, tmp_path):
    """A QKV fused without the per-device head interleave (q | k | v), and a file one shard short."""
    folder, config, state = sources["wan2.1"]
    mesh = (2, 4)
    run(folder, tmp_path / "out", mesh)
    cache = tmp_path / "out" / "Wan2.1-T2V-14B-Diffusers" / "transformer" / cache_key(mesh, 0, 1, False)
    params, derived = tt_dit_parameters(config, 0, 1, mesh, False), tt_dit_state(state, config, 2)
    assert check_cache(ttnn, cache, params, derived, mesh) == []
    plain = torch.cat([state[f"blocks.0.attn1.to_{w}.weight"].float().T for w in "qkv"], dim=1)  # same shape
    mapper = ttnn.create_mesh_mapper(ttnn.MeshShape(*mesh), ttnn.MeshMapperConfig([ttnn.PlacementShard(1), ttnn.PlacementReplicate()]))
    ttnn.dump_tensor(cache / "blocks.0.attn1.to_qkv.weight.tensorbin",
                     ttnn.from_torch(plain, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, mesh_mapper=mapper,
                                     memory_config=ttnn.DRAM_MEMORY_CONFIG), mode=ttnn.DumpTensorMode.LOCAL)
    path = cache / "blocks.1.ffn.ff1.weight.tensorbin"
    shards = ttnn.get_device_tensors(ttnn.load_tensor(path))
    ttnn.dump_tensor(path, ttnn.from_host_shards(shards[:-1], ttnn.MeshShape(1, 7)), mode=ttnn.DumpTensorMode.LOCAL)
    assert check_cache(ttnn, cache, params, derived, mesh) == [
        "blocks.0.attn1.to_qkv.weight: values on device (0, 0) differ",
        "blocks.1.ffn.ff1.weight: 7 shards at " + str([(0, c) for c in range(7)]) + " for mesh (2, 4)"]


# --------------------------------------------------------------------------- refusals


def test_what_tt_dit_cannot_load_is_refused(sources, tmp_path):
    from fixtures.wan_dit import write_native

    folder, _, _ = sources["wan2.1"]
    cases = [({"dtype": "bfloat8_b"}, folder, "tt_dit's own dtypes"),
             ({"mesh": "4x8", "tp_axis": "0", "sp_axis": "0"}, folder, "different mesh axes"),
             ({"mesh": "1x8", "tp_axis": "1", "sp_axis": "0"}, folder, "num_attention_heads % tp == 0"),
             ({"mesh": "1x8"}, folder, "no parallel plan for this mesh"),
             ({}, write_native(tmp_path / "wan.safetensors", "t2v")["_path"], "a single file does not say")]
    i2v = tmp_path / "Wan2.1-I2V-14B-480P-Diffusers" / "transformer"
    write_transformer(i2v, "i2v", 4)
    cases.append(({}, i2v, "no tt_dit parameter: blocks.0.attn2.add_k_proj.bias"))
    for options, source, message in cases:
        with pytest.raises(VidportError, match=None) as err:
            plan = plan_conversion(source, "ttnn", family="wan-dit", overrides={"num_attention_heads": 4},
                                   target_options={"cache_style": "tt_dit", **options})
            convert(plan, tmp_path / "refused")
        assert message in str(err.value), (options, str(err.value))
        assert not (tmp_path / "refused").exists()


def test_wan22_ti2v_5b(ttnn, tmp_path):
    """Wan 2.2 TI2V 5B (48 latent channels in and out: tt_dit's model_type ti2v) on 2x2."""
    from safetensors.torch import load_file

    folder = tmp_path / "Wan2.2-TI2V-5B-Diffusers" / "transformer"
    config = write_transformer(folder, "ti2v", 5)
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    run(folder, tmp_path / "out", (2, 2))
    cache = tmp_path / "out" / "Wan2.2-TI2V-5B-Diffusers" / "transformer" / cache_key((2, 2), 1, 0, True)
    params = tt_dit_parameters(config, 1, 0, (2, 2), True)
    assert params["proj_out.weight"].shape == (128, 1 * 2 * 2 * 48)
    assert check_cache(ttnn, cache, params, tt_dit_state(state, config, 2), (2, 2)) == []
