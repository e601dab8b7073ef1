"""Wan pipelines on MLX against diffusers' WanPipeline / WanImageToVideoPipeline, built with
`from_pretrained` from the same small Diffusers folders: T2V (2.1), I2V (2.1: CLIP tokens + mask +
first-frame latent), TI2V (2.2 5B: expand_timesteps, with and without the image) and the A14B
two-expert switch (T2V and I2V), per step (latents PCC) and on the decoded frames (PSNR); bad requests are
refused before any model loads."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from vidport.converter.core.errors import VidportError
from vidport.converter.pipeline import convert_pipeline, plan_pipeline
from vidport.golden.pipeline_parity import pipeline_parity
from fixtures.wan_pipelines import write_wan_pipeline
from vidport.runtime.pipelines import wan as wan_module
from vidport.runtime.pipelines.wan import WanPipeline

# 0.9 is Wan 2.2 I2V A14B's ratio: with 4 UniPC steps t=900 is a step, right at the boundary
KINDS = {"t2v": {}, "i2v": {}, "ti2v": {}, "a14b": {"boundary_ratio": 0.9}, "i2v-a14b": {"boundary_ratio": 0.9}}


@pytest.fixture(scope="module")
def wan_folders(tmp_path_factory) -> dict[str, dict]:
    """kind -> {"source": Diffusers folder, "mlx": converted pipeline folder, "manifest": ...}."""
    root = tmp_path_factory.mktemp("wan-pipelines")
    found = {}
    for seed, (kind, options) in enumerate(KINDS.items()):
        source = write_wan_pipeline(root / kind, kind, seed=10 * seed, **options)
        manifest = convert_pipeline(plan_pipeline("wan", {"wan": source}, "mlx"), root / f"{kind}-mlx")
        found[kind] = {"source": source, "mlx": root / f"{kind}-mlx", "manifest": manifest}
    return found


def test_converted_folder(wan_folders):
    """One folder, one manifest; optional parts only where the source has them; the source's
    model_index entries (class, boundary_ratio, expand_timesteps) carried over."""
    expected = {"t2v": {"transformer", "vae", "text_encoder"},
                "i2v": {"transformer", "vae", "text_encoder", "image_encoder"},
                "ti2v": {"transformer", "vae", "text_encoder"},
                "a14b": {"transformer", "transformer_2", "vae", "text_encoder"},
                "i2v-a14b": {"transformer", "transformer_2", "vae", "text_encoder"}}
    for kind, folder in wan_folders.items():
        assert set(folder["manifest"]["components"]) == expected[kind], kind
        assert (folder["mlx"] / "tokenizer" / "tokenizer.json").exists()
        assert (folder["mlx"] / "scheduler" / "scheduler_config.json").exists()
        index = json.loads((folder["mlx"] / "model_index.json").read_text())
        source = json.loads((folder["source"] / "model_index.json").read_text())
        for key in ("_class_name", "boundary_ratio", "expand_timesteps"):
            assert index[key] == source[key], (kind, key)
        assert (index["transformer_2"] == [None, None]) == ("a14b" not in kind)
        assert (folder["mlx"] / "image_processor").exists() == (kind == "i2v")
        assert WanPipeline.from_folder(folder["mlx"]).task == {"a14b": "t2v", "i2v-a14b": "i2v"}.get(kind, kind)


@pytest.mark.parametrize("kind,task", [("t2v", "t2v"), ("i2v", "i2v"), ("ti2v", "ti2v"), ("ti2v", "t2v"),
                                       ("a14b", "t2v"), ("i2v-a14b", "i2v")])
def test_parity(wan_folders, kind, task):
    """Same text states, noise and image: every step's latents and the frames match diffusers."""
    report = pipeline_parity(wan_folders[kind]["mlx"], task)
    assert report.passed, report.as_json()
    assert report.worst_step.metrics["pcc"] >= 0.9999
    assert report.psnr >= 40.0
    assert report.text["pcc"] >= 0.99999  # our tokenizer + UMT5 against diffusers' encode
    assert report.settings["reference"] == ("WanPipeline" if task == "t2v" else "WanImageToVideoPipeline")


@pytest.mark.slow  # heavy; CI runs it (make test under CI=true)
def test_a14b_switches_experts_where_diffusers_does(wan_folders, monkeypatch):
    """The low-noise expert takes over below boundary_ratio x 1000 (t=900 at ratio 0.9 is still
    the high-noise expert's, compared in float32 as torch does). Ignoring the switch, or moving it
    by one step, breaks parity exactly from the step that changed experts."""
    folder = wan_folders["a14b"]["mlx"]
    report = pipeline_parity(folder, "t2v")
    assert report.passed
    assert [round(s.timestep) for s in report.steps] == [999, 900, 750, 500]
    assert report.settings["experts"] == ["transformer", "transformer", "transformer_2", "transformer_2"]

    runs = []
    for release in (False, True):  # releasing the high-noise expert at the switch changes nothing
        pipe = WanPipeline.from_folder(folder)
        runs.append(pipe.text_to_video("a cat", frames=5, steps=4, height=32, width=48, seed=1, decode=False,
                                       release_weights=release))
        assert ("transformer" in pipe._models) != release and "transformer_2" in pipe._models
    np.testing.assert_array_equal(np.array(runs[0].latents), np.array(runs[1].latents))

    real = wan_module.layout_of
    for ratio, first_bad in [(None, 2), (0.9000001, 1)]:  # no switch; a switch one step early
        def moved(configs, index=None, r=ratio):
            return dataclasses.replace(real(configs, index), boundary_ratio=r)

        monkeypatch.setattr(wan_module, "layout_of", moved)
        broken = pipeline_parity(folder, "t2v", source=wan_folders["a14b"]["source"])
        assert not broken.passed
        assert [s.passed for s in broken.steps].index(False) == first_bad, ratio


def test_clip_preprocessing_matches_transformers(wan_folders):
    """Our CLIP pixels are transformers' CLIPImageProcessor's, on an odd-sized image."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from vidport.runtime.pipelines.wan_image import clip_pixels, read_clip_config

    folder = wan_folders["i2v"]["mlx"] / "image_processor"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    want = CLIPImageProcessor.from_pretrained(str(folder))(images=image, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(clip_pixels(image, read_clip_config(folder)), want, atol=1e-6)


def test_tokenizer_matches_transformers(wan_folders):
    """Our tokenizer.json reading gives the ids and mask transformers gives (padding to the
    length, truncation keeping </s>), on the prompt diffusers' WanPipeline would tokenize."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from transformers import AutoTokenizer

    from vidport.runtime.pipelines.wan_text import UMT5Tokenizer, clean_prompt

    folder = wan_folders["t2v"]["source"] / "tokenizer"
    theirs = AutoTokenizer.from_pretrained(str(folder))
    prompts = ["a cat  sits on the\n red mat &amp; sun", "dog " * 40, "", "zebra!? 42"]
    assert [clean_prompt(p) for p in prompts] == [prompt_clean(p) for p in prompts]
    cleaned = [clean_prompt(p) for p in prompts]
    want = theirs(cleaned, padding="max_length", max_length=24, truncation=True, add_special_tokens=True,
                  return_attention_mask=True, return_tensors="np")
    ids, mask = UMT5Tokenizer(folder)(cleaned, 24)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])


# ---------------------------------------------------------------- refused before heavy work


def _refused(pipe: WanPipeline, call, match: str) -> VidportError:
    with pytest.raises(VidportError, match=match) as caught:
        call()
    assert caught.value.hint, "every refusal carries a hint"
    assert pipe._models == {}, "nothing was loaded before the refusal"
    return caught.value


def test_i2v_without_image(wan_folders):
    pipe = WanPipeline.from_folder(wan_folders["i2v"]["mlx"])
    err = _refused(pipe, lambda: pipe.text_to_video("a cat", frames=5, height=32, width=48), "runs i2v, not t2v")
    assert "--image" in err.hint
    err = _refused(pipe, lambda: pipe.image_to_video(None, "a cat", frames=5, height=32, width=48),
                   "i2v needs the first frame")
    assert "--image" in err.hint
    t2v = WanPipeline.from_folder(wan_folders["t2v"]["mlx"])
    _refused(t2v, lambda: t2v.image_to_video(np.zeros((32, 48, 3), np.uint8), "a cat", frames=5, height=32, width=48),
             "takes no image")


def test_wan21_vae_with_wan22_dit(wan_folders, tmp_path):
    """A Wan 2.1 VAE (z 16) under a Wan 2.2 TI2V DiT (48 channels): refused when converting
    (before any tensor is read) and when opening a folder so assembled (before any weight loads)."""
    source = tmp_path / "mixed"
    shutil.copytree(wan_folders["ti2v"]["source"], source)
    shutil.rmtree(source / "vae")
    shutil.copytree(wan_folders["t2v"]["source"] / "vae", source / "vae")
    with pytest.raises(VidportError, match="Wan 2.1 VAE.*Wan 2.2 TI2V DiT") as caught:
        plan_pipeline("wan", {"wan": source}, "mlx")
    assert "z 48" in caught.value.hint
    from typer.testing import CliRunner

    from vidport.cli import app

    result = CliRunner().invoke(app, ["convert", "wan", str(source), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Wan 2.2 TI2V DiT" in result.output and not (tmp_path / "out").exists()

    mixed = tmp_path / "mixed-mlx"
    shutil.copytree(wan_folders["ti2v"]["mlx"], mixed)
    shutil.rmtree(mixed / "vae")
    shutil.copytree(wan_folders["t2v"]["mlx"] / "vae", mixed / "vae")
    with pytest.raises(VidportError, match="16 latent channels"):
        WanPipeline.from_folder(mixed)


def test_frames_not_4k_plus_1(wan_folders):
    pipe = WanPipeline.from_folder(wan_folders["t2v"]["mlx"])
    err = _refused(pipe, lambda: pipe.text_to_video("a cat", frames=6, height=32, width=48), "1 \\+ 4k frames")
    assert "--frames 5 or 9" in err.hint


def test_size_not_a_multiple(wan_folders):
    """Wan 2.1: VAE factor 8 x patch 2 = 16; Wan 2.2 TI2V: 16 x 2 = 32."""
    pipe = WanPipeline.from_folder(wan_folders["t2v"]["mlx"])
    err = _refused(pipe, lambda: pipe.text_to_video("a cat", frames=5, height=40, width=48), "multiples of 16")
    assert "--height 32" in err.hint
    ti2v = WanPipeline.from_folder(wan_folders["ti2v"]["mlx"])
    _refused(ti2v, lambda: ti2v.text_to_video("a cat", frames=5, height=48, width=64), "multiples of 32")


# ---------------------------------------------------------------- the command line


def test_cli_convert_generate_verify(wan_folders, tmp_path):
    """`vidport convert wan`, `generate t2v|i2v|ti2v` to MP4 / GIF / WebM (frames decode back at
    the asked size), `verify --pipeline` per step; seeds reproduce."""
    from typer.testing import CliRunner

    from vidport.cli import app
    from PIL import Image

    from vidport.golden.pipeline_parity import synthetic_image
    from vidport.runtime.video import read_video

    runner = CliRunner()
    out = tmp_path / "t2v-cli"
    result = runner.invoke(app, ["convert", "wan", str(wan_folders["t2v"]["source"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote the wan pipeline (transformer, vae, text_encoder" in result.output

    Image.fromarray(synthetic_image(40, 56)).save(tmp_path / "first.png")
    runs = [("t2v", out, [], "a.mp4"), ("t2v", out, [], "b.mp4"),
            ("i2v", wan_folders["i2v"]["mlx"], ["--image", str(tmp_path / "first.png")], "c.gif"),
            ("ti2v", wan_folders["ti2v"]["mlx"], ["--image", str(tmp_path / "first.png"), "--height", "64",
                                                  "--width", "96"], "d.webm")]
    for task, model, extra, name in runs:
        args = ["generate", task, "--model", str(model), "--prompt", "a cat walks", "--frames", "5", "--steps", "2",
                "--seed", "7", "--out", str(tmp_path / name), *extra]
        if task != "ti2v":
            args += ["--height", "32", "--width", "48"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "decoding" in result.output and "latent frame 2/2" in result.output
        frames = read_video(tmp_path / name)
        assert frames.shape[0] == 5 and frames.shape[1:3] == ((64, 96) if task == "ti2v" else (32, 48)), name
    assert np.array_equal(read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4"))  # same seed, same video

    noise = np.random.default_rng(3).standard_normal((1, 16, 2, 4, 6)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    result = runner.invoke(app, ["generate", "t2v", "--model", str(out), "--prompt", "a cat walks", "--frames", "5",
                                 "--steps", "2", "--height", "32", "--width", "48", "--noise", str(tmp_path / "noise.npy"),
                                 "--out", str(tmp_path / "frames") + "/"])
    assert result.exit_code == 0, result.output
    direct = WanPipeline.from_folder(out).text_to_video("a cat walks", frames=5, steps=2, height=32, width=48, noise=noise)
    from vidport.runtime.video import to_uint8

    assert np.array_equal(read_video(tmp_path / "frames"), to_uint8(direct.frames))  # the file's noise, as given
    result = runner.invoke(app, ["generate", "t2v", "--model", str(out), "--prompt", "a cat", "--frames", "9",
                                 "--height", "32", "--width", "48", "--noise", str(tmp_path / "noise.npy"),
                                 "--out", str(tmp_path / "bad.mp4")])
    assert result.exit_code == 1 and "noise has shape" in result.output

    result = runner.invoke(app, ["generate", "t2v", "--model", str(out), "--prompt", "a cat", "--frames", "8",
                                 "--out", str(tmp_path / "bad.mp4")])
    assert result.exit_code == 1 and "1 + 4k frames" in result.output and "--frames 5 or 9" in result.output

    result = runner.invoke(app, ["verify", str(wan_folders["a14b"]["mlx"]), "--pipeline", "--steps", "3",
                                 "--json", str(tmp_path / "parity.json")])
    assert result.exit_code == 0, result.output
    assert "transformer_2" in result.output and "PASSED" in result.output
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and report["tasks"][0]["settings"]["experts"][-1] == "transformer_2"


@pytest.mark.parametrize("kind,args,message", [
    ("t2v", ["t2v", "--frames", "8"], "1 + 4k frames"),
    ("t2v", ["t2v", "--height", "40"], "multiples of 16"),
    ("ti2v", ["ti2v", "--image", "IMAGE", "--height", "48"], "multiples of 32"),
    ("t2v", ["t2v", "--image", "IMAGE"], "t2v on this wan pipeline takes no image"),
    ("t2v", ["i2v", "--image", "IMAGE"], "runs t2v, not i2v"),
    ("i2v", ["i2v"], "i2v needs the first frame"),
    ("ti2v", ["ti2v"], "ti2v needs the first frame"),
    ("t2v", ["t2v", "--guidance-2", "3"], "two-expert (A14B) model only"),
    ("t2v", ["t2v", "--strength", "0.5"], "takes no strength (--strength)"),
    ("t2v", ["t2v", "--decode-slice", "2"], "takes no decode_slice (--decode-slice)"),
    ("t2v", ["t2v", "--noise", "NOISE"], "noise has shape"),
    ("t2v", ["t2v", "--scheduler", "DPMSolverMultistepScheduler", "--flow-shift", "5"], "has no flow schedule"),
    ("t2v", ["t2v", "--scheduler", "DDIMScheduler"], "prediction_type='flow_prediction' is not supported"),
    ("i2v", ["i2v", "--image", "IMAGE", "--set", "max_sequence_length=256"], "takes exactly 512"),
])
def test_requests_are_refused_without_reading_a_weight(wan_folders, tmp_path, kind, args, message):
    """Every request check runs before a weight is read: with the weights deleted, a bad request
    still gets its own one-line error with a hint (and a good one fails reading the weights)."""
    from PIL import Image
    from typer.testing import CliRunner

    from vidport.cli import app

    folder = tmp_path / "no-weights"
    shutil.copytree(wan_folders[kind]["mlx"], folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "first.png")
    np.save(tmp_path / "noise.npy", np.zeros((1, 16, 1, 4, 6), np.float32))
    args = [{"IMAGE": str(tmp_path / "first.png"), "NOISE": str(tmp_path / "noise.npy")}.get(a, a) for a in args]
    runner = CliRunner()
    frames = [] if "--frames" in args else ["--frames", "5"]
    result = runner.invoke(app, ["generate", *args, *frames, "--model", str(folder), "--prompt", "a cat",
                                 "--out", str(tmp_path / "never.gif")])
    assert result.exit_code == 1 and message in result.output and "hint:" in result.output, result.output
    good = ["generate", kind, "--model", str(folder), "--prompt", "a cat", "--frames", "5", "--height", "32",
            "--width", "48", "--steps", "1", "--out", str(tmp_path / "never.gif")]
    if kind != "t2v":
        good[good.index("--height"):good.index("--steps")] = ["--image", str(tmp_path / "first.png")]
    result = runner.invoke(app, good)
    assert result.exit_code == 1 and "model.safetensors" in result.output, result.output
    assert not (tmp_path / "never.gif").exists()
