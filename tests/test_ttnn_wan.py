"""Issue 16, the emulator part: the Wan DiT written once on the TTNN ops interface, reading tt_dit's
fused parameters (runtime/ttnn/wan_dit.py), run on the host emulator and verified layer by layer
against diffusers' WanTransformer3DModel by `vidport verify`. A cache for a mesh (per-device
shards, heads interleaved per tensor-parallel device, row-parallel biases padded) is put back
together and runs exactly the one-device cache's numbers.

Thresholds are the issue's (tt_dit's own): bfloat16 weights, every block >= 0.9995 on the
reference's inputs and the whole small DiT >= 0.992 running freely; bfloat8_b weights >= 0.99
(the tt_dit style writes only tt_dit's bfloat16 / float32, so bfloat8_b is an as_tensor folder the
same model reads through mappings/wan-dit/tt_dit/cache.yaml). Each new emulator op is checked
against torch; planted faults in the fused file fail verify naming the layer; a cache style no
TTNN model reads (sd_demo) is refused before any reference is built.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.errors import VidportError
from vidport.converter.core.tensorbin import to_bfloat16
from vidport.golden.verify import verify
from vidport.runtime.ttnn.emulator import EmulatorOps

# 4 heads of 32 (dim 128): tt_dit's DistributedLayerNorm needs dim % 32 == 0
SMALL = {"attention_head_dim": 32, "ffn_dim": 256}
BLOCK_FLOOR, MODEL_FLOOR, BFLOAT8_FLOOR = 0.9995, 0.992, 0.99


# --------------------------------------------------------------------------- the new ops against torch


def bf16(t: torch.Tensor) -> np.ndarray:
    """torch's float32 result as a bfloat16 activation holds it (round to nearest even)."""
    return t.to(torch.bfloat16).float().numpy()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return to_bfloat16(np.random.default_rng(0).standard_normal((2, 7, 96)).astype(np.float32) * 3)


def close_to(found: np.ndarray, wanted: np.ndarray, ulps: int = 1) -> bool:
    """Within `ulps` bfloat16 steps of torch's rounded result (float32 math orders differ), or 1e-6
    of it (torch's float32 tanh GELU cancels to 0 below x = -5, where float64 keeps -1.5e-7)."""
    step = np.abs(wanted) * 2.0 ** -7 + 1e-6
    return bool(np.all(np.abs(found - wanted) <= ulps * step))


def test_rms_norm_is_torchs(x):
    weight = to_bfloat16(1 + 0.1 * np.random.default_rng(1).standard_normal((1, 96)).astype(np.float32))
    wanted = torch.nn.functional.rms_norm(torch.from_numpy(x), (96,), torch.from_numpy(weight[0]), eps=1e-6)
    assert close_to(EmulatorOps().rms_norm(x, weight, 1e-6), bf16(wanted))


def test_layer_norm_without_affine_and_in_float32_is_torchs(x):
    wanted = torch.nn.functional.layer_norm(torch.from_numpy(x), (96,), eps=1e-6)
    ops = EmulatorOps()
    assert close_to(ops.layer_norm(x, None, None, 1e-6), bf16(wanted))
    assert np.allclose(ops.layer_norm(x, None, None, 1e-6, dtype="float32"), wanted.numpy(), rtol=1e-5, atol=1e-5)


def test_silu_gelu_tanh_addcmul_typecast_are_torchs(x):
    ops, t = EmulatorOps(), torch.from_numpy(x)
    assert close_to(ops.silu(x), bf16(torch.nn.functional.silu(t)))
    assert np.allclose(ops.silu(x, dtype="float32"), torch.nn.functional.silu(t).numpy(), rtol=1e-6, atol=1e-7)
    assert close_to(ops.gelu(x, approximate=True), bf16(torch.nn.functional.gelu(t, approximate="tanh")))
    assert not close_to(ops.gelu(x, approximate=True), bf16(torch.nn.functional.gelu(t)), ulps=0)  # not the erf form
    b, c = x[:, ::-1].copy(), x[::-1].copy()
    assert close_to(ops.addcmul(x, b, c), bf16(torch.addcmul(t, torch.from_numpy(b), torch.from_numpy(c))))
    wide = np.float32(1 / 3) * x
    assert np.array_equal(ops.typecast(wide, "bfloat16"), bf16(torch.from_numpy(wide)))
    assert np.array_equal(ops.typecast(wide, "float32"), wide)


def test_float32_linear_and_add_round_nothing(x):
    rng = np.random.default_rng(2)
    weight, bias = rng.standard_normal((96, 40)).astype(np.float32), rng.standard_normal((1, 40)).astype(np.float32)
    wanted = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(weight.T), torch.from_numpy(bias[0]))
    ops = EmulatorOps()
    assert np.allclose(ops.linear(x, weight, bias, dtype="float32"), wanted.numpy(), rtol=1e-5, atol=1e-4)
    assert close_to(ops.linear(x, weight, bias), bf16(wanted), ulps=2)
    assert np.array_equal(ops.add(x, np.float32(1 / 3), dtype="float32"), x + np.float32(1 / 3))


def test_rope_tables_and_pair_rotation_are_diffusers():
    """The host RoPE tables equal diffusers' WanRotaryPosEmbed for a non-square grid, and x * cos +
    (x @ R) * sin equals its apply_rotary_emb (as WanAttnProcessor runs it)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from vidport.runtime.ttnn.wan_dit import pair_rotation, rope_tables

    head_dim, latents = 32, torch.zeros(1, 16, 3, 4, 6)
    cos_ref, sin_ref = WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)(latents)
    cos, sin = rope_tables(head_dim, (3, 2, 3), 1024)
    assert np.allclose(cos, cos_ref.numpy(), atol=1e-7) and np.allclose(sin, sin_ref.numpy(), atol=1e-7)
    q = torch.randn(1, 18, 4, head_dim)  # diffusers' [B, S, heads, head_dim]
    x1, x2 = q.unflatten(-1, (-1, 2)).unbind(-1)
    wanted = torch.empty_like(q)
    wanted[..., 0::2] = x1 * cos_ref[..., 0::2] - x2 * sin_ref[..., 1::2]
    wanted[..., 1::2] = x1 * sin_ref[..., 1::2] + x2 * cos_ref[..., 0::2]
    found = q.numpy() * cos + (q.numpy() @ pair_rotation(head_dim)) * sin
    assert np.allclose(found, wanted.numpy(), atol=1e-6)


# --------------------------------------------------------------------------- converted folders


def write_wan(folder: Path, variant: str, seed: int) -> Path:
    from fixtures.wan_dit import random_wan_transformer, wan_config

    random_wan_transformer(wan_config(variant, **SMALL), seed).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def folders(ttnn, tmp_path_factory) -> dict[str, Path]:
    """Wan 2.1 T2V as a one-device tt_dit cache, as caches for meshes 1x4 (tp 4 on axis 1, FSDP)
    and 2x4 (tp 2 on axis 0, sp 4), and as_tensor bfloat8_b; Wan 2.2 TI2V (per-token timesteps) as
    a one-device tt_dit cache."""
    root = tmp_path_factory.mktemp("ttnn-wan")
    t2v = write_wan(root / "Wan2.1-T2V-1.3B-Diffusers" / "transformer", "t2v", 1)
    ti2v = write_wan(root / "Wan2.2-TI2V-5B-Diffusers" / "transformer", "ti2v", 2)
    runs = {"t2v": (t2v, {"cache_style": "tt_dit"}), "ti2v": (ti2v, {"cache_style": "tt_dit"}),
            "t2v-1x4": (t2v, {"cache_style": "tt_dit", "mesh": "1x4"}),
            "t2v-2x4": (t2v, {"cache_style": "tt_dit", "mesh": "2x4"}),
            "t2v-bfloat8_b": (t2v, {"dtype": "bfloat8_b"})}
    for name, (source, options) in runs.items():
        convert(plan_conversion(source, "ttnn", family="wan-dit", target_options=options), root / name)
    return {name: root / name for name in runs}


def by_name(report) -> dict[str, dict]:
    return {r.name: {"local": r.local["pcc"], "global": r.global_["pcc"] if r.global_ else None} for r in report.layers}


@pytest.mark.parametrize("variant", ["t2v", "ti2v"])
def test_tt_dit_cache_passes_verify_per_layer(folders, variant):
    """Every diffusers module has its counterpart (fused parts under their own names) and passes;
    blocks and the whole DiT meet tt_dit's thresholds."""
    report = verify(folders[variant])
    layers = by_name(report)
    assert report.dtype == "bfloat16" and report.passed, report.first_failure
    assert not report.not_in_port and not report.uncompared_outputs
    assert {"blocks.1.attn1.to_q", "blocks.1.attn1.to_k", "blocks.1.attn1.to_v", "blocks.1.attn2.to_k",
            "blocks.1.ffn.net.0.proj", "blocks.1.norm2", "patch_embedding", "(model)"} <= set(layers)
    assert min(r.local["pcc"] for r in report.layers) >= 0.999
    assert min(v["local"] for k, v in layers.items() if k.split("#")[0] in ("blocks.0", "blocks.1")) >= BLOCK_FLOOR
    assert min(v["global"] for k, v in layers.items() if k.startswith("(model)")) >= MODEL_FLOOR
    if variant == "ti2v":
        assert "(model)#1" in layers  # the per-token timestep probe ran too


def test_bfloat8_b_weights_pass_verify(folders):
    folder = folders["t2v-bfloat8_b"]
    entries = json.loads((folder / "ttnn_manifest.json").read_text())["tensors"]
    assert entries["blocks.0.attn1.to_q.weight"]["dtype"] == "bfloat8_b"  # canonical names, not fused
    report = verify(folder)
    assert report.dtype == "bfloat8_b" and report.threshold.min_pcc == BFLOAT8_FLOOR and report.passed
    assert min(r.local["pcc"] for r in report.layers) >= BFLOAT8_FLOOR
    assert min(v["global"] for k, v in by_name(report).items() if k == "(model)") >= BFLOAT8_FLOOR


@pytest.mark.parametrize("mesh", ["1x4", "2x4"])
def test_mesh_cache_runs_the_one_device_numbers(folders, mesh):
    """The shards put back together and the tensor-parallel layout undone, every diffusers layer's
    output equals the one-device cache's (which verify passes above) but for a few bfloat16
    roundings: the fused weights' columns are permuted, and numpy's BLAS sums them in another order."""
    from vidport.golden.port_ttnn import TtnnPort
    from vidport.reference.wan_dit import probes

    config = json.loads((folders["t2v"] / "vidport_manifest.json").read_text())["config"]
    cache_style = json.loads((folders[f"t2v-{mesh}"] / "ttnn_manifest.json").read_text())["cache_style"]
    assert cache_style["parallel_config"]["mesh"] == [int(n) for n in mesh.split("x")]
    one, sharded = (TtnnPort.open(folders[k]).run(probes(config, seed=0))[0] for k in ("t2v", f"t2v-{mesh}"))
    assert one.keys() == sharded.keys() and len(one) > 60
    for name in (k for k in one if not k.endswith(("to_qkv", "to_kv"))):  # those two: the tp layout itself
        differ = one[name] != sharded[name]
        assert differ.mean() <= 1e-3, name
        assert np.all(np.abs(one[name] - sharded[name]) <= 2.0 ** -7 * np.abs(one[name]).max()), name


def test_planted_faults_in_fused_files_are_named(ttnn, folders, tmp_path):
    """In the 1x4 cache (tp 4): blocks.0's to_qkv has q and k swapped; blocks.1's is not interleaved
    per device ([q | k | v] whole, as a one-device cache holds it), so each device would get the
    wrong heads."""
    from vidport.converter.targets.tt_dit import mesh_dumper

    folder = tmp_path / "faulty"
    shutil.copytree(folders["t2v-1x4"], folder)
    entries = json.loads((folder / "ttnn_manifest.json").read_text())["tensors"]
    dump = mesh_dumper()

    def rewrite(name: str, change) -> None:
        path = folder / entries[name]["file"]
        shards = [ttnn.to_torch(s).float().numpy() for s in ttnn.get_device_tensors(ttnn.load_tensor(str(path)))]
        total = np.concatenate(shards, axis=1)  # mesh 1x4: the tp axis (1) splits tensor axis 1
        dump(path, change(total), "bfloat16", "TILE", (1, 4), (0, 1) if total.shape[0] > 1 else (None, 1))

    def per_device(a: np.ndarray) -> list[list[np.ndarray]]:  # [device][q, k, v] slices
        return [np.split(d, 3, axis=1) for d in np.split(a, 4, axis=1)]

    def swap_qk(a: np.ndarray) -> np.ndarray:
        return np.concatenate([x for q, k, v in per_device(a) for x in (k, q, v)], axis=1)

    def not_interleaved(a: np.ndarray) -> np.ndarray:
        slices = per_device(a)
        return np.concatenate([slices[d][p] for p in range(3) for d in range(4)], axis=1)

    for param in ("weight", "bias"):
        rewrite(f"blocks.0.attn1.to_qkv.{param}", swap_qk)
        rewrite(f"blocks.1.attn1.to_qkv.{param}", not_interleaved)
    report = verify(folder)
    failed = {r.name for r in report.layers if not r.passed}
    assert not report.passed and report.first_failure == "blocks.0.attn1.to_q"
    assert {"blocks.0.attn1.to_q", "blocks.0.attn1.to_k", "blocks.1.attn1.to_q", "blocks.1.attn1.to_k",
            "blocks.1.attn1.to_v"} <= failed
    assert not {"blocks.0.attn1.to_v", "blocks.0.attn2.to_q", "blocks.1.attn2.to_k"} & failed


# --------------------------------------------------------------------------- refused up front


def no_reference(*args, **kwargs):
    raise AssertionError("the reference was built before the folder was refused")


def test_mesh_cache_without_ttnn_is_refused_up_front(folders, monkeypatch):
    monkeypatch.setattr("vidport.converter.ttnn_support.import_ttnn", lambda: None)
    monkeypatch.setattr("vidport.golden.verify.reference_calls", no_reference)
    with pytest.raises(VidportError, match="sharded for mesh 1x4, whose multi-device files only ttnn reads") as err:
        verify(folders["t2v-1x4"])
    assert "no --ttnn-mesh" in err.value.hint


def test_sd_demo_cache_is_refused_up_front(tmp_path, monkeypatch):
    """An AnimateDiff motion module in the SD demo's layouts: its TTNN model reads the target's
    layouts, so verify says so in one line before building diffusers' model."""
    from typer.testing import CliRunner

    from fixtures.motion import write_diffusers_motion_adapter
    from vidport.cli import app

    source = tmp_path / "motion"
    write_diffusers_motion_adapter(source)
    convert(plan_conversion(source, "ttnn", family="animatediff-motion", target_options={"cache_style": "sd_demo"}),
            tmp_path / "demo")
    monkeypatch.setattr("vidport.golden.verify.reference_calls", no_reference)
    with pytest.raises(VidportError, match="a sd_demo cache, whose layouts animatediff-motion's TTNN model") as err:
        verify(tmp_path / "demo")
    assert "\n" not in err.value.message and "--cache-style as_tensor" in err.value.hint
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "demo")])
    assert result.exit_code != 0 and "sd_demo cache" in result.output
