"""Done-means 2 and 5: planted faults are caught and named; a saved golden verifies offline,
in a process where importing torch fails; the report has the promised shape."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.convert import convert, plan_conversion
from vidport.converter.core.manifest import MANIFEST
from vidport.golden.metrics import passes, threshold_for
from vidport.golden.verify import verify
from fixtures.faults import perturbed_copy

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


@pytest.fixture(scope="module")
def converted(motion_sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "mm-v2-mlx"
    convert(plan_conversion(motion_sources["v2"], "mlx"), out)
    return out


def test_perturbed_tensor_is_named(converted, tmp_path):
    key = "up_blocks.1.motion_modules.1.transformer_blocks.0.attn2.to_v.weight"
    broken = perturbed_copy(converted, tmp_path / "broken", key)
    report = verify(broken, frames=8)
    assert not report.passed
    assert report.first_failure == "up_blocks.1.motion_modules.1.transformer_blocks.0.attn2.to_v"
    # local error isolates the fault: every layer before it in dataflow order passes
    names = [r.name for r in report.layers]
    assert all(r.passed for r in report.layers[: names.index(report.first_failure)])


def test_transposed_linear_in_spec_is_caught(motion_sources, tmp_path, monkeypatch):
    """A spec that transposes the (square) to_k weights passes every shape check; verify catches it."""
    mappings = tmp_path / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    spec = mappings / "animatediff-motion" / "original.yaml"
    text = spec.read_text()
    planted = ('  - from: "{b:.+}.motion_modules.{m}.temporal_transformer.transformer_blocks.{t}.attention_blocks.{a}.to_k.weight"\n'
               '    to: "{b}.motion_modules.{m}.transformer_blocks.{t}.attn{a+1}.to_k.weight"\n'
               '    transforms: [transpose]\n')
    marker = "  - from: \"{b:.+}.motion_modules.{m}.temporal_transformer.transformer_blocks.{t}.attention_blocks.{a}.{rest:.+}\""
    spec.write_text(text.replace(marker, planted + marker))
    monkeypatch.setenv("VIDPORT_MAPPINGS", str(mappings))
    convert(plan_conversion(motion_sources["v2"], "mlx"), tmp_path / "out")
    report = verify(tmp_path / "out", frames=8)
    assert not report.passed
    assert report.first_failure == "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_k"


def test_cli_reports(converted, tmp_path):
    result = runner.invoke(app, ["verify", str(converted), "--frames", "8", "--json", str(tmp_path / "r.json"),
                                 "--html", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) == {"passed", "first_failure", "reference", "reference_run", "source", "overrides", "assumed",
                           "warnings", "dtype", "uncompared_outputs", "layers"}
    assert report["passed"] is True and report["first_failure"] is None
    assert report["reference"] == "diffusers:MotionAdapter.from_single_file" and report["reference_run"] == "live"
    assert report["source"]["matches_conversion"] is True and report["dtype"] == "float32"
    assert report["overrides"] == {} and report["warnings"] == [] and report["uncompared_outputs"] == []
    layer = report["layers"][0]
    assert {"name", "pcc", "max_abs", "passed"} <= set(layer)
    assert isinstance(layer["pcc"], float) and isinstance(layer["passed"], bool)
    html = (tmp_path / "r.html").read_text()
    assert "<svg" in html and "polyline" in html and "PASSED" in html


def test_failing_verify_exits_nonzero(converted, tmp_path):
    broken = perturbed_copy(converted, tmp_path / "broken", "mid_block.motion_modules.0.proj_in.weight")
    result = runner.invoke(app, ["verify", str(broken), "--frames", "8", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 2
    assert json.loads((tmp_path / "r.json").read_text())["first_failure"] == "mid_block.motion_modules.0.proj_in"


BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith(("torch.", "diffusers", "transformers")):
            raise ImportError("torch is not installed here")
sys.meta_path.insert(0, Block())
sys.argv = ["vidport"] + sys.argv[1:]
from vidport.cli import app
try:
    app()
finally:
    assert "torch" not in sys.modules
"""


def test_offline_golden_without_torch(converted, tmp_path):
    golden = tmp_path / "mm.golden.safetensors"
    result = runner.invoke(app, ["verify", str(converted), "--frames", "8", "--save-golden", str(golden)])
    assert result.exit_code == 0, result.output
    assert golden.exists() and golden.with_suffix(".json").exists()
    info = json.loads(golden.with_suffix(".json").read_text())
    assert info["seed"] == 0 and "torch" in info["versions"] and info["dtype"] == "float32"
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "verify", str(converted), "--golden", str(golden),
                           "--json", str(tmp_path / "offline.json")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "offline.json").read_text())["passed"] is True
    # the golden catches a broken port just as well
    broken = perturbed_copy(converted, tmp_path / "broken", "down_blocks.2.motion_modules.1.proj_out.weight")
    done = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "verify", str(broken), "--golden", str(golden),
                           "--json", str(tmp_path / "offline2.json")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert json.loads((tmp_path / "offline2.json").read_text())["first_failure"] == "down_blocks.2.motion_modules.1.proj_out"


# ---------------------------------------------------------------- issue 10: verify must not pass what is wrong


def test_thresholds_follow_the_weights_not_the_manifest(converted, tmp_path):
    """A float32 port damaged within bfloat16's tolerance fails; writing "bfloat16" into its
    manifest does not loosen the thresholds (the weights are float32), and the report says so."""
    key = "down_blocks.1.motion_modules.0.transformer_blocks.0.attn1.to_q.weight"
    broken = perturbed_copy(converted, tmp_path / "broken", key, scale=0.002)
    report = verify(broken, frames=8)
    assert not report.passed and report.dtype == "float32"
    loose = threshold_for("bfloat16")  # what the manifest's word used to choose: it passes the damage
    assert all(passes(r.local, loose) and (r.global_ is None or passes(r.global_, loose)) for r in report.layers)
    manifest = json.loads((broken / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**manifest, "dtype": "bfloat16"}))
    relabelled = verify(broken, frames=8)
    assert not relabelled.passed and relabelled.dtype == "float32"
    assert relabelled.first_failure == report.first_failure
    assert any("manifest says dtype bfloat16" in w for w in relabelled.info["warnings"])


def test_source_other_than_converted_warns_and_strict_refuses(converted, motion_sources, tmp_path):
    """The same tensors in another file (a legacy torch pickle): the numbers agree, but it is not the
    file that was converted: a loud warning; --strict makes it an error before any reference."""
    other = tmp_path / "mm_v2_legacy.ckpt"
    torch.save(torch.load(motion_sources["v2"], weights_only=True), other, _use_new_zipfile_serialization=False)
    report = verify(converted, source=other, frames=8)
    assert report.passed and report.info["source"]["matches_conversion"] is False
    assert any("not the source that was converted" in w for w in report.as_json()["warnings"])
    result = runner.invoke(app, ["verify", str(converted), "--source", str(other), "--frames", "8"])
    assert result.exit_code == 0 and "WARNING" in result.output and "not the source that was converted" in result.output
    result = runner.invoke(app, ["verify", str(converted), "--source", str(other), "--frames", "8", "--strict"])
    assert result.exit_code == 1 and "not the source that was converted" in result.output
    assert "Traceback" not in result.output and "per-layer parity" not in result.output
    assert runner.invoke(app, ["verify", str(converted), "--frames", "8", "--strict"]).exit_code == 0


def test_values_from_set_are_shown(motion_sources, tmp_path):
    """--set heads makes port and reference wrong together (verify passes): the report says the
    value came from --set, not from the file."""
    convert(plan_conversion(motion_sources["v2"], "mlx", overrides={"motion_num_attention_heads": 4}), tmp_path / "out")
    result = runner.invoke(app, ["verify", str(tmp_path / "out"), "--frames", "8", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "from --set" in result.output and "motion_num_attention_heads=4" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["overrides"] == {"motion_num_attention_heads": 4}
