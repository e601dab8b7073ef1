"""Verifying quantized MLX outputs against the float32 reference (diffusers): per layer at each format's
measured thresholds, a planted wrong-scales layer named, worst layers first, `vidport quantize-report`,
and `verify --pipeline` on a quantized Wan folder with the error growth over the steps."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.quantize import QuantFormat
from vidport.golden.metrics import PIPELINE_THRESHOLDS, THRESHOLDS, threshold_for
from vidport.golden.quantize_report import parse_format
from vidport.golden.verify import verify
from fixtures.wan_dit import write_native

FORMATS = ["affine-q8-g64", "affine-q4-g64", "mxfp8-g32", "mxfp4-g32", "nvfp4-g16"]
HEADS = {"num_attention_heads": 4}  # shapes cannot tell heads; the small models have 4
PLANTED = "blocks.1.ffn.net.2"  # the second block's feed-forward output projection


@pytest.fixture(scope="module")
def wan_dit(tmp_path_factory):
    """The small Wan 2.1 T2V DiT (native layout) and its float32 reference run as a golden."""
    root = tmp_path_factory.mktemp("quantize-verify")
    source = write_native(root / "t2v.safetensors", "t2v", seed=1).pop("_path")
    golden = root / "reference.golden.safetensors"
    convert(plan_conversion(source, "mlx", "wan-dit", None, HEADS), root / "float")
    assert verify(root / "float", save_to=golden).passed
    return {"root": root, "source": source, "golden": golden}


def quantized(wan_dit, name: str):
    folder = wan_dit["root"] / name
    if not folder.exists():
        convert(plan_conversion(wan_dit["source"], "mlx", "wan-dit", None, HEADS, quantize=parse_format(name)), folder)
    return folder


@pytest.mark.parametrize("name", FORMATS)
def test_per_layer_verify_passes_at_the_format_thresholds(wan_dit, name):
    """Every layer that is or holds a quantized linear passes at the format's thresholds and is
    held to them; the float layers (embedders, patchify, output head) still at float32's."""
    report = verify(quantized(wan_dit, name), golden=wan_dit["golden"])
    assert report.passed, report.first_failure
    assert report.quantization == name
    held = {r.name: r for r in report.layers if r.quantized}
    assert {"blocks.0.attn1.to_q", "blocks.1.ffn.net.2", "blocks.0", "(model)"} <= set(held)
    assert all(r.quantized == name for r in held.values())
    floats = [r for r in report.layers if not r.quantized]
    assert {"patch_embedding", "proj_out", "condition_embedder"} <= {r.name for r in floats}
    assert all(r.local["pcc"] >= threshold_for("float32").min_pcc for r in floats)
    # the bits cost something a float32 port would be failed for
    assert min(r.local["pcc"] for r in held.values()) < threshold_for("float32").min_pcc
    layer = report.as_json()["layers"][0]
    assert {"pcc", "rel_l2", "snr_db", "passed"} <= set(layer)


def test_format_names_round_trip():
    for name in [*FORMATS, "affine-q2-g32", "affine-q5-g128"]:
        assert parse_format(name).name == name
    assert parse_format("mxfp4-g32") == QuantFormat("mxfp4", 4, 32)


def test_planted_wrong_scales_fail_and_are_named(wan_dit, tmp_path):
    """One quantized layer's scales x1.5 (PCC alone cannot see a scaled output; relative L2 does):
    verify fails, names that layer first, and ranks the failing layers first."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "planted"
    shutil.copytree(quantized(wan_dit, "affine-q4-g64"), folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights[f"{PLANTED}.scales"] = weights[f"{PLANTED}.scales"] * np.float32(1.5)
    save_file(weights, str(folder / "model.safetensors"))
    report = verify(folder, golden=wan_dit["golden"])
    assert not report.passed
    assert report.first_failure == PLANTED
    failing = {r.name for r in report.layers if not r.passed}
    assert PLANTED in failing and failing <= {PLANTED, "blocks.1.ffn", "blocks.1", "(model)"}  # it and what holds it
    assert {r.name for r in report.ranked()[:len(failing)]} == failing
    assert set(report.as_json()["worst_layers"][:len(failing)]) == failing


def test_report_orders_worst_first(wan_dit, tmp_path):
    """`vidport verify DIR` on a quantized folder: the table and the JSON list the worst layers first."""
    folder = quantized(wan_dit, "affine-q4-g64")
    result = CliRunner().invoke(app, ["verify", str(folder), "--golden", str(wan_dit["golden"]),
                                      "--json", str(tmp_path / "r.json")], terminal_width=250)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    by_pcc = sorted(data["layers"], key=lambda layer: layer["pcc"])
    assert data["quantization"] == "affine-q4-g64"
    assert data["worst_layers"] == [layer["name"] for layer in by_pcc[:10]]
    assert "worst first" in result.output and "SNR dB" in result.output
    rows = [line for line in result.output.splitlines() if re.search(r"\d\.\d{6}", line)]
    shown = [float(re.search(r"\s(\d\.\d{6})\s", row)[1]) for row in rows]
    assert shown == sorted(shown) and shown[0] == pytest.approx(by_pcc[0]["pcc"], abs=1e-6)


def test_quantize_report_writes_table_and_html(wan_dit, tmp_path):
    """One series per format in the HTML's plot (inline SVG, nothing fetched), the table in JSON: fewer
    bits, fewer bytes and more error."""
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["quantize-report", str(wan_dit["source"]), "--family", "wan-dit",
                                      "--set", "num_attention_heads=4", "--formats", "affine-q8-g64,mxfp4-g32",
                                      "--out", str(out)], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "affine-q8-g64" in result.output and "mxfp4-g32" in result.output
    data = json.loads((out / "quantize-report.json").read_text())
    rows = {row["format"]: row for row in data["formats"]}
    assert list(rows) == ["float", "affine-q8-g64", "mxfp4-g32"]
    assert rows["float"]["weight_bytes"] > rows["affine-q8-g64"]["weight_bytes"] > rows["mxfp4-g32"]["weight_bytes"]
    assert rows["affine-q8-g64"]["median_pcc"] > rows["mxfp4-g32"]["median_pcc"]
    assert rows["mxfp4-g32"]["worst_pcc"] < rows["mxfp4-g32"]["median_pcc"]
    assert all(row["passed"] for row in rows.values()) and rows["mxfp4-g32"]["quantized_layers"] == 20  # 2 blocks x 10 linears
    assert len(data["layers"]["mxfp4-g32"]) == len(data["layers"]["float"])
    page = (out / "quantize-report.html").read_text()
    assert re.findall(r'class="series" data-format="([^"]+)"', page) == ["affine-q8-g64", "mxfp4-g32"]
    assert "<script" not in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_unknown_format_is_refused(wan_dit, tmp_path):
    result = CliRunner().invoke(app, ["quantize-report", str(wan_dit["source"]), "--family", "wan-dit",
                                      "--formats", "affine-q4-g48", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "affine-q4-g48: affine takes groups of 32 or 64 or 128" in result.output


def test_pipeline_verify_quantized_wan(tmp_path):
    """`verify --pipeline` on a 4-bit Wan T2V folder: the same noise through diffusers' float32
    pipeline; passes at the format's pipeline thresholds (float32's would fail it) and reports the
    error growth over the steps."""
    from fixtures.wan_pipelines import write_wan_pipeline

    source = write_wan_pipeline(tmp_path / "wan", "t2v", seed=0)
    runner = CliRunner()
    out = tmp_path / "wan-q4"
    result = runner.invoke(app, ["convert", "wan", str(source), "--out", str(out), "--quantize", "4"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(out), "--pipeline", "--json", str(tmp_path / "p.json")],
                           terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "error growth over the steps" in result.output
    task = json.loads((tmp_path / "p.json").read_text())["tasks"][0]
    assert task["quantization"] == "affine-q4-g64" and task["passed"]
    assert task["threshold"]["min_step_pcc"] == PIPELINE_THRESHOLDS["affine-q4-g64"].min_step_pcc
    growth = task["growth"]
    assert growth["first_step_pcc"] == task["steps"][0]["pcc"] and growth["last_step_pcc"] == task["steps"][-1]["pcc"]
    assert growth["last_step_error"] > growth["first_step_error"] > 0
    assert task["worst_step_pcc"] < PIPELINE_THRESHOLDS["float32"].min_step_pcc or task["psnr"] < PIPELINE_THRESHOLDS["float32"].min_psnr


def test_every_format_has_thresholds():
    """The formats MLX offers that the fixtures measured have both tables' entries."""
    for name in FORMATS:
        assert THRESHOLDS[name].max_rel_l2 is not None and name in PIPELINE_THRESHOLDS


@pytest.mark.slow  # heavy; CI runs it (make test under CI=true)
def test_pipeline_verify_quantized_animatediff(tmp_path):
    """An AnimateDiff folder converted with --quantize 8: the UNet's and the motion module's block
    linears are quantized layers (the motion UNet loads both conversions' formats), the VAE and text
    encoder stay float, and the generation meets the 8-bit pipeline thresholds against diffusers."""
    import mlx.nn as nn

    from fixtures.motion import write_original_motion_module
    from fixtures.pipelines import write_sd_pipeline_folder
    from vidport.converter.pipeline import convert_pipeline, plan_pipeline
    from vidport.golden.pipeline_parity import pipeline_parity
    from vidport.runtime.pipelines.protocol import open_pipeline

    sd, motion = tmp_path / "sd15-small", tmp_path / "mm.ckpt"
    write_sd_pipeline_folder(sd)
    write_original_motion_module(motion, "v2", seed=3)
    out = tmp_path / "ad-q8"
    manifest = convert_pipeline(plan_pipeline("animatediff", {"sd": sd, "motion": motion}, "mlx",
                                              quantize=QuantFormat.parse(8)), out)
    quantized_parts = {name for name in manifest["components"]
                       if json.loads((out / name / "vidport_manifest.json").read_text()).get("quantization")}
    assert quantized_parts == {"unet", "motion_adapter"}
    unet = open_pipeline(out).model("unet")
    layers = [m for _, m in unet.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert layers and all(m.bits == 8 and m.group_size == 64 for m in layers)
    report = pipeline_parity(out, "t2v")
    assert report.passed and report.threshold == PIPELINE_THRESHOLDS["affine-q8-g64"]
    assert report.worst_step.metrics["pcc"] < 0.999999  # quantized: not the float32 result
