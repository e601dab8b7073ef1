"""LTX-2 generation on MLX: step parity with diffusers' pipelines (dev t2v and i2v, the distilled
two-stage chain, each with its soundtrack), the MP4 with its audio track, frames streamed to the
writer while the VAE still decodes, precomputed prompt states, and requests refused before any
weight loads. A small release whose components chain (fixtures/ltx2_pipeline.py), converted from
its Diffusers folder; the reference is diffusers' own pipelines on that folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from vidport.cli import app
from vidport.converter.core.errors import VidportError
from vidport.golden.metrics import psnr
from vidport.golden.pipeline_parity import pipeline_parity
from vidport.runtime.pipelines.protocol import Request, open_pipeline
from fixtures.ltx2_pipeline import write_pipeline_folder

SMALL = {"frames": 9, "height": 64, "width": 96, "steps": 2, "seed": 3, "prompt": "a red fox jumps",
         "negative_prompt": "blurry"}
SHORT_TEXT = {"max_sequence_length": 16}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return write_pipeline_folder(tmp_path_factory.mktemp("ltx2-pipeline") / "LTX-2-Diffusers")


def convert(source: Path, out: Path) -> Path:
    result = CliRunner().invoke(app, ["convert", "ltx2", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> Path:
    return convert(release, tmp_path_factory.mktemp("ltx2-mlx") / "ltx2")


@pytest.fixture(scope="module")
def video_only(release, tmp_path_factory) -> Path:
    """The same release without its audio VAE and vocoder."""
    root = tmp_path_factory.mktemp("ltx2-video-only")
    source = Path(shutil.copytree(release, root / "source"))
    for part in ("audio_vae", "vocoder"):
        shutil.rmtree(source / part)
    return convert(source, root / "mlx")


@pytest.mark.parametrize("task, extra", [("t2v", {}), ("i2v", {}), ("t2v", {"recipe": "distilled"})],
                         ids=["dev-t2v", "dev-i2v", "distilled-t2v"])
def test_each_step_matches_diffusers(converted, task, extra):
    """Video and audio latents after every step of every stage, the upsampler's output, the frames
    and the waveform, against diffusers' pipelines run on the same states and draws."""
    report = pipeline_parity(converted, task, extra=extra)
    assert report.passed, report.as_json()
    assert len(report.steps) == (8 + 3 if extra else 3)
    assert all(row.metrics["audio_pcc"] >= 0.9999 for row in report.steps)
    assert report.audio_snr >= 40.0 and report.psnr >= 40.0
    assert report.text["pcc"] >= 0.99999  # our Gemma's states against transformers'
    if extra:
        assert report.intermediates["upsampled"]["pcc"] >= 0.9999
        assert report.settings["experts"][:8] == ["stage 1"] * 8 and report.settings["experts"][8:] == ["stage 2"] * 3


def test_a_wrong_guidance_term_is_caught(converted, monkeypatch):
    """Parity notices a guidance term that is off (modality isolation's scale doubled on our side)."""
    from vidport.runtime.pipelines import ltx2

    original = ltx2.LTX2Pipeline.guidance

    def doubled(self, request):
        guidance = original(self, request)
        return type(guidance)(**{**guidance.__dict__, "modality": 2 * guidance.modality})

    monkeypatch.setattr(ltx2.LTX2Pipeline, "guidance", doubled)
    assert not pipeline_parity(converted, "t2v", steps=2).passed


def test_mp4_carries_the_soundtrack(converted, tmp_path):
    """`vidport generate` writes an MP4 whose audio track has the vocoder's rate and the clip's
    length, a WAV beside it, and the frames the pipeline decodes."""
    from vidport.runtime.video import read_audio, read_video, write_video

    out = tmp_path / "fox.mp4"
    result = CliRunner().invoke(app, ["generate", "t2v", "--model", str(converted), "--prompt", SMALL["prompt"],
                                      "--frames", "17", "--height", "64", "--width", "96", "--steps", "2",
                                      "--seed", "5", "--wav", "--set", "max_sequence_length=16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pipe = open_pipeline(converted)
    expected = pipe.generate(Request(task="t2v", prompt=SMALL["prompt"], frames=17, height=64, width=96, steps=2,
                                     seed=5, extra=SHORT_TEXT))
    audio, rate = read_audio(out)
    assert rate == expected.sample_rate == 24000
    assert audio.shape[1] == 2
    assert abs(len(audio) - 17 / 24 * rate) <= 1024 + abs(len(expected.audio) - 17 / 24 * rate)
    frames = read_video(out)
    assert frames.shape == (17, 64, 96, 3)
    # random-weight frames are noise that 4:2:0 H.264 cannot keep: compare with the same frames
    # through the same encoder instead
    same = read_video(write_video(tmp_path / "expected.mp4", expected.frames, 24))
    assert psnr(same / 255.0, frames / 255.0) >= 40.0
    wav, wav_rate = read_audio(out.with_suffix(".wav"))
    assert wav_rate == rate and np.abs(wav - np.clip(expected.audio, -1, 1)).max() <= 1 / 32767 + 1e-6


def test_frames_reach_the_writer_before_the_decode_ends(converted, monkeypatch):
    """A clip longer than one temporal tile: the writer gets its first frames while later tiles
    are still to be decoded, and every frame once."""
    pipe = open_pipeline(converted)
    vae = pipe.model("vae")
    calls = {"decoder": 0}
    decoder = type(vae.decoder).__call__

    def counting(self, *args, **kwargs):
        calls["decoder"] += 1
        return decoder(self, *args, **kwargs)

    monkeypatch.setattr(type(vae.decoder), "__call__", counting)
    seen: list[tuple[int, int]] = []

    class Writer:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def append(self, frames):
            seen.append((len(frames), calls["decoder"]))

    request = Request(task="t2v", prompt="waves", frames=49, height=64, width=96, steps=2, seed=1,
                      extra={**SHORT_TEXT, "audio": False, "guidance_rescale": 0.0})
    request = pipe.check(request)
    request.writer = lambda audio, rate: Writer()
    result = pipe.run(request)
    assert result.frames is None
    assert sum(n for n, _ in seen) == 49
    assert len(seen) > 1 and seen[0][1] < calls["decoder"]


def test_prompt_states_from_a_file_match_the_encoded_prompt(converted, tmp_path):
    """--prompt-embeds: diffusers' layout (states and masks) saved elsewhere gives the run the
    prompt gives."""
    from vidport.runtime.pipelines.inputs import read_prompt_embeds

    pipe = open_pipeline(converted)
    states, mask = pipe.encode_prompt([SMALL["prompt"], SMALL["negative_prompt"]], 16)
    path = tmp_path / "embeds.npz"
    np.savez(path, prompt_embeds=np.array(states[:1]), prompt_attention_mask=np.array(mask[:1]),
             negative_prompt_embeds=np.array(states[1:]), negative_prompt_attention_mask=np.array(mask[1:]))
    settings = {k: v for k, v in SMALL.items() if k not in ("prompt", "negative_prompt")}
    given = pipe.generate(Request(task="t2v", prompt_embeds=read_prompt_embeds(path), decode=False,
                                  extra=SHORT_TEXT, **settings))
    encoded = pipe.generate(Request(task="t2v", prompt=SMALL["prompt"], negative_prompt=SMALL["negative_prompt"],
                                    decode=False, extra=SHORT_TEXT, **settings))
    assert np.abs(np.array(given.latents) - np.array(encoded.latents)).max() < 1e-5


@pytest.mark.parametrize("request_settings, message", [
    ({"frames": 10}, r"1 \+ 8k frames"),
    ({"height": 80}, "multiple of 32"),
    ({"height": 96, "extra": {"recipe": "distilled"}}, "multiple of 64"),
    ({"task": "i2v", "image": np.zeros((64, 64, 3), np.uint8)}, "another aspect ratio"),
    ({"extra": {"stg_blocks": [7]}}, "stg_blocks"),
    ({"steps": 1}, "at least 2 steps"),
], ids=["frames", "height", "distilled-height", "aspect", "stg-block", "steps"])
def test_bad_requests_fail_before_any_weight_loads(converted, request_settings, message):
    pipe = open_pipeline(converted)
    settings = {"task": "t2v", "prompt": "x", "frames": 9, "height": 64, "width": 96, **request_settings}
    with pytest.raises(VidportError, match=message) as caught:
        pipe.check(Request(**settings))
    assert "\n" not in str(caught.value.args[0])
    assert not pipe._models


def test_a_video_only_release_makes_video_and_refuses_sound(video_only, tmp_path):
    pipe = open_pipeline(video_only)
    with pytest.raises(VidportError, match="video-only"):
        pipe.check(Request(task="t2v", prompt="x", frames=9, height=64, width=96, extra={"audio": True}))
    result = pipe.generate(Request(task="t2v", prompt="x", frames=9, height=64, width=96, steps=2, seed=0,
                                   extra=SHORT_TEXT))
    assert result.audio is None and result.frames.shape == (9, 64, 96, 3)
    cli = CliRunner().invoke(app, ["generate", "t2v", "--model", str(video_only), "--prompt", "x", "--audio",
                                   "--frames", "9", "--out", str(tmp_path / "x.mp4")])
    assert cli.exit_code != 0 and "video-only" in cli.output


def test_low_memory_streams_the_dit_and_gives_the_same_video(converted):
    """--low-memory: the DiT's blocks read from disk one at a time, the same latents."""
    settings = dict(task="t2v", prompt="x", frames=9, height=64, width=96, steps=2, seed=4, decode=False)
    normal = open_pipeline(converted).generate(Request(**settings, extra=SHORT_TEXT))
    pipe = open_pipeline(converted)
    low = pipe.generate(Request(**settings, extra={**SHORT_TEXT, "low_memory": True}))
    assert np.array_equal(np.array(normal.latents), np.array(low.latents))
    blocks = pipe._models["transformer"].transformer_blocks
    assert all(hasattr(block, "streamed_weights") for block in blocks)
