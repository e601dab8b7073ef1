"""Issue 16, tt_dit: `vidport convert wan-vae|umt5 SRC --target ttnn --cache-style tt_dit --ttnn-mesh RxC`
writes the folders tt-metal's tt_dit Wan pipeline loads its VAE decoder and UMT5 text encoder from.

Everything tt_dit would check is re-derived here from tt-metal's code (tenstorrent/tt-metal,
models/tt_dit/; the commit of each file read is in mappings/<family>/tt_dit/cache.yaml), not from
the converter:
- pipelines/wan/pipeline_wan.py `_prepare_vae` / `_prepare_text_encoder`: the subfolders (`vae_` +
  utils/conv3d.py `conv3d_blocking_hash`, `text_encoder`), the parallel configs (VaeHWParallelConfig,
  EncoderParallelConfig from parallel/config.py) and utils/cache.py `model_cache_dir`'s key;
- models/vae/vae_wan2_1.py (WanDecoder) and encoders/t5/model_t5.py (T5Encoder = UMT5Encoder): the
  module trees, their Parameters and the `_prepare_torch_state` renames and reshapes;
- utils/conv3d.py `get_conv3d_config` (C_in_block) and ttnn's prepare_conv3d_weights.cpp (the conv
  weight layout), written here in torch.
Every file is loaded with the real `ttnn.load_tensor` (host, mock cluster), each device's shard is
compared with the re-derived tensor's slice, and the shards put back and the preparation undone
equal diffusers' / transformers' tensors. Planted faults fail the same check.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import namedtuple
from dataclasses import dataclass
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
CHECKPOINT = "Wan2.1-T2V-14B-Diffusers"

# (mesh, tp_axis, sp_axis): pipelines/wan/pipeline_wan.py create_pipeline (Blackhole's table, then
# Wormhole's 2x4), and one device. The VAE splits height on tp_axis and width on sp_axis; the text
# encoder's tensor-parallel axis is tp_axis.
PLANS = [((1, 1), 1, 0), ((1, 4), 1, 0), ((2, 2), 1, 0), ((2, 4), 0, 1), ((4, 8), 0, 1), ((4, 32), 0, 1), ((2, 4), 1, 0)]
PLAN_IDS = [f"{m[0]}x{m[1]}-tp{t}" for m, t, _ in PLANS]


# --------------------------------------------------------------------------- tt_dit, re-derived


ParallelFactor = namedtuple("ParallelFactor", "factor mesh_axis")  # parallel/config.py


def config_id(parallel_config) -> str:
    """utils/cache.py config_id: each set field's initials upper-cased, then factor_axis_."""
    return "".join(f"{''.join(w[0].upper() for w in n.split('_'))}{v.factor}_{v.mesh_axis}_"
                   for n, v in parallel_config._asdict().items() if v is not None)


def cache_key(parallel_config, mesh: tuple[int, int]) -> str:
    """utils/cache.py model_cache_dir with load_model's defaults (dtype "bf16", is_fsdp False)."""
    return f"{config_id(parallel_config)}mesh{mesh[0]}x{mesh[1]}_bf16"


def vae_parallel(mesh, tp_axis, sp_axis):
    config = namedtuple("VaeHWParallelConfig", "height_parallel width_parallel")
    return config(ParallelFactor(mesh[tp_axis], tp_axis), ParallelFactor(mesh[sp_axis], sp_axis))


def encoder_parallel(mesh, tp_axis):
    return namedtuple("EncoderParallelConfig", "tensor_parallel")(ParallelFactor(mesh[tp_axis], tp_axis))


def aligned(channels: int) -> int:
    """utils/conv3d.py aligned_channels (ALIGNMENT 32)."""
    return -(-channels // 32) * 32


# utils/conv3d.py _DEFAULT_BLOCKINGS (C_in, C_out, kernel) -> (C_in_block, ...): the lookup used
# when no exact (mesh, resolution) entry matches; no entry: C_in_block = in_channels
DEFAULT_BLOCKINGS_C_IN = {(96, 3, (3, 3, 3)): 96, (96, 32, (3, 3, 3)): 96, (192, 96, (1, 3, 3)): 192,
                          (96, 96, (3, 3, 3)): 96, (384, 192, (1, 3, 3)): 192, (192, 192, (3, 3, 3)): 96,
                          (32, 384, (3, 3, 3)): 32, (192, 384, (3, 3, 3)): 64, (384, 384, (3, 3, 3)): 96,
                          (384, 768, (3, 3, 3)): 96}


@dataclass(frozen=True)
class Conv:
    """One WanCausalConv3d / WanConv2d: its tt_dit name, channels (C_in aligned) and kernel."""

    name: str
    c_in: int
    c_out: int
    kernel: tuple[int, int, int]

    @property
    def c_in_block(self) -> int:  # utils/conv3d.py get_conv3d_config, bfloat16
        return DEFAULT_BLOCKINGS_C_IN.get((self.c_in, self.c_out, self.kernel), self.c_in)


class VaeTree:
    """vae_wan2_1.py's building blocks, recording Parameters and convs in module attribute order
    (the order utils/conv3d.py _walk_conv3d_modules visits them)."""

    def __init__(self) -> None:
        self.params: dict[str, Param] = {}
        self.convs: list[Conv] = []

    def linear(self, name, n_in, n_out):  # layers/linear.py Linear: [in, out], [1, out], replicated
        self.params[f"{name}.weight"] = Param((n_in, n_out), (None, None))
        self.params[f"{name}.bias"] = Param((1, n_out), (None, None))

    def norm(self, name, dim):  # normalization.py RMSNorm (no bias): [1, dim]
        self.params[f"{name}.weight"] = Param((1, dim), (None, None))

    def conv(self, name, c_in, c_out, kernel, causal=True):  # WanCausalConv3d aligns C_in; WanConv2d does not
        c_in = aligned(c_in) if causal else c_in
        self.params[f"{name}.weight"] = Param((kernel[0] * kernel[1] * kernel[2] * c_in, c_out), (None, None))
        self.params[f"{name}.bias"] = Param((1, c_out), (None, None))
        self.convs.append(Conv(name, c_in, c_out, kernel))

    def residual(self, name, in_dim, out_dim):  # WanResidualBlock: norm1, conv1, norm2, conv2, conv_shortcut
        self.norm(f"{name}.norm1", in_dim)
        self.conv(f"{name}.conv1", in_dim, out_dim, (3, 3, 3))
        self.norm(f"{name}.norm2", out_dim)
        self.conv(f"{name}.conv2", out_dim, out_dim, (3, 3, 3))
        if in_dim != out_dim:
            self.linear(f"{name}.conv_shortcut", in_dim, out_dim)

    def mid_block(self, name, dim):  # WanMidBlock: resnets, then attentions (WanAttentionBlock)
        self.residual(f"{name}.resnets.0", dim, dim)
        self.residual(f"{name}.resnets.1", dim, dim)
        self.norm(f"{name}.attentions.0.norm", dim)
        self.linear(f"{name}.attentions.0.to_qkv", dim, 3 * dim)
        self.linear(f"{name}.attentions.0.proj", dim, dim)


def wan_decoder(config: dict) -> tuple[dict[str, Param], list[Conv]]:
    """The Parameters of vae_wan2_1.py WanDecoder for a diffusers AutoencoderKLWan config, and its convs."""
    tree = VaeTree()
    z, dim, mult = config["z_dim"], config["base_dim"], config["dim_mult"]
    tree.linear("post_quant_conv", aligned(z), aligned(z))
    dims = [dim * u for u in [mult[-1]] + mult[::-1]]  # WanDecoder3d channel_dims
    upsample = config["temperal_downsample"][::-1]
    tree.conv("decoder.conv_in", z, dims[0], (3, 3, 3))
    tree.mid_block("decoder.mid_block", dims[0])
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        in_dim = in_dim // 2 if i > 0 else in_dim  # "wan vae 2.1"
        for j in range(config["num_res_blocks"] + 1):
            tree.residual(f"decoder.up_blocks.{i}.resnets.{j}", in_dim if j == 0 else out_dim, out_dim)
        if i != len(mult) - 1:  # WanResample: conv (WanConv2d, (1, 3, 3)), then time_conv if 3d
            tree.conv(f"decoder.up_blocks.{i}.upsamplers.conv", out_dim, out_dim // 2, (1, 3, 3), causal=False)
            if upsample[i]:
                tree.conv(f"decoder.up_blocks.{i}.upsamplers.time_conv", out_dim, out_dim * 2, (3, 1, 1))
    tree.norm("decoder.norm_out", dims[-1])
    tree.conv("decoder.conv_out", dims[-1], config["out_channels"], (3, 3, 3))
    return tree.params, tree.convs


def wan_encoder(config: dict) -> tuple[dict[str, Param], list[Conv]]:
    """The Parameters of vae_wan2_1.py WanEncoder (WanEncoder3D with z_dim * 2 outputs, quant_conv)."""
    tree = VaeTree()
    dim, mult, z2 = config["base_dim"], config["dim_mult"], 2 * config["z_dim"]
    dims = [dim * u for u in [1] + mult]
    tree.conv("encoder.conv_in", config["in_channels"], dims[0], (3, 3, 3))
    k = 0  # down_blocks: one list of residual blocks and resamplers
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(config["num_res_blocks"]):
            tree.residual(f"encoder.down_blocks.{k}", in_dim, out_dim)
            in_dim, k = out_dim, k + 1
        if i != len(mult) - 1:  # WanResample downsample: conv (dim -> dim), time_conv if 3d
            tree.conv(f"encoder.down_blocks.{k}.conv", out_dim, out_dim, (1, 3, 3), causal=False)
            if config["temperal_downsample"][i]:
                tree.conv(f"encoder.down_blocks.{k}.time_conv", out_dim, out_dim, (3, 1, 1))
            k += 1
    tree.mid_block("encoder.mid_block", dims[-1])
    tree.norm("encoder.norm_out", dims[-1])
    tree.conv("encoder.conv_out", dims[-1], z2, (3, 3, 3))
    tree.linear("quant_conv", aligned(z2), aligned(z2))
    return tree.params, tree.convs


def vae_subfolder(convs: list[Conv]) -> str:
    """pipeline_wan.py _prepare_vae: f"vae_{conv3d_blocking_hash(tt_vae)}" (utils/conv3d.py)."""
    return "vae_cin" + hashlib.sha256("_".join(str(c.c_in_block) for c in convs).encode()).hexdigest()[:8]


def prepare_conv3d_weights(weight: torch.Tensor, c_in_block: int) -> torch.Tensor:
    """ttnn/cpp/ttnn/operations/experimental/conv3d/prepare_conv3d_weights.cpp (groups 1, alignment 32)."""
    w = weight.permute(2, 3, 4, 1, 0)
    w = torch.nn.functional.pad(w, (0, 0, 0, aligned(w.shape[3]) - w.shape[3]))
    kd, kh, kw, c_in, c_out = w.shape
    w = w.reshape(kd, kh, kw, c_in // c_in_block, c_in_block, c_out).permute(3, 0, 1, 2, 4, 5)
    return w.reshape(-1, c_out)


HALVES = {"decoder": ("post_quant_conv", ("encoder.", "quant_conv.")), "encoder": ("quant_conv", ("decoder.", "post_quant_conv."))}


def tt_dit_name(key: str) -> str:
    """WanUpBlock: upsamplers.0 -> upsamplers; WanResample: resample.1 -> conv; RMSNorm: gamma -> weight."""
    return key.replace("upsamplers.0.", "upsamplers.").replace("resample.1.", "conv.").replace(".gamma", ".weight")


def wan_vae_state(state: dict[str, torch.Tensor], convs: list[Conv], half: str) -> dict[str, torch.Tensor]:
    """diffusers' VAE state dict through WanDecoder's (or WanEncoder's) _prepare_torch_state methods
    (the other half popped; the renames; conv3d_to_linear_weight for post_quant_conv / quant_conv;
    1x1 convs as Linears; prepare_conv3d_weights), each then through its Parameter's layout."""
    linear, other = HALVES[half]
    s = {k: v.float() for k, v in state.items() if not k.startswith(other)}
    out: dict[str, torch.Tensor] = {}
    z = s[f"{linear}.weight"].shape[0]
    weight = torch.nn.functional.pad(s.pop(f"{linear}.weight").reshape(z, z), (0, aligned(z) - z, 0, aligned(z) - z))
    out[f"{linear}.weight"] = weight.T
    out[f"{linear}.bias"] = torch.nn.functional.pad(s.pop(f"{linear}.bias"), (0, aligned(z) - z)).reshape(1, -1)
    blocks = {c.name: c.c_in_block for c in convs}
    for key, value in s.items():
        name = tt_dit_name(key)
        module, leaf = name.rsplit(".", 1)
        if key.endswith(".gamma"):
            out[name] = value.squeeze().unsqueeze(0)
        elif leaf == "bias":
            out[name] = value.reshape(1, -1)
        elif module in blocks:
            out[name] = prepare_conv3d_weights(value.unsqueeze(2) if value.dim() == 4 else value, blocks[module])
        else:  # conv_shortcut (1x1x1), to_qkv / proj (1x1): [out, in] then Linear's transpose
            out[name] = value.reshape(value.shape[0], value.shape[1]).T
    return out


def umt5_encoder(config: dict, tp_axis: int) -> dict[str, Param]:
    """The Parameters of model_t5.py T5Encoder with UMT5Config (a position table in every layer)."""
    d, ff, heads = config["d_model"], config["d_ff"], config["num_heads"]
    params = {"token_embeddings.weight": Param((config["vocab_size"], d), (None, None), layout="ROW_MAJOR"),  # Embedding
              "final_layer_norm.weight": Param((1, d), (None, None))}
    for i in range(config["num_layers"]):
        layer = f"encoder.layers.{i}"
        for p in "qkvo":  # ColParallelLinear(bias=False), o_proj too
            params[f"{layer}.self_attn.{p}_proj.weight"] = Param((d, d), (None, tp_axis))
        params[f"{layer}.self_attn.layer_norm.weight"] = Param((1, d), (None, None))
        params[f"{layer}.self_attn.relative_attention_bias.weight"] = Param(
            (config["relative_attention_num_buckets"], heads), (None, tp_axis), layout="ROW_MAJOR")
        params[f"{layer}.ff.layer_norm.weight"] = Param((1, d), (None, None))
        params[f"{layer}.ff.dense_gated_dense.wi0.weight"] = Param((d, ff), (None, tp_axis))
        params[f"{layer}.ff.dense_gated_dense.wi1.weight"] = Param((d, ff), (None, tp_axis))
        params[f"{layer}.ff.dense_gated_dense.wo.weight"] = Param((ff, d), (tp_axis, None))  # RowParallelLinear
    return params


# model_t5.py _prepare_torch_state renames, outermost module first (rename_substate: a prefix)
UMT5_RENAMES = [(r"^encoder\.embed_tokens\.", "token_embeddings."), (r"^encoder\.final_layer_norm\.", "final_layer_norm."),
                (r"^encoder\.block\.", "encoder.layers."), (r"\.layer\.0\.", ".self_attn."), (r"\.layer\.1\.", ".ff."),
                (r"\.self_attn\.SelfAttention\.(q|k|v|o)\.", r".self_attn.\1_proj."),
                (r"\.self_attn\.SelfAttention\.relative_attention_bias\.", ".self_attn.relative_attention_bias."),
                (r"\.ff\.DenseReluDense\.", ".ff.dense_gated_dense."), (r"\.wi_(0|1)\.", r".wi\1.")]


def umt5_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' UMT5EncoderModel.state_dict() (what the pipeline passes) through T5Encoder's
    renames (shared popped), Linear weights transposed, RMSNorm weights unsqueezed."""
    out = {}
    for key, value in state.items():
        if key.startswith("shared."):
            continue
        for pattern, replacement in UMT5_RENAMES:
            key = re.sub(pattern, replacement, key)
        value = value.float()
        if key.endswith(("_proj.weight", "wi0.weight", "wi1.weight", "wo.weight")):
            value = value.T
        elif "layer_norm" in key:
            value = value.unsqueeze(0)
        out[key] = value
    return out


# --------------------------------------------------------------------------- the check


def shard_index(param: Param, coord: tuple[int, int], mesh: tuple[int, int]) -> tuple[slice, ...]:
    return tuple(slice(coord[a] * n, (coord[a] + 1) * n) if a is not None else slice(None)
                 for a, n in zip(param.axes, param.local(mesh)))


def check_cache(ttnn, folder: Path, params: dict[str, Param], state: dict[str, torch.Tensor], mesh) -> list[str]:
    """What Module.load + Parameter._check_data would reject, and any shard that is not the slice of
    the re-derived tensor at its mesh coordinate; [] when the folder is right."""
    if not folder.is_dir():
        return [f"missing folder {folder.parent.name}/{folder.name}"]
    files = {p.name for p in folder.iterdir()}
    wanted = {f"{name}.tensorbin" for name in params}
    problems = [f"missing {f}" for f in sorted(wanted - files)] + [f"unexpected {f}" for f in sorted(files - wanted)]
    coords = [(r, c) for r in range(mesh[0]) for c in range(mesh[1])]
    for name, param in params.items():
        if f"{name}.tensorbin" not in files:
            continue
        tensor = ttnn.load_tensor(folder / f"{name}.tensorbin")
        found = [tuple(c) for c in tensor.tensor_topology().mesh_coords()]
        shards = ttnn.get_device_tensors(tensor)
        if list(tensor.tensor_topology().distribution_shape()) != list(mesh) or found != coords:
            problems.append(f"{name}: {len(shards)} shards at {found} for mesh {mesh}")
            continue
        for coord, shard in zip(found, shards):
            if shard.dtype != getattr(ttnn, param.dtype) or shard.layout != getattr(ttnn, f"{param.layout}_LAYOUT"):
                problems.append(f"{name}: {shard.dtype} {shard.layout}, tt_dit builds {param.dtype} {param.layout}")
                break
            if shard.memory_config() != ttnn.DRAM_MEMORY_CONFIG or tuple(shard.shape) != param.local(mesh):
                problems.append(f"{name}: shape {tuple(shard.shape)}, expected {param.local(mesh)}")
                break
            expected = state[name][shard_index(param, coord, mesh)].to(torch.bfloat16).float()
            if not torch.equal(ttnn.to_torch(shard).float(), expected):
                problems.append(f"{name}: values on device {coord} differ")
                break
    return problems


def reassemble(ttnn, path: Path, param: Param, mesh) -> torch.Tensor:
    """A file's shards put back into the total tensor."""
    tensor = ttnn.load_tensor(path)
    total = torch.zeros(param.shape)
    for coord, shard in zip(tensor.tensor_topology().mesh_coords(), ttnn.get_device_tensors(tensor)):
        total[shard_index(param, tuple(coord), mesh)] = ttnn.to_torch(shard).float()
    return total


# --------------------------------------------------------------------------- fixtures


def write_vae(folder: Path, seed: int, **overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    from diffusers import AutoencoderKLWan
    from fixtures.wan_vae import randomize, wan_vae_config

    config = wan_vae_config("2.1", **overrides)
    model = randomize(AutoencoderKLWan(**config), seed)
    model.save_pretrained(str(folder))
    return dict(model.config), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, dict, dict[str, torch.Tensor]]]:
    """Diffusers folders under a Wan checkpoint's name: the released VAE structure at base_dim 32
    (RMSNorm needs widths in multiples of 32), a shallower VAE at the real widths (96 .. 192, so
    tt_dit's blocking table re-blocks some convs), and UMT5 (transformers' state_dict, with the tied
    encoder.embed_tokens the pipeline hands tt_dit)."""
    from transformers import UMT5EncoderModel

    from fixtures.wan_encoders import write_diffusers_umt5

    root = tmp_path_factory.mktemp("tt-dit-vae-umt5")
    found = {}
    folder = root / CHECKPOINT / "vae"
    found["vae"] = (folder, *write_vae(folder, 1, base_dim=32))
    folder = root / "Wan2.1-T2V-1.3B-Diffusers" / "vae"
    found["vae96"] = (folder, *write_vae(folder, 2, base_dim=96, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True]))
    folder = root / CHECKPOINT / "text_encoder"
    config = write_diffusers_umt5(folder, seed=3)
    state = UMT5EncoderModel.from_pretrained(str(folder)).state_dict()
    found["umt5"] = (folder, config, state)
    return found


def run(source: Path, out: Path, family: str, mesh: tuple[int, int], tp_axis=None, sp_axis=None) -> dict:
    options = {"cache_style": "tt_dit", "mesh": None if mesh == (1, 1) else f"{mesh[0]}x{mesh[1]}",
               "tp_axis": None if tp_axis is None else str(tp_axis), "sp_axis": None if sp_axis is None else str(sp_axis)}
    convert(plan_conversion(source, "ttnn", family=family, target_options=options), out)
    return json.loads((out / "ttnn_manifest.json").read_text())


def given_axes(mesh, tp_axis, sp_axis) -> tuple:
    """Blackhole's plans are the defaults; Wormhole's 2x4 (tp axis 1) is given."""
    return (tp_axis, sp_axis) if (mesh, tp_axis) == ((2, 4), 1) else (None, None)


# --------------------------------------------------------------------------- UMT5


@pytest.mark.parametrize("mesh,tp_axis,sp_axis", PLANS, ids=PLAN_IDS)
def test_umt5_cache_is_what_tt_dit_loads(ttnn, sources, tmp_path, mesh, tp_axis, sp_axis):
    folder, config, state = sources["umt5"]
    out = tmp_path / "out"
    manifest = run(folder, out, "umt5", mesh, *given_axes(mesh, tp_axis, sp_axis))
    cache = out / CHECKPOINT / "text_encoder" / cache_key(encoder_parallel(mesh, tp_axis), mesh)
    assert manifest["cache_style"]["cache_dir"] == str(cache.relative_to(out))
    params = umt5_encoder(config, tp_axis)
    assert len(params) == 2 + 10 * config["num_layers"]
    assert check_cache(ttnn, cache, params, umt5_state(state), mesh) == []


def test_umt5_shards_give_back_transformers_tensors(ttnn, sources, tmp_path):
    folder, config, state = sources["umt5"]
    mesh, tp_axis = (4, 8), 0
    run(folder, tmp_path / "out", "umt5", mesh)
    cache = tmp_path / "out" / CHECKPOINT / "text_encoder" / "TP4_0_mesh4x8_bf16"
    params = umt5_encoder(config, tp_axis)
    back = {}
    for name, param in params.items():  # undo by hand: the inverse renames, transposes, unsqueezes
        total = reassemble(ttnn, cache / f"{name}.tensorbin", param, mesh)
        key = name.replace("token_embeddings.", "shared.").replace("final_layer_norm.", "encoder.final_layer_norm.")
        key = key.replace("encoder.layers.", "encoder.block.").replace(".self_attn.", ".layer.0.").replace(".ff.", ".layer.1.")
        key = re.sub(r"\.layer\.0\.(q|k|v|o)_proj\.", r".layer.0.SelfAttention.\1.", key)
        key = key.replace(".relative_attention_bias.", ".SelfAttention.relative_attention_bias.")
        key = key.replace(".dense_gated_dense.wi0.", ".DenseReluDense.wi_0.").replace(".dense_gated_dense.wi1.", ".DenseReluDense.wi_1.")
        key = key.replace(".dense_gated_dense.wo.", ".DenseReluDense.wo.")
        back[key] = total[0] if "layer_norm" in key else total.T if param.layout == "TILE" else total
    expected = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}  # tied to shared
    assert set(back) == set(expected)
    for key, value in expected.items():
        assert torch.equal(back[key], value.float().to(torch.bfloat16).float()), key


# --------------------------------------------------------------------------- VAE


# every VAE Parameter is replicated: the mesh changes the key and the shard count only; 4x32 (128
# shards of every file to compare, about a minute) is marked slow
VAE_PLANS = [pytest.param(*PLANS[i], id=PLAN_IDS[i], marks=[pytest.mark.slow] if PLANS[i][0] == (4, 32) else [])
             for i in (0, 3, 5)]  # Wormhole 2x4 (axes swapped): test_cli_writes_both


def vae_folders(out: Path, checkpoint: str, config: dict, parallel_config, mesh) -> dict[str, tuple]:
    """half -> (folder, Parameters, convs): pipeline_wan.py _prepare_vae's "vae_<blocking hash>" for
    the decoder, pipeline_wan_i2v.py's "vae_encoder" for the encoder, both keyed by the VAE's plan."""
    found = {}
    for half, tree in (("decoder", wan_decoder), ("encoder", wan_encoder)):
        params, convs = tree(config)
        subfolder = vae_subfolder(convs) if half == "decoder" else "vae_encoder"
        found[half] = (out / checkpoint / subfolder / cache_key(parallel_config, mesh), params, convs)
    return found


@pytest.mark.parametrize("mesh,tp_axis,sp_axis", VAE_PLANS)
def test_vae_cache_is_what_tt_dit_loads(ttnn, sources, tmp_path, mesh, tp_axis, sp_axis):
    folder, config, state = sources["vae"]
    out = tmp_path / "out"
    manifest = run(folder, out, "wan-vae", mesh, *given_axes(mesh, tp_axis, sp_axis))
    halves = vae_folders(out, CHECKPOINT, config, vae_parallel(mesh, tp_axis, sp_axis), mesh)
    written = [manifest["cache_style"]["cache_dir"], *(a["cache_dir"] for a in manifest["cache_style"]["also"])]
    assert written == [str(halves[h][0].relative_to(out)) for h in ("decoder", "encoder")]
    for half, (cache, params, convs) in halves.items():
        assert all(c.c_in_block == c.c_in for c in convs)  # no blocking-table entry at these widths
        assert check_cache(ttnn, cache, params, wan_vae_state(state, convs, half), mesh) == [], half


def test_vae_blocked_convs_and_diffusers_tensors_back(ttnn, sources, tmp_path):
    """At the real widths tt_dit's fallback table splits C_in (192 -> 2 x 96 for the 192-channel
    3x3x3 convs), which reorders the weight's rows and names the decoder's subfolder; the shards of
    both folders, un-blocked and un-renamed, are every one of diffusers' tensors (bfloat16)."""
    folder, config, state = sources["vae96"]
    mesh = (1, 4)
    run(folder, tmp_path / "out", "wan-vae", mesh)
    halves = vae_folders(tmp_path / "out", "Wan2.1-T2V-1.3B-Diffusers", config, vae_parallel(mesh, 1, 0), mesh)
    assert halves["decoder"][0].parent.parent.name == "Wan2.1-T2V-1.3B-Diffusers"
    assert halves["decoder"][0].name == "HP4_1_WP1_0_mesh1x4_bf16"
    back = set()
    for half, (cache, params, convs) in halves.items():
        blocked = [c.name for c in convs if c.c_in_block < c.c_in]
        assert f"{half}.mid_block.resnets.0.conv1" in blocked
        assert check_cache(ttnn, cache, params, wan_vae_state(state, convs, half), mesh) == [], half
        blocks = {c.name: c for c in convs}
        linear, other = HALVES[half]
        for key, value in state.items():
            if key.startswith(other):
                continue
            name = tt_dit_name(key)
            module = name.rsplit(".", 1)[0]
            total = reassemble(ttnn, cache / f"{name}.tensorbin", params[name], mesh)
            if module in blocks and name.endswith(".weight"):  # rows [blocks, kT, kH, kW, block] -> OIkTkHkW
                c = blocks[module]
                rows = total.reshape(c.c_in // c.c_in_block, *c.kernel, c.c_in_block, c.c_out).permute(1, 2, 3, 0, 4, 5)
                total = rows.reshape(*c.kernel, c.c_in, c.c_out)[:, :, :, : value.shape[1]].permute(4, 3, 0, 1, 2)
            elif module == linear:  # channels padded to 32
                z = value.shape[0]
                total = total[:z, :z].T if name.endswith("weight") else total[0, :z]
            elif name.endswith(".weight") and params[name].shape[0] != 1:  # Linears from 1x1 convs
                total = total.T
            assert torch.equal(total.reshape(value.shape), value.float().to(torch.bfloat16).float()), key
            back.add(key)
    assert back == set(state)


# --------------------------------------------------------------------------- CLI, refusals, faults


def test_cli_writes_both(ttnn, sources, tmp_path):
    for family, key in (("wan-vae", "vae"), ("umt5", "umt5")):
        folder = sources[key][0]
        result = runner.invoke(app, ["convert", family, str(folder), "--target", "ttnn", "--cache-style", "tt_dit",
                                     "--ttnn-mesh", "2x4", "--tp-axis", "1", "--sp-axis", "0", "--out", str(tmp_path / family)])
        assert result.exit_code == 0, result.output
    _, convs = wan_decoder(sources["vae"][1])
    assert (tmp_path / "wan-vae" / CHECKPOINT / vae_subfolder(convs) / "HP4_1_WP2_0_mesh2x4_bf16").is_dir()
    assert (tmp_path / "wan-vae" / CHECKPOINT / "vae_encoder" / "HP4_1_WP2_0_mesh2x4_bf16").is_dir()
    assert (tmp_path / "umt5" / CHECKPOINT / "text_encoder" / "TP4_1_mesh2x4_bf16").is_dir()


def test_what_tt_dit_cannot_load_is_refused(sources, tmp_path):
    from fixtures.wan_vae import write_diffusers_vae

    wan22 = tmp_path / "Wan2.2-TI2V-5B-Diffusers" / "vae"
    write_diffusers_vae(wan22, "2.2")
    narrow = tmp_path / "narrow" / "vae"
    write_diffusers_vae(narrow, "2.1")  # base_dim 8
    cases = [("umt5", sources["umt5"][0], {"mesh": "2x4", "fsdp": "true"}, "without FSDP"),
             ("umt5", sources["umt5"][0], {"mesh": "1x8", "tp_axis": "1", "sp_axis": "0"}, "num_heads % tp == 0"),
             ("wan-vae", wan22, {}, "is_residual == 0"),
             ("wan-vae", narrow, {}, "base_dim % 32 == 0")]
    for family, source, options, message in cases:
        with pytest.raises(VidportError) as err:
            convert(plan_conversion(source, "ttnn", family=family, target_options={"cache_style": "tt_dit", **options}),
                    tmp_path / "refused")
        assert message in str(err.value), (family, options, str(err.value))
        assert not (tmp_path / "refused").exists()


def layout_copy(tmp_path: Path, family: str, old: str, new: str) -> Path:
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    layout = mappings / family / "tt_dit" / "cache.yaml"
    text = layout.read_text()
    assert text.count(old) == 1, old
    layout.write_text(text.replace(old, new))
    return mappings


PLANTS = {  # a wrong rule in the family's YAML -> what the check reports
    "umt5 wo split on out": ("umt5", "umt5", '''DenseReluDense.wo.weight",
     mesh_axes: [tp, null]}''', '''DenseReluDense.wo.weight",
     mesh_axes: [null, tp]}''', "encoder.layers.0.ff.dense_gated_dense.wo.weight: shape (128, 16), expected (32, 64)"),
    "umt5 embedding TILE": ("umt5", "umt5", "from: shared.weight, layout: ROW_MAJOR}", "from: shared.weight}",
                            "token_embeddings.weight: DataType.BFLOAT16 Layout.TILE, tt_dit builds bfloat16 ROW_MAJOR"),
    "vae blocking ignored": ("wan-vae", "vae96", '''"192 192 3 3 3": 96''', '''"192 192 3 3 3": 192''',
                             "missing folder vae_cin"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_fault_fails_the_check(ttnn, sources, tmp_path, monkeypatch, plant):
    family, key, old, new, message = PLANTS[plant]
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(layout_copy(tmp_path, family, old, new)))
    folder, config, state = sources[key]
    mesh = (1, 4)
    manifest = run(folder, tmp_path / "out", family, mesh)
    if family == "umt5":
        params, derived = umt5_encoder(config, 1), umt5_state(state)
        cache = tmp_path / "out" / CHECKPOINT / "text_encoder" / "TP4_1_mesh1x4_bf16"
    else:
        params, convs = wan_decoder(config)
        derived = wan_vae_state(state, convs, "decoder")
        cache = tmp_path / "out" / folder.parent.name / vae_subfolder(convs) / "HP4_1_WP1_0_mesh1x4_bf16"
        # the folder written (another hash) holds convs whose rows are not tt_dit's order either, and
        # so does the encoder's (its folder name has no hash to give it away)
        written = tmp_path / "out" / manifest["cache_style"]["cache_dir"]
        assert "decoder.mid_block.resnets.0.conv1.weight: values on device (0, 0) differ" in check_cache(
            ttnn, written, params, derived, mesh)
        encoder, encoder_convs = wan_encoder(config)
        assert "encoder.mid_block.resnets.0.conv1.weight: values on device (0, 0) differ" in check_cache(
            ttnn, cache.parent.parent / "vae_encoder" / cache.name, encoder, wan_vae_state(state, encoder_convs, "encoder"), mesh)
    problems = check_cache(ttnn, cache, params, derived, mesh)
    assert any(p.startswith(message) for p in problems), problems


def test_missing_shard_fails_the_check(ttnn, sources, tmp_path):
    folder, config, state = sources["umt5"]
    mesh = (2, 4)
    run(folder, tmp_path / "out", "umt5", mesh)
    cache = tmp_path / "out" / CHECKPOINT / "text_encoder" / "TP2_0_mesh2x4_bf16"
    path = cache / "encoder.layers.1.self_attn.q_proj.weight.tensorbin"
    shards = ttnn.get_device_tensors(ttnn.load_tensor(path))
    ttnn.dump_tensor(path, ttnn.from_host_shards(shards[:-1], ttnn.MeshShape(1, 7)), mode=ttnn.DumpTensorMode.LOCAL)
    assert check_cache(ttnn, cache, umt5_encoder(config, 0), umt5_state(state), mesh) == [
        "encoder.layers.1.self_attn.q_proj.weight: 7 shards at " + str([(0, c) for c in range(7)]) + " for mesh (2, 4)"]
