"""`vidport explain SRC KEY`: where one source key goes. The rule's file:line is checked against the
YAML itself, target names and shapes against the source tensor and the target spec's own role
transforms, so none of the expected values comes from the code under test."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.core.errors import VidportError
from vidport.converter.explain import explain_key

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
TO_Q = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight"
PE = "down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"


def rule_line(spec: Path, needle: str) -> int:
    """The 1-based line of the rule item (`- from: ...`) whose line contains `needle`."""
    lines = spec.read_text().splitlines()
    (index,) = [i for i, line in enumerate(lines) if needle in line and line.lstrip().startswith("- from:")]
    return index + 1


def explain(*args: str) -> str:
    result = runner.invoke(app, ["explain", *args])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_motion_key_shows_rule_line_target_and_transforms(motion_sources):
    spec = ROOT / "mappings" / "animatediff-motion" / "original.yaml"
    line = rule_line(spec, "attention_blocks.{a}.{rest:.+}")
    shape = list(torch.load(motion_sources["v2"], weights_only=True)[TO_Q].shape)
    canonical = "down_blocks.1.motion_modules.0.transformer_blocks.0.attn1.to_q.weight"
    text = explain(str(motion_sources["v2"]), TO_Q)
    assert f"animatediff-motion/original.yaml:{line} " in text
    assert f"canonical {canonical} [{shape[0]}, {shape[1]}]" in text
    assert "mlx role linear.weight: none (targets/mlx.yaml)" in text  # mlx.yaml: linears keep [out, in]
    assert f"mlx {canonical} [{shape[0]}, {shape[1]}]" in text
    # the same key for TTNN: its role table transposes linear weights to [in, out]
    ttnn_linear = yaml.safe_load((ROOT / "mappings" / "targets" / "ttnn.yaml").read_text())["roles"]["linear.weight"]
    assert ttnn_linear["transforms"] == ["transpose"]
    text = explain(str(motion_sources["v2"]), TO_Q, "--target", "ttnn")
    assert "ttnn role linear.weight: transpose (targets/ttnn.yaml)" in text
    assert f"ttnn {canonical} [{shape[1]}, {shape[0]}] (TILE, bfloat16)" in text


def test_dropped_key_gives_its_reason(motion_sources):
    spec = ROOT / "mappings" / "animatediff-motion" / "original.yaml"
    line = rule_line(spec, "pos_encoder.pe")
    why = next(r["why"] for r in yaml.safe_load(spec.read_text())["rules"] if r.get("drop"))
    text = explain(str(motion_sources["v2"]), PE)
    assert f"animatediff-motion/original.yaml:{line} " in text and f"dropped on purpose: {why}" in text
    assert "canonical" not in text


def test_family_target_rule_and_conv_transforms(tmp_path):
    """The whole chain: the MLX role's permute of a Conv3d, and a family target rule (the Wan VAE's
    RMS-norm scales reshaped to (C,)) with its own line in family.yaml."""
    from fixtures.wan_vae import write_diffusers_vae

    folder = tmp_path / "vae"
    write_diffusers_vae(folder, "2.1", seed=0)
    mlx_roles = yaml.safe_load((ROOT / "mappings" / "targets" / "mlx.yaml").read_text())["roles"]
    assert mlx_roles["conv3d.weight"] == [{"permute": [0, 2, 3, 4, 1]}]
    from safetensors import safe_open

    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "np") as handle:
        o, i, t, h, w = handle.get_slice("encoder.conv_in.weight").get_shape()
        channels = handle.get_slice("decoder.mid_block.resnets.0.norm1.gamma").get_shape()[0]
    text = explain(str(folder), "encoder.conv_in.weight")
    assert "mlx role conv3d.weight: permute(0, 2, 3, 4, 1) (targets/mlx.yaml)" in text
    assert f"mlx encoder.conv_in.weight [{o}, {t}, {h}, {w}, {i}]" in text
    family = ROOT / "mappings" / "wan-vae" / "family.yaml"
    line = rule_line(family, "{p:.+}.gamma")
    text = explain(str(folder), "decoder.mid_block.resnets.0.norm1.gamma")
    assert f"mlx rule wan-vae/family.yaml:{line} {{p:.+}}.gamma -> {{p}}.gamma; transforms: reshape(-1)" in text
    assert f"mlx decoder.mid_block.resnets.0.norm1.gamma [{channels}]" in text


@pytest.mark.skipif(importlib.util.find_spec("wan") is None, reason="the official Wan code writes the native CLIP file")
def test_fused_key_shows_each_part(tmp_path):
    from fixtures.wan_encoders import CLIP_VISION_SMALL, write_native_clip

    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    write_native_clip(path, seed=1)
    width = CLIP_VISION_SMALL["hidden_size"]
    line = rule_line(ROOT / "mappings" / "clip-vision" / "native.yaml", "attn.to_qkv")
    found = explain_key(path, "visual.transformer.1.attn.to_qkv.weight")
    assert found.rule.where == f"clip-vision/native.yaml:{line}"
    assert [(c.key, c.shape, c.part) for c in found.canonical] == [
        (f"encoder.layers.1.self_attn.{p}_proj.weight", (width, width), f"part {n} of 3 of the split")
        for n, p in ((1, "q"), (2, "k"), (3, "v"))]
    assert all(c.steps == ["split(axis=0, parts=3)"] and [t.key for t in c.targets] == [c.key] for c in found.canonical)
    text = explain(str(path), "visual.transformer.1.attn.to_qkv.weight")
    assert all(f"mlx encoder.layers.1.self_attn.{p}_proj.weight [{width}, {width}]" in text for p in "qkv")


def test_key_no_rule_takes_and_key_not_in_the_file(motion_sources, tmp_path):
    state = torch.load(motion_sources["v2"], weights_only=True)
    state["extra_head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.ckpt")
    line = rule_line(ROOT / "mappings" / "animatediff-motion" / "original.yaml", "temporal_transformer.{rest:.+}")
    text = explain(str(tmp_path / "extra.ckpt"), "extra_head.weight")
    assert "no rule of animatediff-motion/original takes this key" in text
    assert f"closest rule: animatediff-motion/original.yaml:{line} " in text
    result = runner.invoke(app, ["explain", str(motion_sources["v2"]), TO_Q.replace("to_q", "to_qq")])
    assert result.exit_code == 1 and "no tensor" in result.output and f"closest key: {TO_Q}" in result.output
    with pytest.raises(VidportError, match="no tensor"):
        explain_key(motion_sources["v2"], "nothing.like.it")
