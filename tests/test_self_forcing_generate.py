"""Self-Forcing generation on MLX against its reference: the official inference loop
(reference/self_forcing_sampler.py) around diffusers' WanTransformer3DModel under a block-causal
mask and diffusers' AutoencoderKLWan, built by their own loaders from the checkpoint and the base.

Same text states, starting noise and re-noising draws on both sides: every denoising step's x0 of
every block (PCC >= 0.9999 in float32) and the frames (PSNR >= 40 dB), for t2v, i2v and a rolling
cache with attention sinks. The frames reach the writer block by block, before later blocks run.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import vidport.runtime  # noqa: F401  (before mlx: the runtime gives MLX its fast BLAS)
from vidport.converter.core.errors import VidportError
from vidport.converter.pipeline import convert_pipeline, plan_pipeline
from vidport.golden.pipeline_parity import pipeline_parity
from vidport.runtime.pipelines.protocol import Request
from vidport.runtime.pipelines.self_forcing import SelfForcingPipeline
from fixtures.self_forcing_pipeline import OVERRIDES, write_self_forcing_release

SIZE = {"height": 32, "width": 48}  # the smallest the fixture's VAE x patch take: 2 x 3 patches a frame


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("self-forcing-generate")
    release = write_self_forcing_release(root / "release", "diffusers")
    out = root / "sf-mlx"
    convert_pipeline(plan_pipeline("self-forcing", {"checkpoint": release["checkpoint"], "base": release["base"]},
                                   overrides=OVERRIDES), out)
    return out


def _assert_parity(report, steps: int) -> None:
    assert len(report.steps) == steps
    worst = report.worst_step
    assert report.passed, (worst.index, worst.metrics, report.psnr)
    assert worst.metrics["pcc"] >= 0.9999 and report.psnr >= 40.0


def test_official_schedule():
    """The timesteps and re-noising of the official config (denoising_step_list [1000, 750, 500, 250],
    warp_denoising_step, timestep_shift 5): entry k is the training timestep at index 1000 - k of
    FlowMatchScheduler's shifted sigmas, sigma(s) = 5 s / (1 + 4 s) with s = k / 1000."""
    from vidport.reference.self_forcing_sampler import add_noise, flow_to_x0, warped_timesteps
    from vidport.runtime.self_forcing_schedule import FewStepSchedule, denoising_list
    import torch

    official = [1000 * 5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)]
    assert denoising_list(4) == [1000, 750, 500, 250]
    ours = FewStepSchedule.official()
    np.testing.assert_allclose(ours.timesteps, official, rtol=1e-6)
    np.testing.assert_allclose(warped_timesteps([1000, 750, 500, 250], 5.0).numpy(), official, rtol=1e-6)
    rng = np.random.default_rng(0)
    x, flow, noise = (rng.standard_normal((2, 3)).astype(np.float32) for _ in range(3))
    t = torch.tensor(official[1])
    np.testing.assert_allclose(ours.x0(x, flow, 1), flow_to_x0(torch.from_numpy(flow), torch.from_numpy(x), t, 5.0),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours.renoise(x, noise, 2), add_noise(torch.from_numpy(x), torch.from_numpy(noise),
                                                                      torch.tensor(official[2]), 5.0), atol=1e-6)
    np.testing.assert_allclose(ours.renoise(x, noise, 2), (1 - 0.8333333) * x + 0.8333333 * noise, atol=1e-6)


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_matches_the_reference(folder, task):
    """Two blocks (i2v: the image's frame, then two blocks), 4 steps each, every step compared."""
    report = pipeline_parity(folder, task, **SIZE)
    _assert_parity(report, 2 * 4)
    assert report.text["pcc"] > 0.9999  # our UMT5 on the prompt against transformers'
    assert report.settings["blocks"] == 2


def test_rolling_cache_with_sinks_matches_the_reference(folder):
    """Three blocks through a 6-frame window with 3 sink frames: the third block sees the first (the
    sinks) and itself, not the second; the reference masks the same. The window changes the result."""
    window = {"local_attn_size": 6, "sink_size": 3}
    report = pipeline_parity(folder, "t2v", frames=33, extra=window, **SIZE)
    _assert_parity(report, 3 * 4)
    pipe = SelfForcingPipeline.from_folder(folder)
    runs = {name: pipe.generate(Request(task="t2v", prompt="a cat", frames=33, seed=3, decode=False, extra=extra,
                                        **SIZE)).latents
            for name, extra in (("full", {}), ("window", window))}
    full, windowed = (np.array(runs[name]) for name in ("full", "window"))
    np.testing.assert_array_equal(full[:, :, :6], windowed[:, :, :6])  # the first two blocks see all they would
    assert np.abs(full[:, :, 6:] - windowed[:, :, 6:]).max() > 1e-3


def test_a_wrong_renoise_fails_parity(folder, monkeypatch):
    """Re-noising to the current step's sigma instead of the next one's: parity must fail."""
    from vidport.runtime.self_forcing_schedule import FewStepSchedule

    original = FewStepSchedule.renoise
    monkeypatch.setattr(FewStepSchedule, "renoise", lambda self, x0, noise, step: original(self, x0, noise, step - 1))
    report = pipeline_parity(folder, "t2v", **SIZE)
    assert not report.passed
    assert all(row.passed for row in report.steps[:1]) and not all(row.passed for row in report.steps)


class RecordingWriter:
    """A writer that notes when frames arrive, in the order of everything the run reports."""

    def __init__(self, events: list):
        self.events, self.frames = events, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.events.append(("closed",))
        return False

    def append(self, frames: np.ndarray) -> None:
        self.frames.append(frames)
        self.events.append(("frames", len(frames)))


def test_frames_stream_out_block_by_block(folder):
    """The first block's frames reach the writer before the last block's first step; pieced together
    they equal the whole video decoded at once."""
    from vidport.runtime.pipelines.wan_latents import LatentStats, decode_frames
    import mlx.core as mx

    pipe = SelfForcingPipeline.from_folder(folder)
    events: list = []
    writer = RecordingWriter(events)
    request = Request(task="t2v", prompt="a cat", frames=33, seed=5, writer=lambda audio, rate: writer, **SIZE)
    result = pipe.generate(request, on_step=lambda step: events.append(("step", step.index, step.model)))
    assert result.frames is None  # all went to the writer
    first_of_last = events.index(("step", 8, "block 3/3"))
    appended = [i for i, event in enumerate(events) if event[0] == "frames"]
    assert [events[i][1] for i in appended] == [9, 12, 12]  # 1 + 4 + 4, then 12 a block
    assert appended[0] < first_of_last and appended[1] < first_of_last
    assert result.stats["first frame seconds"] > 0 and result.stats["frames per second"] > 0

    vae_config = pipe.folder.config("vae")
    stats = LatentStats(vae_config["latents_mean"], vae_config["latents_std"])
    whole = decode_frames(pipe.model("vae"), stats.denormalize(mx.array(np.array(result.latents)).transpose(0, 2, 3, 4, 1)))
    np.testing.assert_allclose(np.concatenate(writer.frames), whole[0], atol=1e-6)


def test_seed_and_noise_file_reproduce(folder):
    pipe = SelfForcingPipeline.from_folder(folder)
    run = lambda **kw: np.array(pipe.generate(Request(task="t2v", prompt="a cat", frames=9, decode=False,  # noqa: E731
                                                      **SIZE, **kw)).latents)
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2
    shape = pipe.latent_shape(9, **SIZE)
    rng = np.random.default_rng(0)
    draws = {"noise": rng.standard_normal(shape).astype(np.float32),
             "renoise": rng.standard_normal((3, *shape)).astype(np.float32)}
    np.testing.assert_array_equal(run(noise=draws), run(noise=draws))


@pytest.mark.parametrize("settings, message", [
    ({"frames": 17}, "blocks of 3 latent frames"),  # 5 latent frames
    ({"task": "i2v", "frames": 9, "image": np.zeros((32, 48, 3), np.uint8)}, "the image's frame first"),
    ({"frames": 15}, "makes 9 + 12k frames"),
    ({"extra": {"local_attn_size": 4, "sink_size": 2}}, "does not fit a window"),
    ({"extra": {"sink_size": 2}}, "sink_size needs a local_attn_size"),
    ({"steps": 0}, "at least one denoising step"),
    ({"guidance": 5.0}, "takes no guidance"),
    ({"negative_prompt": "blurry"}, "takes no negative_prompt"),
    ({"prompt_embeds": (np.zeros((1, 8, 32), np.float32), np.zeros((1, 8, 32), np.float32))}, "classifier-free"),
    ({"noise": {"noise": np.zeros((1, 16, 3, 4, 6), np.float32), "renoise": np.zeros((2, 1, 16, 3, 4, 6), np.float32)}},
     "renoise has shape (2, 1, 16, 3, 4, 6)"),
    ({"noise": {"initial": np.zeros((1, 16, 3, 4, 6), np.float32)}}, "Self-Forcing takes noise, renoise"),
])
def test_bad_requests_fail_before_weights_load(folder, tmp_path, settings, message):
    """Every refusal from configs alone: the weights are removed from a copy of the folder."""
    copy = tmp_path / "no-weights"
    shutil.copytree(folder, copy)
    for weights in copy.rglob("*.safetensors"):
        weights.unlink()
    pipe = SelfForcingPipeline.from_folder(copy)
    request = Request(**{"task": "t2v", "prompt": "a cat", "frames": 9, **SIZE, **settings})
    with pytest.raises(VidportError, match=re.escape(message)):
        pipe.check(request)


def test_causal_and_bidirectional_dits_are_not_swapped(folder, tmp_path):
    """A bidirectional Wan DiT in a Self-Forcing folder, and a causal DiT in a Wan folder, are refused
    when the folder opens, naming the component."""
    from vidport.runtime.pipelines.wan import WanPipeline

    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    manifest = plain / "transformer" / "vidport_manifest.json"
    data = json.loads(manifest.read_text())
    data.pop("settings")
    manifest.write_text(json.dumps(data))
    with pytest.raises(VidportError, match="a bidirectional Wan DiT"):
        SelfForcingPipeline.from_folder(plain)

    as_wan = tmp_path / "as-wan"
    shutil.copytree(folder, as_wan)
    manifest = as_wan / "vidport_manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "pipeline": "wan"}))
    with pytest.raises(VidportError, match="a causal .*DiT"):
        WanPipeline.from_folder(as_wan)


def test_stream_grows_a_playable_mp4(folder, tmp_path):
    """A live MP4 at the target: before the last block's first step, the blocks before it already
    play from the file (fragments flushed frame by frame); at the end it holds every frame."""
    import av

    from vidport.runtime.video import open_video

    out = tmp_path / "live.mp4"
    seen: dict[str, int] = {}

    def on_step(step) -> None:
        if step.index == 8:  # the third block's first step
            with av.open(str(out)) as video:
                seen["frames"] = sum(1 for _ in video.decode(video=0))

    pipe = SelfForcingPipeline.from_folder(folder)
    pipe.generate(Request(task="t2v", prompt="a cat", frames=33, seed=5,
                          writer=lambda audio, rate: open_video(out, 16, live=True), **SIZE), on_step=on_step)
    assert seen["frames"] >= 9 + 12 - 1  # two blocks appended; the last frame's fragment closes with the next
    with av.open(str(out)) as video:
        assert sum(1 for _ in video.decode(video=0)) == 33


def test_a_failed_live_write_leaves_nothing(tmp_path):
    from vidport.runtime.video import open_video

    out = tmp_path / "live.mp4"
    with pytest.raises(RuntimeError):
        with open_video(out, 16, live=True) as writer:
            writer.append(np.zeros((4, 32, 48, 3), np.uint8))
            assert out.exists()
            raise RuntimeError("the run failed")
    assert not out.exists()
    out.write_bytes(b"keep")
    with pytest.raises(VidportError, match="exists; a live output is written in place"):
        open_video(out, 16, live=True)
    assert out.read_bytes() == b"keep"
    with pytest.raises(VidportError, match="cannot be watched while it is written"):
        open_video(tmp_path / "live.gif", 16, live=True)


def test_generate_command_streams_and_reports(folder, tmp_path):
    """`vidport generate t2v --stream`: the MP4 of whole blocks, the time to the first frame, the
    frames per second and the cache's memory printed; a --stream output that exists is refused first."""
    import av
    from typer.testing import CliRunner

    from vidport.cli import app

    out = tmp_path / "fox.mp4"
    args = ["generate", "t2v", "--model", str(folder), "--prompt", "a fox in the snow", "--frames", "21", "--height",
            "32", "--width", "48", "--seed", "1", "--stream", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for row in ("first frame seconds", "frames per second", "cache MiB", "Self-Forcing few-step"):
        assert row in result.output
    with av.open(str(out)) as video:
        assert sum(1 for _ in video.decode(video=0)) == 21
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "exists; a live output" in again.output


@pytest.mark.slow  # heavy; CI runs it (make test under CI=true)
def test_image_cross_attention_matches_the_reference(tmp_path):
    """A causal DiT that also cross-attends to CLIP image tokens (16 input channels, image_dim set),
    with a Wan 2.1 I2V base's image encoder: i2v only, the tokens in the cross-attention cache."""
    release = write_self_forcing_release(tmp_path / "release", "diffusers", image_encoder=True, in_channels=16)
    out = tmp_path / "sf-clip"
    convert_pipeline(plan_pipeline("self-forcing", {"checkpoint": release["checkpoint"], "base": release["base"]},
                                   overrides=OVERRIDES), out)
    pipe = SelfForcingPipeline.from_folder(out)
    assert pipe.tasks == ("i2v",) and pipe.layout.image_tokens
    report = pipeline_parity(out, "i2v", **SIZE)
    _assert_parity(report, 2 * 4)


def test_verify_pipeline_command(folder, tmp_path):
    """`vidport verify DIR --pipeline`: each task against the reference, per block and step, and a
    report that names the reference sampler and the blocks."""
    from typer.testing import CliRunner

    from vidport.cli import app

    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["verify", str(folder), "--pipeline", "--json", str(report)])
    assert result.exit_code == 0, result.output
    reports = json.loads(report.read_text())
    reports = reports if isinstance(reports, list) else reports.get("tasks", [reports])
    assert {r["task"] for r in reports} == {"t2v", "i2v"}
    for r in reports:
        assert r["passed"] and r["settings"]["reference"] == "SelfForcingReference" and r["settings"]["blocks"] == 2
        assert len(r["steps"]) == 8 and r["worst_step_pcc"] >= 0.9999
