"""The Wan pipeline on 2 processes over MLX's ring backend (`vidport generate --launch`), under each
parallel plan, against the same run in one process: every step's latents (PCC) and the decoded
frames (PSNR), the tensor plan's per-rank weight memory, refusals before any weight loads, and a
rank killed or stopped mid-run ending the run fast with no output file.

The single-process run is itself held to diffusers' WanPipeline by tests/test_wan_pipeline.py.
The DiT here is wider than the pipeline fixture's (8 heads of 32, FFN 1024) so that weight memory
is dominated by the weights rather than by allocation rounding.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from vidport.converter.core.errors import VidportError
from vidport.converter.pipeline import convert_pipeline, plan_pipeline
from vidport.runtime.distributed import PLANS, Watchdog, World, parse_plan
from vidport.runtime.parallel_wan import wan_plan

VIDPORT = str(Path(sys.executable).with_name("vidport"))
DIT = {"num_attention_heads": 8, "attention_head_dim": 32, "ffn_dim": 1024}


def run_args(steps: int = 3) -> list[str]:
    return ["--prompt", "a cat sits on the mat", "--frames", "5", "--height", "32", "--width", "32", "--steps",
            str(steps), "--seed", "1", "--guidance", "5"]


LAUNCH = ["--launch", "-n 2 --backend ring"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A converted Wan 2.1 T2V pipeline folder with the wider DiT."""
    from fixtures.wan_dit import random_wan_transformer, wan_config
    from fixtures.wan_pipelines import TEXT_DIM, build_pipeline

    root = tmp_path_factory.mktemp("wan-distributed")
    pipe = build_pipeline("t2v", seed=5)
    pipe.transformer = random_wan_transformer(wan_config("t2v", text_dim=TEXT_DIM, **DIT), seed=6)
    pipe.save_pretrained(str(root / "source"), safe_serialization=True)
    convert_pipeline(plan_pipeline("wan", {"wan": root / "source"}, "mlx"), root / "mlx")
    return root / "mlx"


def generate(folder: Path, out: Path, *extra: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([VIDPORT, "generate", "t2v", "--model", str(folder), *run_args(), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def single(folder, tmp_path_factory) -> Path:
    """The single-process run's dump: step_NNN.npy latents, frames.npy, rank0_weights.json."""
    dump = tmp_path_factory.mktemp("single")
    done = generate(folder, dump / "out/", "--set", f"dump_steps={dump}")
    assert done.returncode == 0, done.stdout + done.stderr
    return dump


def pcc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("plan", PLANS)
def test_plan_equals_single_process(folder, single, plan, tmp_path):
    """Two ranks under the plan: the same latents after every step and the same frames as one
    process; rank 0 alone writes the output; the plan is printed at the start."""
    done = generate(folder, tmp_path / "out/", "--set", f"parallel={plan}", "--set", f"dump_steps={tmp_path}", *LAUNCH)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"parallel: {plan} over 2 ranks" in done.stdout
    assert done.stdout.count("t2v:") == 2  # rank 0's request line and summary; rank 1 prints nothing
    steps = sorted(single.glob("step_*.npy"))
    assert [p.name for p in steps] == sorted(p.name for p in tmp_path.glob("step_*.npy")) and len(steps) == 3
    for path in steps:
        assert pcc(np.load(path), np.load(tmp_path / path.name)) >= 0.99999, path.name
    assert psnr(np.load(single / "frames.npy"), np.load(tmp_path / "frames.npy")) >= 60.0
    assert len(list((tmp_path / "out").glob("*.png"))) == 5
    reports = [json.loads((tmp_path / f"rank{r}_weights.json").read_text()) for r in (0, 1)]
    alone = json.loads((single / "rank0_weights.json").read_text())
    for report in reports:
        share = report["block_bytes"] / alone["block_bytes"]
        if plan == "tensor":  # heads and FFN split; norms of the block and its modulation table kept whole
            assert 0.5 <= share < 0.51, share
            held = report["block_bytes"] + report["other_bytes"]
            assert report["active_memory"] < 1.05 * held, (report, held)  # no whole tensor kept behind a slice
        else:
            assert share == 1.0


def test_plan_that_does_not_divide(folder, tmp_path):
    """8 heads on 3 ranks: one error line from rank 0, before any weight loads, no output."""
    out = tmp_path / "never.mp4"
    done = generate(folder, out, "--set", "parallel=tensor", "--launch", "-n 3 --backend ring")
    assert done.returncode == 1
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error:")]
    assert errors == ["error: --set parallel=tensor: the DiT's num_attention_heads 8 does not split across 3 ranks"]
    assert not out.exists() and not list(tmp_path.iterdir())


def _rank_process(launcher: subprocess.Popen, rank: int, deadline: float) -> psutil.Process:
    """The vidport process of `rank` under the launcher, once it is running."""
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("MLX_RANK") == str(rank) and "generate" in child.cmdline():
                    return child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never started")


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_lost_rank_fails_fast(folder, tmp_path, how):
    """Rank 1 SIGKILLed mid-run: rank 0 loses the connection at its next collective and the run
    ends non-zero within seconds. Rank 1 SIGSTOPped (alive, sockets open): rank 0's watchdog gives
    up after collective_timeout. Either way no output file."""
    out = tmp_path / "video.mp4"
    command = [VIDPORT, "generate", "t2v", "--model", str(folder), *run_args(20), "--out", str(out), "--set", "parallel=cfg", "--set", "collective_timeout=5",
               "--set", f"dump_steps={tmp_path}", *LAUNCH]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rank1 = _rank_process(launcher, 1, time.monotonic() + 60)
        while not (tmp_path / "rank1_weights.json").exists():  # its DiT is loaded: the steps come next
            time.sleep(0.01)
        rank1.send_signal(signal.SIGSTOP)
        rank0 = _rank_process(launcher, 0, time.monotonic() + 5)
        began = time.monotonic()
        if how == "killed":
            rank1.send_signal(signal.SIGKILL)
        psutil.wait_procs([rank0], timeout=30)
        waited = time.monotonic() - began
        if how == "stopped":
            rank1.send_signal(signal.SIGKILL)  # mlx.launch's SIGTERM waits on a stopped process
        stdout, stderr = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1, stdout + stderr
    assert waited < (10 if how == "killed" else 15), waited
    expected = ("error: rank 1 was killed by signal 9" if how == "killed"
                else "error: rank 0: no answer from the other ranks within 5 s")
    assert expected in " ".join((stdout + stderr).split()), stdout + stderr
    assert len(list(tmp_path.glob("step_*.npy"))) < 20
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.suffix not in (".npy", ".json")]


def _world(size: int) -> World:
    return World(None, 0, size, Watchdog(0))


@pytest.mark.parametrize("plan,size,tokens,guided,message", [
    ("cfg", 2, 8, False, "no classifier-free guidance"),
    ("cfg", 4, 8, True, "exactly 2 ranks"),
    ("sequence", 3, 8, True, "8 tokens do not split into 3"),
    ("tensor", 3, 8, True, "ffn_dim 1024 does not split across 3"),
    ("tensor", 1, 8, True, "not started by mlx.launch"),
    (None, 2, 8, True, "2 ranks but no parallel plan"),
])
def test_refusals(plan, size, tokens, guided, message):
    """Every plan's refusal, from configs and the rank count alone."""
    config = {"num_attention_heads": 6, "ffn_dim": 1024}  # 6 heads divide by 3: the FFN width is what fails
    with pytest.raises(VidportError) as err:
        wan_plan(plan, _world(size)).check([config], tokens, guided)
    assert message in err.value.message


def test_plan_names():
    assert parse_plan("tensor") == "tensor" and parse_plan(None) is None and parse_plan("none") is None
    with pytest.raises(VidportError, match="did you mean tensor"):
        parse_plan("tensr")
