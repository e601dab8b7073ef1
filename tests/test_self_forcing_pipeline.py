"""`vidport convert self-forcing SRC --base WAN --out DIR`: the Self-Forcing checkpoint's causal DiT
and a Wan 2.1 base's VAE, UMT5 and tokenizer (a Diffusers folder or the release folder) in one
pipeline folder, each component verifying layer by layer against diffusers / transformers; without
--base the family converts the DiT alone, as before. Sources that do not fit are refused in one
line before anything is written."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import vidport.runtime  # noqa: F401  (before mlx: the runtime gives MLX its fast BLAS)
from vidport.cli import app
from vidport.converter.pipeline import convert_pipeline, plan_pipeline
from vidport.converter.safetensors_io import read_safetensors
from fixtures.self_forcing_pipeline import OVERRIDES, SETTINGS, write_self_forcing_release

runner = CliRunner()
BASES = ("diffusers", "native")


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, dict]:
    """A checkpoint and its base, per base layout."""
    root = tmp_path_factory.mktemp("self-forcing-pipeline")
    return {base: write_self_forcing_release(root / base, base, seed=10 * i) for i, base in enumerate(BASES)}


def _weights(folder) -> dict[str, np.ndarray]:
    refs, _ = read_safetensors(folder / "model.safetensors")
    return {k: np.array(r.load()) for k, r in refs.items()}


def _manifest(folder) -> dict:
    return json.loads((folder / "vidport_manifest.json").read_text())


@pytest.mark.parametrize("base", BASES)
def test_converts_with_each_base(releases, base, tmp_path):
    """One folder: the causal DiT (EMA weights, its settings), the base's VAE, UMT5 and tokenizer,
    Self-Forcing's flow schedule (not the base's UniPC); every component verifies."""
    release, out = releases[base], tmp_path / "sf-mlx"
    result = runner.invoke(app, ["convert", "self-forcing", str(release["checkpoint"]), "--base", str(release["base"]),
                                 "--out", str(out), *release["args"]])
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    assert manifest["kind"] == "pipeline" and manifest["pipeline"] == "self-forcing"
    assert set(manifest["components"]) == {"transformer", "vae", "text_encoder"}
    assert "image_encoder" in manifest["absent"]
    assert {k: v["layout"] for k, v in manifest["inputs"].items()} == {"checkpoint": "trainer", "base": base}
    assert {k: v["family"] for k, v in manifest["components"].items()} == {
        "transformer": "self-forcing", "vae": "wan-vae", "text_encoder": "umt5"}
    dit = _manifest(out / "transformer")
    assert dit["settings"] == SETTINGS and dit["ema"] is True
    assert dit["source_wrappers"][0] == "nested under 'generator_ema'"
    assert {d["key"] for d in dit["dropped"]} == {"critic", "generator"}
    tokenizer = release["base"] / ("tokenizer" if base == "diffusers" else "google/umt5-xxl")
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (tokenizer / "tokenizer.json").read_bytes()
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 5.0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "SelfForcingPipeline" and index["transformer"] == ["diffusers", "WanTransformer3DModel"]

    result = runner.invoke(app, ["verify", str(out), "--components"])
    assert result.exit_code == 0, result.output
    assert "components: 3 passed" in result.output


def test_ema_choice_and_the_dit_alone(releases, tmp_path):
    """--no-ema takes the generator, the default its EMA weights; without --base the family still
    converts the DiT alone, to exactly the pipeline's default transformer."""
    release = releases["native"]
    sources = {"checkpoint": release["checkpoint"], "base": release["base"]}
    for name, ema in (("ema", None), ("no-ema", False)):
        convert_pipeline(plan_pipeline("self-forcing", sources, overrides=OVERRIDES, ema=ema), tmp_path / name)
    default, plain = _weights(tmp_path / "ema" / "transformer"), _weights(tmp_path / "no-ema" / "transformer")
    assert _manifest(tmp_path / "no-ema" / "transformer")["ema"] is False
    assert set(default) == set(plain) and not np.array_equal(default["proj_out.weight"], plain["proj_out.weight"])
    for part in ("vae", "text_encoder"):  # --ema / --no-ema concern the DiT only
        ours, theirs = _weights(tmp_path / "ema" / part), _weights(tmp_path / "no-ema" / part)
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours), part

    alone = tmp_path / "alone"
    result = runner.invoke(app, ["convert", "self-forcing", str(release["checkpoint"]), "--out", str(alone),
                                 "--set", "num_attention_heads=4"])
    assert result.exit_code == 0, result.output
    assert _manifest(alone).get("kind") != "pipeline" and _manifest(alone)["family"] == "self-forcing"
    assert all(np.array_equal(v, default[k]) for k, v in _weights(alone).items())


def test_diffusers_transformer_as_the_checkpoint(releases, tmp_path):
    """The generator_ema weights re-saved as a Diffusers transformer/ folder: naming the pipeline
    asserts they are causal (recorded as asserted), and the folder's DiT is exactly the one converted
    from the trainer's checkpoint; the pipeline runs on it."""
    from fixtures.self_forcing_pipeline import write_diffusers_transformer
    from vidport.runtime.pipelines.self_forcing import SelfForcingPipeline

    release = releases["diffusers"]
    folder = write_diffusers_transformer(tmp_path / "transformer", release["parts"]["generator_ema"], release["config"])
    out = tmp_path / "from-diffusers"
    result = runner.invoke(app, ["convert", "self-forcing", str(folder), "--base", str(release["base"]),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    assert manifest["inputs"]["checkpoint"]["layout"] == "diffusers-transformer"
    dit = _manifest(out / "transformer")
    assert dit["spec"]["name"] == "self-forcing/diffusers" and dit["settings"] == SETTINGS
    assert dit["settings_source"] == "asserted by naming the family"
    convert_pipeline(plan_pipeline("self-forcing", {"checkpoint": release["checkpoint"], "base": release["base"]},
                                   overrides=OVERRIDES), tmp_path / "from-trainer")
    ours, theirs = _weights(out / "transformer"), _weights(tmp_path / "from-trainer" / "transformer")
    assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    for part in ("vae", "text_encoder"):
        assert _weights(out / part).keys() == _weights(tmp_path / "from-trainer" / part).keys()
    pipeline = SelfForcingPipeline.from_folder(out)  # the runtime reads the asserted settings as causal
    assert pipeline.causal == SETTINGS and pipeline.block_frames == 3 and pipeline.tasks == ("t2v", "i2v")


def test_i2v_base_gives_the_image_encoder(tmp_path):
    """An I2V DiT with image cross-attention and a Wan 2.1 I2V release folder: the CLIP file's
    vision tower is converted beside the rest, its width the DiT's image_dim."""
    release = write_self_forcing_release(tmp_path / "i2v", "native", image_encoder=True)
    plan = plan_pipeline("causvid", {"checkpoint": release["checkpoint"], "base": release["base"]},
                         overrides=OVERRIDES)
    assert set(plan.components) == {"transformer", "vae", "text_encoder", "image_encoder"} and not plan.absent
    assert plan.components["image_encoder"].config["hidden_size"] == release["config"]["image_dim"]


REFUSED = {
    # (how the release is made, the command past `vidport convert`, what the one error line says)
    "plain-wan-dit": ({}, ["self-forcing", "{base_dit}", "--base", "{base}"],
                      r"transformer \(self-forcing\): .*this is a wan-dit checkpoint \(wan-dit/native\), not self-forcing"),
    "pipeline-as-checkpoint": ({"base": "diffusers"}, ["self-forcing", "{base}", "--base", "{base}"],
                               r"not a source the self-forcing pipeline reads as checkpoint"),
    "vae-2.2": ({"vae": "2.2"}, ["self-forcing", "{checkpoint}", "--base", "{base}"],
                r"a Wan 2.2 VAE \(48 latent channels\) cannot pair with a Wan 2.1 / 2.2 A14B DiT \(16 latent channels\)"),
    "text-width": ({"text_dim": 32}, ["self-forcing", "{checkpoint}", "--base", "{base}"],
                   r"the text encoder's width 64 does not fit the DiT's text_dim 32"),
    "no-base": ({}, ["self-forcing", "{checkpoint}", "--tokenizer", "{base}/google/umt5-xxl"],
                r"the self-forcing pipeline needs the Wan 2.1 base"),
    "base-is-a-file": ({}, ["self-forcing", "{checkpoint}", "--base", "{checkpoint}"],
                       r"not a source the self-forcing pipeline reads as base"),
    "as-wan-pipeline": ({}, ["wan", "{checkpoint}"], r"not a source the wan pipeline reads as wan"),
    "as-wan-dit": ({}, ["wan-dit", "{checkpoint}"], r"this is a self-forcing checkpoint \(self-forcing/native\), not wan-dit"),
    "base-for-a-family": ({}, ["wan-dit", "{base_dit}", "--base", "{base}"], r"belong to pipeline conversions"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_in_one_line(case, tmp_path):
    """Each in one error line (and a hint), exit 1, before any tensor is written: nothing at --out."""
    made, command, match = REFUSED[case]
    release = write_self_forcing_release(tmp_path / "src", **{"base": "native", **made})
    paths = {"checkpoint": release["checkpoint"], "base": release["base"],
             "base_dit": release["base"] / "diffusion_pytorch_model.safetensors"}
    out = tmp_path / "out"
    args = [part.format(**paths) for part in command]
    result = runner.invoke(app, ["convert", *args, "--out", str(out), *release["args"]])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("  hint: "), result.output
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists() and not list(tmp_path.glob(".out*"))
