"""bench/_common's measuring (issue 17): separate process runs and the contention mode, on a fake
worker pair whose speeds are known (no models: seconds), and the verdict's every-run rule."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKER = '''
import os, sys, time
sys.path.insert(0, {bench!r})
import _common as common

def setup(side):
    def call():
        time.sleep(0.02 if side == "mlx" else 0.04)
        return {{"pid": os.getpid()}}
    return {{"go": call}}, {{"pid": os.getpid()}}

common.serve(lambda: setup(sys.argv[sys.argv.index("--worker") + 1]))
'''


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("bench_common_under_test", ROOT / "bench" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.SETTLE_S = 0.0
    return module


@pytest.fixture
def fake(tmp_path) -> Path:
    script = tmp_path / "fake_bench.py"
    script.write_text(WORKER.format(bench=str(ROOT / "bench")))
    return script


def busy_processes() -> set[int]:
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--busy" in cmdline and any(part.endswith(b"_common.py") for part in cmdline):
            found.add(int(pid))
    return found


@pytest.mark.parametrize("mode", [{}, {"one_at_a_time": True}, {"one_at_a_time": True, "side_after_side": True}])
def test_process_runs_use_fresh_workers_and_contention_is_measured_beside(common, fake, mode):
    before = busy_processes()
    with common.measuring(processes=2, contention=True):
        results = common.interleaved(fake, ["mlx", "torch"], ["go"], 2, log=lambda line: None, **mode)
    assert common.MEASURE == {"processes": 1, "contention": False}  # restored for the next benchmark
    assert busy_processes() == before  # the busy process is gone
    for side in ("mlx", "torch"):
        assert len(results[side]["process_runs"]) == 2
        assert len(results[side]["runs"]["go"]) == 4 and len(results[side]["contention"]["runs"]["go"]) == 4
        pids = {run["extra"]["pid"] for run in results[side]["runs"]["go"]}
        rebuilt_per_round = mode.get("one_at_a_time") and not mode.get("side_after_side")
        assert len(pids) == (4 if rebuilt_per_round else 2)  # a fresh worker per run (per round when rebuilt so)
    records = common.side_by_side("fake", results, {"go": "go"})
    assert [r["condition"] for r in records] == ["quiet", "contention"]
    assert all(len(r["time_ratios"]) == 2 and 0.2 < r["time_ratio"] < 1.0 for r in records)
    assert all(common.verdict(records).values())


def test_verdict_needs_every_run_and_takes_the_contention_goal(common):
    def row(label, condition, ratios):
        return {"label": label, "condition": condition, "time_ratio": sorted(ratios)[len(ratios) // 2],
                "time_ratios": ratios, "peak_ratio": 0.5, "peak_ratios": [0.5] * len(ratios)}

    met = common.verdict([row("a", "quiet", [0.8, 0.9, 1.05]), row("b", "quiet", [0.7, 0.99, 1.0]),
                          row("c", "contention", [1.1, 1.19, 1.0]), row("d", "contention", [1.0, 1.3, 1.1])])
    assert met == {"a": False, "b": True, "c": True, "d": False}


def test_machine_line_has_the_date_and_load(common):
    line = common.machine_line()
    assert "UTC" in line and "load average" in line and f"{os.cpu_count()} CPUs" in line


def test_processes_must_be_positive(common):
    with pytest.raises(ValueError, match="--processes 0"):
        with common.measuring(processes=0):
            pass
    assert sys.platform != "linux" or common._process_cpu_s(os.getpid()) > 0
