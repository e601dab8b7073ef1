"""The Self-Forcing pipeline on 2 processes over MLX's ring backend (`vidport generate --launch`), under
its parallel plans (tensor, sequence), against the same run in one process: every step's x0 of every
block (PCC) and the decoded frames (PSNR), the tensor plan's per-rank weight and KV cache memory, and
refusals (cfg: no guidance to split; a plan that does not divide) before any weight loads.

The single-process run is itself held to the official inference loop by
tests/test_self_forcing_generate.py. The DiT here is wider than that file's (8 heads of 32, FFN 1024)
so that weight memory is dominated by the sharded matrices rather than by the whole norms and tables.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vidport.runtime  # noqa: F401  (before mlx: the runtime gives MLX its fast BLAS)
from vidport.converter.core.errors import VidportError
from fixtures.ring import pcc, psnr, ring
from vidport.converter.pipeline import convert_pipeline, plan_pipeline
from vidport.runtime.distributed import Watchdog, World
from vidport.runtime.parallel_causal_wan import causal_plan
from vidport.runtime.pipelines.protocol import Request
from vidport.runtime.pipelines.self_forcing import SelfForcingPipeline

VIDPORT = str(Path(sys.executable).with_name("vidport"))
DIT = {"num_attention_heads": 8, "attention_head_dim": 32, "ffn_dim": 1024}
# 21 frames: 2 blocks of 3 latent frames; 32 x 48: 2 x 3 patches a frame, 18 tokens a block
ARGS = ["--prompt", "a fox in the snow", "--frames", "21", "--height", "32", "--width", "48", "--steps", "3",
        "--seed", "1"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    from fixtures.self_forcing_pipeline import write_self_forcing_release

    return write_self_forcing_release(tmp_path_factory.mktemp("sf-distributed") / "release", "diffusers", **DIT)


def convert(release: dict, out: Path, dtype: str | None = None) -> Path:
    heads = {"transformer.num_attention_heads": DIT["num_attention_heads"]}
    convert_pipeline(plan_pipeline("self-forcing", {"checkpoint": release["checkpoint"], "base": release["base"]},
                                   dtype=dtype, overrides=heads), out)
    return out


@pytest.fixture(scope="module")
def folder(release) -> Path:
    return convert(release, release["base"].parent.parent / "mlx")


def generate(folder: Path, out: Path, *extra: str, task: str = "t2v") -> subprocess.CompletedProcess:
    return subprocess.run([VIDPORT, "generate", task, "--model", str(folder), *ARGS, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory) -> Path:
    """The single-process run's dump: step_NNN.npy x0s, frames.npy, rank0_weights.json."""
    dump = tmp_path_factory.mktemp("single")
    done = generate(folder, dump / "out/", "--set", f"dump_steps={dump}")
    assert done.returncode == 0, done.stdout + done.stderr
    return dump



@pytest.mark.parametrize("plan", ["tensor", "sequence"])
def test_plan_equals_single_process(folder, single, plan, tmp_path):
    """Two ranks under the plan: the same x0 after every step of every block and the same frames as
    one process; rank 0 alone writes; the plan is printed at the start. Tensor: each rank holds
    half of the blocks' weights and half of the KV cache; sequence: all of both."""
    done = generate(folder, tmp_path / "out/", "--set", f"parallel={plan}", "--set", f"dump_steps={tmp_path}",
                    "--launch", ring(2))
    assert done.returncode == 0, done.stdout + done.stderr
    said = done.stdout.find(f"parallel: {plan} over 2 ranks")
    assert 0 <= said < done.stdout.find("denoising"), done.stdout  # before the run starts
    steps = sorted(single.glob("step_*.npy"))
    assert len(steps) == 2 * 3 and [p.name for p in steps] == sorted(p.name for p in tmp_path.glob("step_*.npy"))
    for path in steps:
        assert pcc(np.load(path), np.load(tmp_path / path.name)) >= 0.99999, path.name
    frames = np.load(single / "frames.npy")
    assert frames.shape[0] == 21 and psnr(frames, np.load(tmp_path / "frames.npy")) >= 60.0
    assert len(list((tmp_path / "out").glob("*.png"))) == 21
    alone = json.loads((single / "rank0_weights.json").read_text())
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}_weights.json").read_text())
        share = report["block_bytes"] / alone["block_bytes"]
        cache = report["cache_bytes"] / alone["cache_bytes"]
        if plan == "tensor":  # heads and FFN split; the block's norms and modulation table kept whole
            assert 0.5 <= share < 0.51, share
            assert cache == 0.5 and report["cache_self_bytes"] * 2 == alone["cache_self_bytes"]
        else:
            assert share == 1.0 and cache == 1.0


@pytest.mark.slow  # 5 more processes on a 2-core machine; CI runs it (make test under CI=true)
@pytest.mark.parametrize("plan", ["tensor", "sequence"])
def test_plan_on_four_ranks(folder, plan, tmp_path):
    """Four ranks (2 of 8 heads each; 6 of a block's 24 tokens each at 32 x 64): the same run as one
    process; tensor: each rank holds a quarter of the KV cache."""
    wide = ["--width", "64"]
    done = generate(folder, tmp_path / "one/", *wide, "--set", f"dump_steps={tmp_path / 'one'}")
    assert done.returncode == 0, done.stdout + done.stderr
    done = generate(folder, tmp_path / "four/", *wide, "--set", f"parallel={plan}",
                    "--set", f"dump_steps={tmp_path / 'four'}", "--launch", ring(4))
    assert done.returncode == 0, done.stdout + done.stderr
    steps = sorted((tmp_path / "one").glob("step_*.npy"))
    assert len(steps) == 6
    for path in steps:
        assert pcc(np.load(path), np.load(tmp_path / "four" / path.name)) >= 0.99999, path.name
    assert psnr(np.load(tmp_path / "one" / "frames.npy"), np.load(tmp_path / "four" / "frames.npy")) >= 60.0
    alone = json.loads((tmp_path / "one" / "rank0_weights.json").read_text())
    for rank in range(4):
        report = json.loads((tmp_path / "four" / f"rank{rank}_weights.json").read_text())
        assert report["cache_bytes"] * (4 if plan == "tensor" else 1) == alone["cache_bytes"]


@pytest.mark.slow  # 3 more runs; CI runs it (make test under CI=true)
def test_rolling_cache_plans_equal_single_process(folder, tmp_path):
    """A rolling cache (a 6-frame window with 3 sink frames over 4 blocks: frames are evicted) under
    both plans: the same run as one process, the cache as the plan divides it."""
    rolling = ["--frames", str(1 + 4 * (3 * 4 - 1)), "--set", "local_attn_size=6", "--set", "sink_size=3"]
    done = generate(folder, tmp_path / "one/", *rolling, "--set", f"dump_steps={tmp_path / 'one'}")
    assert done.returncode == 0, done.stdout + done.stderr
    alone = json.loads((tmp_path / "one" / "rank0_weights.json").read_text())["cache_bytes"]
    for plan in ("tensor", "sequence"):
        done = generate(folder, tmp_path / plan / "out/", *rolling, "--set", f"parallel={plan}",
                        "--set", f"dump_steps={tmp_path / plan}", "--launch", ring(2))
        assert done.returncode == 0, done.stdout + done.stderr
        steps = sorted((tmp_path / "one").glob("step_*.npy"))
        assert len(steps) == 4 * 3
        for path in steps:
            assert pcc(np.load(path), np.load(tmp_path / plan / path.name)) >= 0.99999, (plan, path.name)
        frames = np.load(tmp_path / "one" / "frames.npy"), np.load(tmp_path / plan / "frames.npy")
        assert psnr(*frames) >= 60.0, plan
        cache = json.loads((tmp_path / plan / "rank1_weights.json").read_text())["cache_bytes"]
        assert cache * (2 if plan == "tensor" else 1) == alone, plan


@pytest.mark.slow  # 5 more runs; CI runs it (make test under CI=true)
def test_image_to_video_plans_equal_single_process(folder, tmp_path):
    """i2v: the image's frame is written to the cache by a DiT call of its own (6 tokens, 3 a rank
    under sequence) before the blocks follow it; both plans give the one-process run."""
    from PIL import Image

    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(image)
    i2v = ["--image", str(image), "--frames", "25"]
    done = generate(folder, tmp_path / "one/", *i2v, "--set", f"dump_steps={tmp_path / 'one'}", task="i2v")
    assert done.returncode == 0, done.stdout + done.stderr
    for plan in ("tensor", "sequence"):
        done = generate(folder, tmp_path / plan / "out/", *i2v, "--set", f"parallel={plan}",
                        "--set", f"dump_steps={tmp_path / plan}", "--launch", ring(2), task="i2v")
        assert done.returncode == 0, done.stdout + done.stderr
        steps = sorted((tmp_path / "one").glob("step_*.npy"))
        assert len(steps) == 6
        for path in steps:
            assert pcc(np.load(path), np.load(tmp_path / plan / path.name)) >= 0.99999, (plan, path.name)
        frames = np.load(tmp_path / "one" / "frames.npy"), np.load(tmp_path / plan / "frames.npy")
        assert frames[0].shape[0] == 25 and psnr(*frames) >= 60.0, plan


@pytest.mark.slow  # a bfloat16 conversion and 3 more runs; CI runs it (make test under CI=true)
def test_bfloat16_plans_equal_single_process(release, tmp_path):
    """A bfloat16 folder under each plan on 2 ranks against its one-process run, at the project's
    bfloat16 pipeline thresholds (golden/metrics.py). Measured: sequence bit for bit; tensor worst
    step PCC 0.999988 and frames 46.0 dB (sums over split heads and FFN columns round in bfloat16
    in another order)."""
    from vidport.golden.metrics import pipeline_threshold_for

    bf16 = convert(release, tmp_path / "bf16", "bfloat16")
    limits = pipeline_threshold_for("bfloat16")
    done = generate(bf16, tmp_path / "one/", "--set", f"dump_steps={tmp_path / 'one'}")
    assert done.returncode == 0, done.stdout + done.stderr
    for plan in ("tensor", "sequence"):
        done = generate(bf16, tmp_path / plan / "out/", "--set", f"parallel={plan}",
                        "--set", f"dump_steps={tmp_path / plan}", "--launch", ring(2))
        assert done.returncode == 0, done.stdout + done.stderr
        for path in sorted((tmp_path / "one").glob("step_*.npy")):
            assert pcc(np.load(path), np.load(tmp_path / plan / path.name)) >= limits.min_step_pcc, (plan, path.name)
        frames = np.load(tmp_path / "one" / "frames.npy"), np.load(tmp_path / plan / "frames.npy")
        assert psnr(*frames) >= limits.min_psnr, plan


def test_cfg_is_refused_before_weights_load(folder, tmp_path):
    """cfg under mlx.launch: one error line naming why (no guidance), no output, no dump."""
    out = tmp_path / "never.mp4"
    done = generate(folder, out, "--set", "parallel=cfg", "--set", f"dump_steps={tmp_path / 'dump'}",
                    "--launch", ring(2))
    assert done.returncode == 1
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "runs without classifier-free guidance" in errors[0], done.stdout + done.stderr
    assert not out.exists() and not (tmp_path / "dump").exists()


def test_killed_rank_leaves_no_video(folder, tmp_path):
    """Rank 1 SIGKILLed while rank 0 streams blocks into the MP4: the run ends non-zero within
    seconds, rank 0's error names the lost connection, and the partial file is gone."""
    import psutil

    out = tmp_path / "fox.mp4"
    blocks = ["--frames", str(1 + 4 * (3 * 12 - 1))]  # 12 blocks: long enough to be killed in
    launcher = subprocess.Popen([VIDPORT, "generate", "t2v", "--model", str(folder), *ARGS, *blocks, "--out", str(out),
                                 "--set", "parallel=tensor", "--set", f"dump_steps={tmp_path}", "--launch", ring(2)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / "step_002.npy").exists():  # rank 0 is past a block's steps
            assert launcher.poll() is None, launcher.communicate()
            time.sleep(0.01)
        rank1 = next(child for child in psutil.Process(launcher.pid).children(recursive=True)
                     if child.environ().get("MLX_RANK") == "1" and "generate" in child.cmdline())
        began = time.monotonic()
        rank1.kill()
        stdout, stderr = launcher.communicate(timeout=60)
        waited = time.monotonic() - began
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1 and waited < 15, (waited, stdout + stderr)
    said = " ".join((stdout + stderr).split())
    assert "error: rank 1 was killed by signal 9" in said, stdout + stderr
    assert len(list(tmp_path.glob("step_*.npy"))) < 12 * 3 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix not in (".npy", ".json")]


def _world(size: int) -> World:
    return World(None, 0, size, Watchdog(0))


@pytest.mark.parametrize("plan, size, settings, message", [
    ("cfg", 2, {}, "runs without classifier-free guidance"),
    ("tensor", 3, {}, "num_attention_heads 8 does not split across 3 ranks"),
    ("sequence", 4, {}, "a DiT call's 18 tokens do not split into 4"),  # a block: 3 frames of 2 x 3 patches
    ("sequence", 3, {"task": "i2v", "frames": 25, "width": 32, "image": np.zeros((32, 32, 3), np.uint8)},
     "a DiT call's 4 tokens do not split into 3"),  # blocks of 12 do; the image's frame of 2 x 2 does not
    ("tensor", 1, {}, "not started by mlx.launch"),
    (None, 2, {}, "2 ranks but no parallel plan"),
])
def test_refusals_before_weights_load(folder, tmp_path, monkeypatch, plan, size, settings, message):
    """Every refusal from configs and the rank count alone: the weights are removed from a copy of
    the folder, and the plan sees `size` ranks."""
    from vidport.runtime import distributed

    copy = tmp_path / "no-weights"
    shutil.copytree(folder, copy)
    for weights in copy.rglob("*.safetensors"):
        weights.unlink()
    monkeypatch.setattr(distributed, "_world", _world(size))
    pipe = SelfForcingPipeline.from_folder(copy)
    request = Request(**{"task": "t2v", "prompt": "a cat", "frames": 21, "height": 32, "width": 48,
                         "extra": {"parallel": plan}, **settings})
    with pytest.raises(VidportError, match=re.escape(message)):
        pipe.check(request)


def test_plan_lines():
    """What each plan says at the start of a run, from the DiT's config."""
    config = {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
    assert causal_plan("tensor", _world(2)).describe(config) == (
        "tensor over 2 ranks: each rank 6 of 12 heads and 4480 of 8960 FFN columns of every block, loaded as "
        "shards tensor by tensor; the KV cache holds each rank's heads (1/2)")
    assert "keys and values all-gathered in each of 30 self-attentions" in causal_plan("sequence", _world(4)).describe(
        config)
