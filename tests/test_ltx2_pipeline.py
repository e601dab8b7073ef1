"""`vidport convert ltx2`: one LTX-2 release (the original single file plus the upsampler file and
a Gemma folder, or a Diffusers folder) into one pipeline folder; each family also converts alone
from the same single file; what is not LTX-2 is refused by name, and a release without its audio
parts converts to a video-only folder that says what was absent."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.core.manifest import read_manifest
from vidport.converter.pipeline import convert_pipeline, plan_pipeline
from fixtures.ltx2_release import (SMALL_SETTINGS, write_diffusers_release, write_gemma_folder,
                                   write_original_release, write_upsampler_file)
from fixtures.ltx_video import write_ltx_video_file

def settings(version: str = "2.0") -> list[str]:
    return [option for key, value in SMALL_SETTINGS[version].items() for option in ("--set", f"{key}={value}")]


SETS = settings("2.0")
EVERY = {"transformer", "connectors", "vae", "audio_vae", "vocoder", "latent_upsampler", "text_encoder"}
FAMILIES = {"transformer": "ltx2-dit", "connectors": "ltx2-connectors", "vae": "ltx2-video-vae",
            "audio_vae": "ltx2-audio-vae", "vocoder": "ltx2-vocoder", "latent_upsampler": "ltx2-upsampler",
            "text_encoder": "gemma3-text"}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ltx2-release")
    return {"original": write_original_release(root / "ltx-2-19b-dev.safetensors"),
            "video-only": write_original_release(root / "ltx-2-video-only.safetensors", seed=7, audio=False),
            "2.3": write_original_release(root / "ltx-2.3.safetensors", seed=11, version="2.3"),
            "upsampler": write_upsampler_file(root / "ltx-2-spatial-upscaler-x2-1.0.safetensors"),
            "gemma": write_gemma_folder(root / "gemma-3"),
            "diffusers": write_diffusers_release(root / "LTX-2-Diffusers")}


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ltx2-mlx") / "ltx2"
    result = CliRunner().invoke(app, ["convert", "ltx2", str(release["original"]), "--input",
                                      f"upsampler={release['upsampler']}", "--input", f"gemma={release['gemma']}",
                                      "--out", str(out), *SETS])
    assert result.exit_code == 0, result.output
    return out


def test_original_release_is_one_folder(converted, release):
    """Every component from its own source, by its family's spec; the tokenizer's files alone are
    copied from the Gemma folder (not its weights); the scheduler is diffusers' LTX-2 schedule."""
    manifest = read_manifest(converted)
    assert manifest["pipeline"] == "ltx2" and set(manifest["components"]) == EVERY and manifest["absent"] == {}
    for name, entry in manifest["components"].items():
        assert entry["family"] == FAMILIES[name]
        component = read_manifest(converted / name)
        source = {"latent_upsampler": release["upsampler"], "text_encoder": release["gemma"]}.get(name, release["original"])
        assert Path(component["source"]) == source.absolute(), name
    tokenizer_files = {p.name for p in (converted / "tokenizer").iterdir()}
    assert "tokenizer.json" in tokenizer_files and not any(n.endswith(".safetensors") or n == "config.json"
                                                           for n in tokenizer_files)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(converted / "scheduler")
    assert scheduler.config.use_dynamic_shifting and scheduler.config.shift_terminal == 0.1
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == "LTX2Pipeline" and index["transformer"] == ["diffusers", "LTX2VideoTransformer3DModel"]


def test_pipeline_folder_verifies_component_by_component(converted):
    """`vidport verify DIR --components` on the folder: each component layer by layer against its own
    reference (diffusers, transformers or the official LTX-2 code reading the same file), all passing."""
    result = CliRunner().invoke(app, ["verify", str(converted), "--components",
                                      "--json", str(converted.parent / "report.json")])
    assert result.exit_code == 0, result.output
    reports = json.loads((converted.parent / "report.json").read_text())
    assert set(reports) == EVERY
    assert all(report["passed"] for report in reports.values())
    assert reports["vae"]["reference"].startswith("diffusers:AutoencoderKLLTX2Video")


@pytest.mark.slow  # heavy; CI runs it (make test under CI=true)
def test_a_planted_fault_in_one_component_fails_the_folder(converted, tmp_path):
    """One tensor of the vocoder scaled in the converted folder: the folder's verify fails, naming it."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "faulty"
    shutil.copytree(converted, folder)
    for path in (folder / "vae").glob("*.safetensors"):
        tensors = load_file(str(path))
        name = sorted(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 5)[-1]
        tensors[name] = (tensors[name] * np.float32(1.5)).astype(tensors[name].dtype)
        save_file(tensors, str(path), metadata={"format": "mlx"})
    result = CliRunner().invoke(app, ["verify", str(folder), "--components"])
    assert result.exit_code == 2, result.output
    assert "failed: vae" in " ".join(result.output.split())


def test_diffusers_release_is_one_folder(release, tmp_path):
    plan = plan_pipeline("ltx2", {"ltx2": release["diffusers"]}, "mlx")
    assert set(plan.components) == EVERY and plan.absent == {}
    manifest = convert_pipeline(plan, tmp_path / "out")
    assert {entry["spec"] for entry in manifest["components"].values()} >= {"ltx2-dit/diffusers", "ltx2-video-vae/diffusers"}
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.slow  # heavy; CI runs it (make test under CI=true)
def test_ltx23_release_is_one_folder(release, tmp_path):
    """An LTX-2.3 single file: its DiT, connectors and vocoder are the 2.3 forms (the vocoder is the
    bandwidth-extension class, chosen by the component's alternatives), and the folder verifies."""
    out = tmp_path / "ltx23"
    result = CliRunner().invoke(app, ["convert", "ltx2", str(release["2.3"]), "--out", str(out), *settings("2.3")])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    specs = {name: entry["spec"] for name, entry in manifest["components"].items()}
    assert specs["transformer"] == "ltx2-dit/original-2.3" and manifest["components"]["vocoder"]["family"] == "ltx2-vocoder-bwe"
    assert read_manifest(out / "transformer")["config"]["use_cross_timestep"] is True
    index = json.loads((out / "model_index.json").read_text())
    assert index["vocoder"] == ["diffusers", "LTX2VocoderWithBWE"]
    result = CliRunner().invoke(app, ["verify", str(out), "--components"])
    assert result.exit_code == 0, result.output


def test_release_without_audio_converts_video_only(release, tmp_path):
    """A file with no audio_vae.* and vocoder.* keys: the video families convert, the audio ones
    are absent, the command line and the manifest say so and why."""
    out = tmp_path / "video-only"
    result = CliRunner().invoke(app, ["convert", "ltx2", str(release["video-only"]), "--out", str(out), *SETS])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert set(manifest["components"]) == {"transformer", "connectors", "vae"}
    assert set(manifest["absent"]) == {"audio_vae", "vocoder", "latent_upsampler", "text_encoder"}
    assert "without its audio parts" in manifest["absent"]["audio_vae"]
    said = " ".join(result.output.split())
    assert "audio_vae: absent from the sources" in said and "vocoder: absent from the sources" in said
    assert not (out / "tokenizer").exists()  # no text encoder: nothing would use one


@pytest.mark.parametrize("family", ["ltx2-dit", "ltx2-video-vae", "ltx2-audio-vae", "ltx2-vocoder", "ltx2-connectors"])
def test_each_family_converts_alone_from_the_single_file(release, family, tmp_path):
    component = {"ltx2-dit": "transformer.", "ltx2-connectors": "connectors."}.get(family, "-")
    sets = [o for key, value in SMALL_SETTINGS["2.0"].items() if key.startswith(component)
            for o in ("--set", f"{key.removeprefix(component)}={value}")]
    result = CliRunner().invoke(app, ["convert", family, str(release["original"]), "--out", str(tmp_path / family), *sets])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / family)["family"] == family


def test_an_ltx_video_file_is_refused_by_name(tmp_path):
    """LTX-Video 0.9.x (diffusers' own loader recognises and reads this fixture as such) given to
    ltx2: one line naming it, nothing written."""
    from safetensors.torch import load_file
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    path = tmp_path / "ltx-video-2b-v0.9.safetensors"
    write_ltx_video_file(path)
    assert infer_diffusers_model_type(load_file(str(path))) == "ltx-video"
    for family in ("ltx2", "ltx2-dit"):
        result = CliRunner().invoke(app, ["convert", family, str(path), "--out", str(tmp_path / "out")])
        assert result.exit_code == 1, result.output
        said = " ".join(result.output.split())
        assert "this is LTX-Video 0.9.x" in said and "not LTX-2" in said
        assert not (tmp_path / "out").exists()


def test_a_wan_file_is_refused_by_name(tmp_path):
    from fixtures.wan_dit import write_native

    config = write_native(tmp_path / "wan.safetensors", "t2v", 0)
    result = CliRunner().invoke(app, ["convert", "ltx2", str(config["_path"]), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert "this is a wan-dit checkpoint" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_damaged_release_writes_nothing(release, tmp_path):
    damaged = tmp_path / "ltx-2-19b-dev.safetensors"
    data = release["original"].read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(app, ["convert", "ltx2", str(damaged), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert str(damaged) in " ".join(result.output.split()) and not (tmp_path / "out").exists()
