"""AnimateDiff pipelines end to end, on small random-weight models: an LDM single file or a
Diffusers SD folder plus a motion module converted into one MLX pipeline folder; text-to-video and
image-to-video step-for-step against diffusers' AnimateDiffPipeline / AnimateDiffVideoToVideoPipeline
(same embeddings, same noise); `vidport generate` writing videos that decode back; bad requests
refused before any model runs."""
from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from typer.testing import CliRunner

import vidport.runtime  # noqa: F401  (before mlx: the runtime gives MLX its fast BLAS)
from vidport.cli import app
from vidport.converter.core.errors import VidportError
from vidport.converter.pipeline import convert_pipeline, plan_pipeline

runner = CliRunner()
CLIP_HEADS = {"text_encoder.num_attention_heads": 4}  # an LDM file does not say; the small model has 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    from fixtures.motion import write_original_motion_module
    from fixtures.pipelines import write_sd_pipeline_folder, write_tokenizer
    from fixtures.sd import write_sd_single_file

    root = tmp_path_factory.mktemp("animatediff")
    found = {"ldm": write_sd_single_file(root / "v1-5-small.safetensors"),
             "diffusers": write_sd_pipeline_folder(root / "sd15-small"),
             "tokenizer": write_tokenizer(root / "tokenizer"),
             "motion": root / "mm_sd_v15_v2-small.ckpt", "motion-sdxl": root / "mm_sdxl_v10_beta-small.ckpt"}
    write_original_motion_module(found["motion"], "v2", seed=3)
    write_original_motion_module(found["motion-sdxl"], "sdxl-beta", seed=4)
    return found


@pytest.fixture(scope="module")
def ldm_pipeline(sources, tmp_path_factory):
    """LDM single file + original motion module, through the CLI."""
    out = tmp_path_factory.mktemp("ldm-pipeline") / "animatediff-mlx"
    result = runner.invoke(app, ["convert", "animatediff", str(sources["ldm"]), "--motion", str(sources["motion"]),
                                 "--tokenizer", str(sources["tokenizer"]), "--set", "text_encoder.num_attention_heads=4",
                                 "--target", "mlx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def diffusers_pipeline(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusers-pipeline") / "animatediff-mlx"
    convert_pipeline(plan_pipeline("animatediff", {"sd": sources["diffusers"], "motion": sources["motion"]}), out)
    return out


def test_ldm_and_diffusers_sources_make_the_same_pipeline(ldm_pipeline, diffusers_pipeline):
    import mlx.core as mx

    ldm = json.loads((ldm_pipeline / "vidport_manifest.json").read_text())
    assert ldm["kind"] == "pipeline" and ldm["pipeline"] == "animatediff"
    assert set(ldm["components"]) == {"unet", "motion_adapter", "vae", "text_encoder"}
    assert ldm["inputs"]["sd"]["layout"] == "ldm" and ldm["components"]["unet"]["spec"] == "sd15-unet/ldm"
    for name, entry in ldm["components"].items():
        assert json.loads((ldm_pipeline / entry["manifest"]).read_text())["family"] == entry["family"]
    index = json.loads((ldm_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == "AnimateDiffPipeline" and index["motion_adapter"] == ["diffusers", "MotionAdapter"]
    assert (ldm_pipeline / "tokenizer" / "tokenizer.json").exists()

    # an LDM file carries no scheduler: AnimateDiff's; a Diffusers folder's (SD 1.5's PNDM) gets AnimateDiff's settings
    default = json.loads((ldm_pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert default == {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                       "beta_end": 0.012, "beta_schedule": "linear", "clip_sample": False, "steps_offset": 1,
                       "timestep_spacing": "linspace", "prediction_type": "epsilon"}
    copied = json.loads((diffusers_pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert copied["_class_name"] == "DDIMScheduler" and copied["beta_schedule"] == "linear"
    assert copied["set_alpha_to_one"] is False  # kept from the folder's own config
    diffusers = json.loads((diffusers_pipeline / "vidport_manifest.json").read_text())
    assert diffusers["inputs"]["sd"]["layout"] == "diffusers" and diffusers["scheduler"]["from"].endswith("scheduler_config.json")

    for component in ("unet", "vae", "text_encoder", "motion_adapter"):  # the same models, either layout
        a = mx.load(str(ldm_pipeline / component / "model.safetensors"))
        b = mx.load(str(diffusers_pipeline / component / "model.safetensors"))
        assert set(a) == set(b) and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a), component


def test_an_ldm_file_needs_a_tokenizer_and_overrides_name_their_component(sources, tmp_path):
    with pytest.raises(VidportError, match="carries no tokenizer") as err:
        plan_pipeline("animatediff", {"sd": sources["ldm"], "motion": sources["motion"]}, overrides=CLIP_HEADS)
    assert "--tokenizer" in err.value.hint
    with pytest.raises(VidportError, match="name their component"):
        plan_pipeline("animatediff", {"sd": sources["diffusers"], "motion": sources["motion"]},
                      overrides={"num_attention_heads": 4})
    with pytest.raises(VidportError, match="--motion"):
        plan_pipeline("animatediff", {"sd": sources["diffusers"]})
    # sd15 alone: no motion module, SD 1.5's own scheduler
    manifest = convert_pipeline(plan_pipeline("sd15", {"sd": sources["diffusers"]}), tmp_path / "sd15")
    assert set(manifest["components"]) == {"unet", "vae", "text_encoder"} and manifest["scheduler"]["class"] == "PNDMScheduler"


def test_diffusers_target_is_a_folder_diffusers_loads(sources, tmp_path):
    """LDM + original motion module -> a Diffusers AnimateDiff folder: from_pretrained reads it."""
    import torch
    from diffusers import AnimateDiffPipeline

    plan = plan_pipeline("animatediff", {"sd": sources["ldm"], "motion": sources["motion"]}, "diffusers",
                         overrides=CLIP_HEADS, tokenizer=sources["tokenizer"])
    convert_pipeline(plan, tmp_path / "animatediff")
    pipe = AnimateDiffPipeline.from_pretrained(tmp_path / "animatediff", local_files_only=True)
    assert type(pipe.unet).__name__ == "UNetMotionModel" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    original = pipe.unet.state_dict()["conv_in.weight"]
    from fixtures.sd import sd_components

    assert torch.equal(original, sd_components(0)[2].state_dict()["conv_in.weight"])


@pytest.mark.parametrize("scheduler", [None, "EulerDiscreteScheduler"])
def test_text_to_video_parity(ldm_pipeline, scheduler):
    """Per-step latents PCC >= 0.9999 and final frames >= 40 dB against diffusers' AnimateDiffPipeline,
    with the folder's scheduler (DDIM) and with another class on the same schedule."""
    from vidport.golden.pipeline_parity import pipeline_parity

    report = pipeline_parity(ldm_pipeline, "t2v", prompt="a cat", negative_prompt="a dog", frames=4, steps=4,
                             guidance=7.5, seed=1, scheduler=scheduler)
    assert report.settings["scheduler"] == (scheduler or "DDIMScheduler")
    assert len(report.steps) == 4 and report.passed, report.as_json()
    assert report.worst_step.metrics["pcc"] >= 0.9999 and report.psnr >= 40.0
    assert report.text["pcc"] >= 0.99999  # our CLIP on the folder's tokenizer agrees with diffusers' encode_prompt


def test_image_to_video_parity_through_the_cli(diffusers_pipeline, tmp_path):
    """`vidport verify --pipeline --task i2v`: AnimateDiffVideoToVideoPipeline on the image repeated."""
    from fixtures.pipelines import write_sample_image

    image = write_sample_image(tmp_path / "image.png", 48, 64, seed=2)
    result = runner.invoke(app, ["verify", str(diffusers_pipeline), "--pipeline", "--task", "i2v", "--image", str(image),
                                 "--frames", "4", "--steps", "4", "--strength", "0.75", "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())["tasks"][0]
    assert report["passed"] and len(report["steps"]) == 3  # int(4 * 0.75) steps, from t=666
    assert report["steps"][0]["timestep"] == 666 and report["settings"]["width"] == 64
    assert report["worst_step_pcc"] >= 0.9999 and (report["psnr"] is None or report["psnr"] >= 40.0)


def test_generate_writes_videos_that_decode_back(ldm_pipeline, tmp_path):
    from vidport.runtime.video import read_video

    noise = np.random.default_rng(0).standard_normal((1, 4, 6, 6, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    for name, extra in (("video.mp4", ["--seed", "5"]), ("video.gif", ["--noise", str(tmp_path / "noise.npy")])):
        result = runner.invoke(app, ["generate", "t2v", "--model", str(ldm_pipeline), "--prompt", "a cat",
                                     "--frames", "6", "--steps", "2", "--height", "48", "--width", "64",
                                     "--fps", "8", "--out", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        assert "time per step" in result.output and "peak memory" in result.output
        frames = read_video(tmp_path / name)
        assert frames.shape == (6, 48, 64, 3), (name, frames.shape)


def test_seeds_are_reproducible(ldm_pipeline):
    from vidport.runtime.pipelines.animatediff import AnimateDiffPipeline

    pipe = AnimateDiffPipeline.from_folder(ldm_pipeline)
    runs = [np.array(pipe.text_to_video("a cat", frames=2, steps=1, height=32, width=32, seed=seed, decode=False).latents)
            for seed in (7, 7, 8)]
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


def test_bad_input_is_refused_before_any_heavy_work(sources, ldm_pipeline, tmp_path):
    """Each bad request fails fast, with one line, and before a weight is loaded or the UNet runs."""
    from fixtures.pipelines import sample_image
    from vidport.runtime.pipelines.animatediff import AnimateDiffPipeline
    from vidport.runtime.pipelines.protocol import Request

    # a motion module made for SDXL with an SD 1.5 UNet: refused when planning, no tensor read
    start = time.perf_counter()
    with pytest.raises(VidportError, match="SDXL motion module on an SD 1.5 UNet"):
        plan_pipeline("animatediff", {"sd": sources["ldm"], "motion": sources["motion-sdxl"]},
                      overrides=CLIP_HEADS, tokenizer=sources["tokenizer"])
    assert time.perf_counter() - start < 30

    pipe = AnimateDiffPipeline.from_folder(ldm_pipeline)  # configs only; weights load on first use
    with pytest.raises(VidportError, match="the image is 64x64, the video 96x64"):
        pipe.image_to_video(sample_image(64, 64), "a cat", frames=4, steps=2, height=64, width=96)
    with pytest.raises(VidportError, match="33 frames: the motion module has 32 positions"):
        pipe.text_to_video("a cat", frames=33, steps=2, height=64, width=64)
    with pytest.raises(VidportError, match="t2v on this animatediff pipeline takes no strength"):
        pipe.text_to_video("a cat", strength=0.5)
    assert pipe.models == {}  # nothing was loaded, so nothing ran

    broken = tmp_path / "broken"
    shutil.copytree(ldm_pipeline, broken)
    config = json.loads((broken / "scheduler" / "scheduler_config.json").read_text())
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "_class_name": "LMSDiscreteScheduler"}))
    with pytest.raises(VidportError, match="LMSDiscreteScheduler") as err:
        AnimateDiffPipeline.from_folder(broken).check(Request(prompt="a cat"))
    assert "--scheduler" in err.value.hint
    assert AnimateDiffPipeline.from_folder(broken).check(Request(prompt="a cat", scheduler="DDIMScheduler"))

    # and through the CLI: one line plus a hint, exit 1, no video written
    for args, message in ((["--frames", "40"], "40 frames"), (["--model", str(broken)], "LMSDiscreteScheduler")):
        result = runner.invoke(app, ["generate", "t2v", "--model", str(ldm_pipeline), "--prompt", "a cat",
                                     "--out", str(tmp_path / "never.mp4"), *args])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "never.mp4").exists()


@pytest.mark.parametrize("args,message", [
    (["t2v", "--frames", "40"], "40 frames: the motion module has 32 positions"),
    (["t2v", "--height", "60", "--width", "64"], "multiples of 8"),
    (["t2v", "--steps", "0"], "0 steps"),
    (["t2v", "--image", "IMAGE"], "t2v on this animatediff pipeline takes no image"),
    (["t2v", "--flow-shift", "3"], "takes no flow_shift (--flow-shift)"),
    (["t2v", "--set", "max_sequence_length=8"], "takes no max_sequence_length"),
    (["i2v"], "i2v needs an image"),
    (["i2v", "--image", "IMAGE", "--width", "96"], "the image is 64x48, the video 96x48"),
    (["i2v", "--image", "IMAGE", "--strength", "0.1", "--steps", "4"], "leaves no step to denoise"),
    (["t2v", "--noise", "NOISE"], "noise has shape"),
    (["ti2v"], "runs t2v or i2v, not ti2v"),
    (["t2v", "--scheduler", "LMSDiscreteScheduler"], "LMSDiscreteScheduler"),
])
def test_requests_are_refused_without_reading_a_weight(ldm_pipeline, tmp_path, args, message):
    """Every request check runs before a weight is read: with the weights deleted, a bad request
    still gets its own one-line error (and a good one fails reading the weights)."""
    from fixtures.pipelines import write_sample_image

    folder = tmp_path / "no-weights"
    shutil.copytree(ldm_pipeline, folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    image = write_sample_image(tmp_path / "image.png", 48, 64)
    np.save(tmp_path / "noise.npy", np.zeros((1, 4, 2, 6, 8), np.float32))
    args = [{"IMAGE": str(image), "NOISE": str(tmp_path / "noise.npy")}.get(a, a) for a in args]
    result = runner.invoke(app, ["generate", *args, "--model", str(folder), "--prompt", "a cat",
                                 "--out", str(tmp_path / "never.gif")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert "hint:" in result.output
    result = runner.invoke(app, ["generate", "t2v", "--model", str(folder), "--prompt", "a cat", "--frames", "2",
                                 "--steps", "1", "--height", "32", "--width", "32", "--out", str(tmp_path / "never.gif")])
    assert result.exit_code == 1 and "model.safetensors" in result.output, result.output
    assert not (tmp_path / "never.gif").exists()
