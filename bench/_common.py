"""Shared plumbing for the MLX-vs-diffusers benchmarks (a private module: bench/run.py skips it).

Each side (the MLX runtime, diffusers on torch) runs in a worker subprocess of its own, so its peak
RSS is its own; the parent drives both workers over pipes and alternates them (MLX, torch, MLX,
torch, ...): only one computes at a time and drift in the machine's load hits both sides alike.
A worker builds its model once, reports its RSS with the model and inputs resident (the
baseline), runs a warm-up call, then times each call the parent asks for and reports wall time,
CPU time and its peak RSS (VmHWM) so far. "above baseline" is peak - baseline: what the
computation itself needed on top of the weights.

One pair of workers is one sample of the machine: `--processes K` repeats the whole comparison in
K pairs of freshly started workers and reports each ratio as the median of the K per-run ratios
with their range, met only when every run meets it; `--contention` also times every call with a
busy second process running (`busy`), since users' machines are never idle. Every table is
printed with the date and the load average.

MLX workers call `start_mlx()` (vidport.runtime.configure_cpu: OpenBLAS for MLX on Linux, glibc malloc
kept from returning memory) before anything imports mlx, and report which BLAS MLX uses.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fixtures package: small checkpoints in real formats
OUTPUT = ROOT / "bench-output"
MB = 1024**2
GB = 1024**3


# ---------------------------------------------------------------------------------------------
# measuring


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """Peak RSS of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_mlx() -> str:
    """Set the worker up for MLX (`vidport.runtime.configure_cpu`) before mlx loads; returns which BLAS MLX uses."""
    from vidport.runtime import configure_cpu, cpu_settings

    if "mlx.core" in sys.modules and not cpu_settings().fast_blas:
        raise RuntimeError("mlx was imported before vidport.runtime.configure_cpu(): MLX would keep the reference BLAS")
    return configure_cpu().blas


def start_torch() -> str:
    import torch

    torch.set_grad_enabled(False)
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------------
# profiles by op category (one extra call per side; the timed calls run unprofiled)

CATEGORIES = ("conv", "attention", "group norm", "layer/RMS norm", "linear", "activation")


def mlx_profile(fn: Callable[[], Any]) -> dict[str, float]:
    """Run `fn` once with the runtime's conv, attention, group/layer norm and linear layers each
    evaluated on its own (its inputs first, outside the clock): seconds per category, the total,
    and calls per category. Evaluating op by op costs MLX some overlap, so "total" is a little
    above an unprofiled call."""
    import mlx.core as mx
    import mlx.nn as nn

    import vidport.runtime.layers as layers
    from vidport.runtime.cpu_threads import one_at_a_time

    times = {c: 0.0 for c in CATEGORIES}
    calls = {c: 0 for c in CATEGORIES}

    def arrays(values) -> list:
        return [v for v in values if isinstance(v, mx.array)]

    def wrap(category: str, original: Callable) -> Callable:
        def timed(*args, **kwargs):
            mx.eval(arrays(args) + arrays(kwargs.values()))
            start = time.perf_counter()
            out = original(*args, **kwargs)
            mx.eval(out)
            times[category] += time.perf_counter() - start
            calls[category] += 1
            return out

        return timed

    patches = [(nn.Conv2d, "__call__", "conv"), (nn.Conv3d, "__call__", "conv"), (nn.GroupNorm, "__call__", "group norm"),
               (nn.LayerNorm, "__call__", "layer/RMS norm"), (nn.RMSNorm, "__call__", "layer/RMS norm"),
               (nn.Linear, "__call__", "linear")]
    # the runtime's own layers of those kinds (each __call__ is self-contained: no double counting)
    own = {"vidport.runtime.wan_vae_conv": {"WanCausalConv3d": "conv", "BandedConv2d": "conv"},
           "vidport.runtime.wan_embeddings": {"FP32LayerNorm": "layer/RMS norm"},
           "vidport.runtime.wan_vae_layers": {"WanRMSNorm": "group norm"}}
    for module_name, classes in own.items():
        if module_name in sys.modules:
            patches += [(getattr(sys.modules[module_name], c), "__call__", category) for c, category in classes.items()]
    patches += [(layers.GroupNorm, "__call__", "group norm"), (layers.Conv2d, "__call__", "conv")]
    functions = {"attention": "attention", "silu": "activation", "gelu": "activation", "gelu_tanh": "activation",
                 "geglu": "activation", "sigmoid": "activation", "upsample2x_conv3x3": "conv"}
    for module in [m for name, m in sys.modules.items() if name.startswith("vidport.runtime.") and m is not None]:
        for name, category in functions.items():  # the module's own reference to the runtime.layers function
            if getattr(module, name, None) is getattr(layers, name):
                patches.append((module, name, category))
    originals = [(owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name))
                 for owner, name, _ in patches]
    try:
        for (owner, name, category), (_, _, original) in zip(patches, originals):
            setattr(owner, name, wrap(category, original))
        start = time.perf_counter()
        with one_at_a_time():  # one clock per category: parts in turn, not on threads
            fn()
        total = time.perf_counter() - start
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    return {"seconds": {**times, "total": total}, "calls": calls}


def torch_profile(fn: Callable[[], Any]) -> dict[str, float]:
    """Run `fn` once under torch.profiler: inclusive CPU seconds of the top-level ops per category."""
    from torch.profiler import ProfilerActivity, profile

    ops = {"aten::convolution": "conv", "aten::scaled_dot_product_attention": "attention",
           "aten::group_norm": "group norm", "aten::layer_norm": "layer/RMS norm", "aten::rms_norm": "layer/RMS norm",
           "aten::linear": "linear", "aten::silu": "activation", "aten::gelu": "activation",
           "aten::sigmoid": "activation"}
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    total = time.perf_counter() - start
    times = {c: 0.0 for c in CATEGORIES}
    calls = {c: 0 for c in CATEGORIES}
    for event in prof.key_averages():
        if event.key in ops:
            times[ops[event.key]] += event.cpu_time_total / 1e6
            calls[ops[event.key]] += event.count
    return {"seconds": {**times, "total": total}, "calls": calls}


def profile_table(title: str, mlx: dict, reference: dict) -> list[dict]:
    """Side-by-side category table from mlx_profile / torch_profile results."""
    rows, records = [], []
    for category in (*CATEGORIES, "other", "total"):
        if category == "other":
            a = mlx["seconds"]["total"] - sum(mlx["seconds"][c] for c in CATEGORIES)
            b = reference["seconds"]["total"] - sum(reference["seconds"][c] for c in CATEGORIES)
            count = ("-", "-")
        else:
            a, b = mlx["seconds"][category], reference["seconds"][category]
            count = (str(mlx["calls"].get(category, "-")), str(reference["calls"].get(category, "-")))
        records.append({"category": category, "mlx_s": a, "torch_s": b, "ratio": a / b if b > 0 else None})
        rows.append([category, f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}" if b > 0 else "-",
                     f"{a - b:+.2f}", f"{100 * a / mlx['seconds']['total']:.0f}%", *count])
    table(title, ["op category", "MLX s", "torch s", "MLX/torch", "MLX - torch s", "share of MLX", "MLX calls",
                  "torch calls"], rows)
    return records


def profile_tables(title: str, results: dict[str, dict], call: str = "profile", mlx: str = "mlx",
                   reference: str = "torch") -> dict[str, list[dict]]:
    """`profile_table` for each condition `interleaved` ran the profile call in (quiet; contention
    when measured): records by condition."""
    found = {}
    for condition in CONDITIONS:
        a, b = (results[s] if condition == "quiet" else results[s].get(condition) for s in (mlx, reference))
        if a is not None and b is not None and call in a["extra"] and call in b["extra"]:
            found[condition] = profile_table(title + ("" if condition == "quiet" else ", under contention"),
                                             a["extra"][call], b["extra"][call])
    return found


# ---------------------------------------------------------------------------------------------
# worker side


def serve(setup: Callable[[], tuple[dict[str, Callable[[], Any]], dict[str, Any]]], warmup: bool = True) -> None:
    """Run as a worker: `setup()` builds the model and inputs and returns ({call name: function},
    info); then answer the parent's calls, one JSON line each, until it says quit. Each function
    must finish its computation (mx.eval / a torch result) before it returns."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the replies
    reply = os.fdopen(reply_fd, "w")

    def send(message: dict) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    try:
        start = time.perf_counter()
        calls, info = setup()
        built = time.perf_counter() - start
        baseline = rss_now()
        warm = {}
        if warmup:
            for name, fn in calls.items():
                if name == "profile":  # runs the computation once more, already warm
                    continue
                t0 = time.perf_counter()
                fn()
                warm[name] = time.perf_counter() - t0
        send({"ready": True, "info": info, "build_s": built, "baseline_rss": baseline,
              "baseline_peak": peak_rss(), "warmup_s": warm})
        for line in sys.stdin:
            command = json.loads(line)
            if command["call"] == "quit":
                break
            fn = calls[command["call"]]
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            result = fn()
            wall = time.perf_counter() - t0
            send({"wall_s": wall, "cpu_s": cpu_seconds() - cpu0, "peak_rss": peak_rss(), "rss": rss_now(),
                  "extra": result if isinstance(result, dict) else None})
    except Exception as err:  # noqa: BLE001  (reported to the parent, which raises)
        import traceback

        send({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------
# parent side


class Worker:
    """A worker subprocess: `python script --worker SIDE [args]`, driven line by line."""

    def __init__(self, script: str | Path, side: str, args: list[str] | None = None, env: dict | None = None):
        self.side = side
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, str(script), "--worker", side, *(args or [])], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "DIFFUSERS_VERBOSITY": "error",
                                          **(env or {})})
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.side} worker died ({self.proc.returncode}):\n{self.stderr_tail()}")
        message = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"{self.side} worker failed: {message['error']}\n{message.get('traceback', '')}")
        return message

    def stderr_tail(self, chars: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read()[-chars:]

    def call(self, name: str) -> dict:
        self.proc.stdin.write(json.dumps({"call": name}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"call": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# Before each timed call the parent waits this long: BLAS and OpenMP worker threads busy-wait for
# a while after their last job (OpenBLAS, libgomp), and on a 2-core machine the other side's
# spinning threads would otherwise slow the call being timed.
SETTLE_S = 0.3

# How the runtime benchmarks measure (`--processes`, `--contention`; set for one benchmark's run
# by `measuring`): one run in one pair of workers can be off by 30% on a shared machine, and the
# fastest configuration on an idle machine can be the slowest on a busy one, so a ratio is
# reported as the median over runs in freshly started workers, and optionally under a busy
# second process as well.
MEASURE: dict[str, Any] = {"processes": 1, "contention": False}
CONDITIONS = ("quiet", "contention")
CONTENTION_GOAL = 1.2  # MLX/torch time under contention (issue 17): no worse than this


@contextmanager
def measuring(processes: int = 1, contention: bool = False):
    """Within the block, `interleaved` (by default) runs `processes` separate runs in fresh workers,
    each also under contention when `contention`; restored after, so benchmarks run later in the
    same process (bench/run.py) measure as they ask."""
    if processes < 1:
        raise ValueError(f"--processes {processes}: at least 1")
    before = dict(MEASURE)
    MEASURE.update(processes=processes, contention=contention)
    try:
        yield
    finally:
        MEASURE.update(before)


def add_measure_options(parser: argparse.ArgumentParser) -> None:
    """The --processes / --contention options of the runtime benchmarks (see `measuring`)."""
    parser.add_argument("--processes", type=int, default=1,
                        help="separate runs, each in freshly started workers: the ratio reported is the median of "
                             "the runs' ratios, with their range, and a goal is met only when every run meets it "
                             "(make bench: 3)")
    parser.add_argument("--contention", action="store_true",
                        help="also time every call with a busy second process running (a one-thread BLAS matmul "
                             f"loop and a pure-Python spin), reported beside the quiet figures (goal: ratio <= "
                             f"{CONTENTION_GOAL})")


def busy() -> None:
    """The contention load (`python bench/_common.py --busy`): float32 matrix products on one
    thread (numpy's BLAS, OPENBLAS_NUM_THREADS=1) beside a pure-Python loop, pinned to no CPU,
    until killed: about two cores of work of the two kinds a user's machine is busy with."""
    import threading

    import numpy as np

    sys.setswitchinterval(0.0005)  # the matmul thread waits at most this long for the GIL between products
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)

    def products() -> None:
        while True:
            a @ a

    threading.Thread(target=products, daemon=True).start()
    print("busy", flush=True)
    count = 0
    while True:
        count = (count + 1) % 1_000_003


def _process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@contextmanager
def contention(active: bool, log: Callable[[str], None] = print):
    """While the block runs, a busy second process (`busy`) when `active`; yields what it did
    (filled in when the block ends: seconds, CPU seconds)."""
    done: dict[str, float | None] = {}
    if not active:
        yield done
        return
    single = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--busy"], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, env={**os.environ, **single})
    try:
        if proc.stdout.readline().strip() != "busy":
            raise RuntimeError(f"the contention process did not start ({proc.poll()})")
        start = time.perf_counter()
        yield done
        done.update(seconds=time.perf_counter() - start, cpu_s=_process_cpu_s(proc.pid))
        if done["cpu_s"] is not None:
            log(f"  contention process: {done['cpu_s']:.0f} CPU s in {done['seconds']:.0f} s "
                f"({done['cpu_s'] / done['seconds']:.2f} cores)")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def machine_line() -> str:
    """The date and the machine's load, printed with every table: figures mean little without them."""
    one, five, fifteen = os.getloadavg()
    return (f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; load average {one:.2f} {five:.2f} {fifteen:.2f} "
            f"(1/5/15 min); {os.cpu_count()} CPUs")


def interleaved(script: str | Path, sides: list[str], calls: list[str], repeat: int, args: list[str] | None = None,
                one_at_a_time: bool = False, log: Callable[[str], None] = print,
                extra_calls: list[str] | None = None, side_after_side: bool = False,
                processes: int | None = None, contended: bool | None = None) -> dict[str, dict]:
    """Build a worker per side, then run every call `repeat` times on each side, alternating sides
    within each round. With `one_at_a_time` only one worker lives at a time (for models too large
    to hold twice): the sides are then alternated by rebuilding the worker each round, or, with
    `side_after_side` (where builds and warm-ups cost minutes), one worker per side serves all its
    rounds and the sides run one after the other, not alternating.
    `extra_calls` run once per side after the timed rounds (profiles); what they return is kept
    under results[side]["extra"][call].

    All that is one process run; `processes` (default MEASURE's) repeats it in fresh workers each
    time, and `contended` (default MEASURE's) times each run's rounds (and extra calls) a second
    time under a busy second process (`contention`). results[side]: "runs" / "summary" / "extra"
    (quiet, all process runs together: the per-call medians and ranges), "contention" (the same
    under contention), "process_runs" (per run and condition, the summary of that run's calls:
    what the per-run ratios are taken from), and the first run's "info", "build_s",
    "baseline_rss", "warmup_s"."""
    processes = MEASURE["processes"] if processes is None else processes
    contended = MEASURE["contention"] if contended is None else contended
    conditions = CONDITIONS if contended else CONDITIONS[:1]
    results: dict[str, dict] = {side: {"runs": {c: [] for c in calls}, "extra": {}, "process_runs": []}
                                for side in sides}
    if contended:
        for side in sides:
            results[side]["contention"] = {"runs": {c: [] for c in calls}, "extra": {}}
    for number in range(processes):
        if processes > 1:
            log(f"  process run {number + 1}/{processes} (fresh workers); {machine_line()}")
        found = _process_run(script, sides, calls, repeat, args, one_at_a_time, log,
                             extra_calls if number == processes - 1 else [], side_after_side, conditions)
        for side in sides:
            ready = found[side]["ready"]
            if number == 0:
                results[side].update({k: ready[k] for k in ("info", "build_s", "baseline_rss", "warmup_s")})
            per_run = {}
            for condition in conditions:
                into = results[side] if condition == "quiet" else results[side]["contention"]
                for call in calls:
                    into["runs"][call] += found[side][condition][call]
                into["extra"].update(found[side]["extra"][condition])
                per_run[condition] = {call: summarize(found[side][condition][call], ready["baseline_rss"])
                                      for call in calls}
            results[side]["process_runs"].append(per_run)
    for side in sides:
        for condition in conditions:
            into = results[side] if condition == "quiet" else results[side]["contention"]
            into["summary"] = {call: summarize(found_runs, results[side]["baseline_rss"])
                               for call, found_runs in into["runs"].items()}
    return results


def _process_run(script: str | Path, sides: list[str], calls: list[str], repeat: int, args: list[str] | None,
                 one_at_a_time: bool, log: Callable[[str], None], extra_calls: list[str] | None,
                 side_after_side: bool, conditions: tuple[str, ...]) -> dict[str, dict]:
    """One process run of `interleaved`: per side, its workers' "ready" message and, per
    condition, the timed calls' measurements and the extra calls' results."""
    found: dict[str, dict] = {side: {"extra": {c: {} for c in conditions}, "ready": None,
                                     **{c: {call: [] for call in calls} for c in conditions}} for side in sides}
    workers: dict[str, Worker] = {}

    def worker_for(side: str) -> Worker:
        if side not in workers:
            worker = workers[side] = Worker(script, side, args)
            ready = worker.ready
            found[side]["ready"] = found[side]["ready"] or ready
            warm = ", ".join(f"{c} {s:.1f} s" for c, s in ready["warmup_s"].items())
            log(f"  {side}: built in {ready['build_s']:.1f} s, baseline RSS {ready['baseline_rss'] / MB:.0f} MB"
                + (f"; warm-up {warm}" if warm else ""))
        return workers[side]

    def timed(number: int, side: str, call: str, condition: str) -> None:
        time.sleep(SETTLE_S)
        measured = worker_for(side).call(call)
        measured["load1"] = os.getloadavg()[0]
        found[side][condition][call].append(measured)
        log(f"  [{number + 1}/{repeat}]{' (contention)' if condition != 'quiet' else ''} {side} {call}: "
            f"{measured['wall_s']:.2f} s (cpu {measured['cpu_s']:.2f} s), peak RSS {measured['peak_rss'] / MB:.0f} MB")

    def extra(side: str, call: str, condition: str) -> None:
        time.sleep(SETTLE_S)
        answer = worker_for(side).call(call)
        found[side]["extra"][condition][call] = answer["extra"]
        log(f"  {side} {call}{' (contention)' if condition != 'quiet' else ''}: {answer['wall_s']:.2f} s")

    try:
        if one_at_a_time and side_after_side:  # one worker per side serves all its rounds
            for side in sides:
                worker_for(side)  # built before any contention starts
                for condition in conditions:
                    with contention(condition != "quiet", log):
                        for number in range(repeat):
                            for call in calls:
                                timed(number, side, call, condition)
                        for call in extra_calls or []:
                            extra(side, call, condition)
                workers.pop(side).close()
        else:
            for condition in conditions:
                if not one_at_a_time:
                    for side in sides:
                        worker_for(side)  # built (and warmed up) before any contention starts
                with contention(condition != "quiet", log):
                    for number in range(repeat):
                        if one_at_a_time:  # side by side, each worker rebuilt per round
                            for side in sides:
                                for call in calls:
                                    timed(number, side, call, condition)
                                workers.pop(side).close()
                        else:  # call by call, alternating the sides
                            for call in calls:
                                for side in sides:
                                    timed(number, side, call, condition)
                    for call in extra_calls or []:
                        for side in sides:
                            extra(side, call, condition)
                            if one_at_a_time:
                                workers.pop(side).close()
    finally:
        for worker in workers.values():
            worker.close()
    return found


def summarize(runs: list[dict], baseline: int) -> dict:
    walls = sorted(r["wall_s"] for r in runs)
    peak = max(r["peak_rss"] for r in runs)
    loads = [r["load1"] for r in runs if "load1" in r]
    return {"wall_s": statistics.median(walls), "wall_min_s": walls[0], "wall_max_s": walls[-1],
            "cpu_s": statistics.median(r["cpu_s"] for r in runs), "peak_rss": peak, "baseline_rss": baseline,
            "above_baseline": peak - baseline, "walls_s": [r["wall_s"] for r in runs], "runs": len(runs),
            **({"load1_min": min(loads), "load1_max": max(loads)} if loads else {})}


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table when rich is installed, else aligned plain text."""
    try:
        from rich.console import Console
        from rich.table import Table

        out = Table(title=title)
        for i, column in enumerate(columns):  # row labels unwrapped: the figures' columns wrap their headers
            out.add_column(column, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in rows:
            out.add_row(*row)
        # wide enough that no figure is cut short (headers may wrap, cells must not)
        needed = sum(max(max((len(r[i]) for r in rows), default=0), min(len(c), 10)) + 3 for i, c in enumerate(columns))
        Console(width=max(shutil.get_terminal_size((170, 24)).columns, 170, needed + 1)).print(out)
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
        for row in rows:
            print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    print(f"  {machine_line()}")


def _ratios(results: dict[str, dict], side: str, reference: str, call: str, condition: str,
            key: str) -> list[float]:
    """Per process run, MLX's `key` (median over that run's calls, or peak) over the reference's."""
    pairs = zip(results[side].get("process_runs", []), results[reference].get("process_runs", []))
    return [a[condition][call][key] / b[condition][call][key] for a, b in pairs if b[condition][call][key]]


def side_by_side(title: str, results: dict[str, dict], calls: dict[str, str], mlx: str | list[str] = "mlx",
                 reference: str = "torch") -> list[dict]:
    """One row per (MLX side, call, condition): MLX vs the reference, wall (median, range), ratio,
    peak RSS and RSS above baseline on each side, and their ratios. With several process runs the
    time ratio is the median of the per-run ratios (each run's median MLX time over its median
    reference time) with their range; the contention rows (when measured) follow the quiet ones.
    Returns the rows as dicts (for --json and `verdict`)."""
    rows, records = [], []
    sides = [mlx] if isinstance(mlx, str) else list(mlx)
    conditions = [c for c in CONDITIONS if c == "quiet" or c in results[reference]]
    processes = len(results[reference].get("process_runs", [])) or 1
    for condition in conditions:
        for side in sides:
            for call, label in calls.items():
                source = (lambda s: results[s] if condition == "quiet" else results[s][condition])
                a, b = source(side)["summary"][call], source(reference)["summary"][call]
                name = label if len(sides) == 1 else f"{label} [{side}]"
                name = name if condition == "quiet" else f"{name} [contention]"
                time_ratios = _ratios(results, side, reference, call, condition, "wall_s") or [a["wall_s"] / b["wall_s"]]
                peak_ratios = (_ratios(results, side, reference, call, condition, "peak_rss")
                               or [a["peak_rss"] / b["peak_rss"]])
                record = {"call": call, "side": side, "label": name, "condition": condition, "mlx": a, "reference": b,
                          "time_ratio": statistics.median(time_ratios), "time_ratios": time_ratios,
                          "peak_ratios": peak_ratios, "processes": processes,
                          "cpu_ratio": a["cpu_s"] / b["cpu_s"] if b["cpu_s"] else None,
                          "peak_ratio": a["peak_rss"] / b["peak_rss"],
                          "above_ratio": a["above_baseline"] / b["above_baseline"] if b["above_baseline"] > 0 else None}
                records.append(record)
                rows.append([name, f"{a['wall_s']:.2f}", f"{a['wall_min_s']:.2f}-{a['wall_max_s']:.2f}",
                             f"{b['wall_s']:.2f}", f"{b['wall_min_s']:.2f}-{b['wall_max_s']:.2f}",
                             f"{record['time_ratio']:.2f}", f"{min(time_ratios):.2f}-{max(time_ratios):.2f}",
                             "-" if record["cpu_ratio"] is None else f"{record['cpu_ratio']:.2f}",
                             f"{a['peak_rss'] / MB:.0f}", f"{b['peak_rss'] / MB:.0f}", f"{record['peak_ratio']:.2f}",
                             f"{a['above_baseline'] / MB:.0f}", f"{b['above_baseline'] / MB:.0f}",
                             "-" if record["above_ratio"] is None else f"{record['above_ratio']:.2f}"])
    table(title + (f"; {processes} process runs" if processes > 1 else ""),
          ["", "MLX s", "range", "torch s", "range", "time MLX/torch", "per-run range", "cpu MLX/torch",
           "MLX peak MB", "torch peak MB", "peak MLX/torch", "MLX above base MB", "torch above base MB",
           "above MLX/torch"], rows)
    loads = [v for r in records for s in (r["mlx"], r["reference"])
             for v in (s.get("load1_min"), s.get("load1_max")) if v is not None]
    if processes > 1:
        print(f"  MLX s / torch s: median and range of all {processes} runs' calls; time MLX/torch: median of the "
              "per-run ratios (each run in fresh workers), per-run range: their smallest and largest")
    if loads:
        print(f"  1-minute load average during the timed calls: {min(loads):.2f}-{max(loads):.2f}")
    return records


def verdict(records: list[dict], goal_time: float = 1.0, contention_goal: float = CONTENTION_GOAL) -> dict[str, bool]:
    """Print and return, per row, whether MLX met the goal in every process run: time ratio <= goal
    (`contention_goal` for the contention rows), peak RSS no higher."""
    met = {}
    for r in records:
        goal = contention_goal if r.get("condition") == "contention" else goal_time
        ratios, peaks = r.get("time_ratios", [r["time_ratio"]]), r.get("peak_ratios", [r["peak_ratio"]])
        time_ok = max(ratios) <= goal
        memory_ok = max(peaks) <= 1.0
        met[r["label"]] = time_ok and memory_ok
        every = f" in every one of {len(ratios)} runs" if len(ratios) > 1 else ""
        print(f"  {r['label']}: time {'met' if time_ok else 'NOT met'} (goal MLX/torch <= {goal}{every}; median "
              f"{r['time_ratio']:.2f}" + (f", runs {min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else "")
              + f"); peak RSS {'met' if memory_ok else 'NOT met'} (MLX/torch {r['peak_ratio']:.2f})")
    return met


def _meminfo(key: str) -> int | None:
    """A /proc/meminfo entry in bytes (None off Linux)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> int:
    """Bytes the kernel says are available for new allocations (MemAvailable)."""
    found = _meminfo("MemAvailable")
    if found is None:
        import psutil

        return psutil.virtual_memory().available
    return found


def total_memory() -> int:
    """The machine's RAM in bytes (MemTotal)."""
    found = _meminfo("MemTotal")
    if found is None:
        import psutil

        return psutil.virtual_memory().total
    return found


def write_json(path: Path | None, report: dict) -> None:
    if path:
        path.write_text(json.dumps(report, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# conversion routes: every run of every route in a fresh process of its own


def measure_route(out: Path, work: Callable[[], tuple[float | None, int]]) -> dict:
    """Child side: run one route's `work` (returns the perf_counter time its plan or load was done,
    None when it has neither, and the tensor count) in this fresh process, with the imports it needs already done: the
    baseline is taken now. Returns wall, CPU and plan/load seconds, peak RSS, RSS above baseline
    and the bytes written under `out`."""
    baseline, baseline_peak, cpu0 = rss_now(), peak_rss(), cpu_seconds()
    start = time.perf_counter()
    planned, tensors = work()
    wall = time.perf_counter() - start
    planned = start if planned is None else planned
    peak = peak_rss()
    written = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"wall_s": wall, "cpu_s": cpu_seconds() - cpu0, "load_or_plan_s": planned - start, "peak_rss": peak,
            "baseline_rss": baseline, "baseline_peak": baseline_peak, "above_baseline": peak - baseline,
            "tensors": tensors, "written_bytes": written}


def write_random_shards(folder: Path, shapes: dict[str, tuple[int, ...]], shards: int, stem: str,
                        config: dict[str, Any]) -> dict:
    """A release-style sharded safetensors checkpoint of random bfloat16 weights with these names
    and shapes (`<stem>-0000i-of-0000n.safetensors` + `<stem>.safetensors.index.json`), written
    shard by shard into a partial folder renamed at the end: nothing checkpoint-sized is ever
    resident. Returns (and writes as bench-info.json) its description."""
    import torch
    from safetensors.torch import save_file

    keys = sorted(shapes)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index in range(shards):
        name = f"{stem}-{index + 1:05d}-of-{shards:05d}.safetensors"
        state = {}
        for key in keys[index::shards]:
            shape = shapes[key]
            if len(shape) == 1:
                value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
            else:
                value = torch.randn(shape, generator=generator) / max(1, int(torch.tensor(shape[1:]).prod())) ** 0.5
            state[key] = value.to(torch.bfloat16)
            total += state[key].numel() * 2
            weight_map[key] = name
        save_file(state, str(partial / name), metadata={"format": "pt"})
        del state
    (partial / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    elements = {key: int(torch.tensor(shape).prod()) for key, shape in shapes.items()}
    largest = max(elements, key=elements.get)
    info = {"config": config, "tensors": len(shapes), "parameters": sum(elements.values()),
            "bytes": sum(f.stat().st_size for f in folder.iterdir()), "shards": shards, "largest_key": largest,
            "largest_shape": list(shapes[largest]), "largest_bytes": elements[largest] * 2,
            "largest_bytes_float32": elements[largest] * 4}
    (folder / "bench-info.json").write_text(json.dumps(info, indent=2))
    return info


def cached_checkpoint(script: str | Path, name: str, size: str, rebuild: bool = False,
                      timeout: float = 1800, args: list[str] | None = None) -> tuple[Path, dict]:
    """A conversion benchmark's checkpoint folder bench-output/NAME (built on first use by
    `script --build FOLDER --size SIZE [args]`, cached afterwards) and its description."""
    OUTPUT.mkdir(exist_ok=True)
    folder = OUTPUT / name
    info_file = folder / "bench-info.json"
    if rebuild or not info_file.exists():
        print(f"building {folder.relative_to(ROOT)} (once; cached afterwards) ...", flush=True)
        start = time.perf_counter()
        run_child(script, ["--build", str(folder), "--size", size, *(args or [])], timeout=timeout)
        print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return folder, json.loads(info_file.read_text())


def shards_route(route: str, folder: Path, out: Path, stem: str, plan: Callable[[Path], Any],
                 rename: Callable[[dict], dict]) -> dict:
    """Child side of a conversion benchmark over `stem`-named shards: `copy` the files, `vidport`
    (`plan(index)` then `convert`), or `naive` (load every shard, `rename` with diffusers' own
    converter, one `save_file`). The callers import what `plan` and `rename` need beforehand."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    index = folder / f"{stem}.safetensors.index.json"
    shards = sorted(folder.glob("*.safetensors"))
    from safetensors.torch import load_file, save_file

    from vidport.converter.convert import convert

    def work() -> tuple[float | None, int]:
        if route == "copy":
            out.mkdir(parents=True)
            for shard in shards:
                shutil.copyfile(shard, out / shard.name)
            return None, 0
        if route == "vidport":
            planned_conversion = plan(index)
            planned = time.perf_counter()
            return planned, convert(planned_conversion, out)["tensors"]
        state = {}
        for shard in shards:
            state.update(load_file(str(shard)))
        planned = time.perf_counter()
        state = rename(state)
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "diffusion_pytorch_model.safetensors"))
        return planned, len(state)

    return {"route": route, **measure_route(out, work)}


def run_child(script: str | Path, args: list[str], timeout: float = 900) -> dict:
    """Run `script args` in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_routes(script: str | Path, source: Path, routes: list[str], repeat: int) -> dict[str, dict]:
    """Parent side: each route `repeat` times (`script --route R SOURCE OUT`), the routes interleaved
    round by round so drift in the machine's load hits them alike; the output is removed after
    each run. Returns per route the median wall / CPU / plan-load seconds, the wall range and the
    largest peak RSS seen."""
    runs: dict[str, list[dict]] = {route: [] for route in routes}
    for number in range(repeat):
        for route in routes:
            out = OUTPUT / f"out-{Path(script).stem}-{route}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                result = run_child(script, ["--route", route, str(source), str(out)])
            finally:
                shutil.rmtree(out, ignore_errors=True)
            runs[route].append(result)
            print(f"  [{number + 1}/{repeat}] {route}: {result['wall_s']:.2f} s (cpu {result['cpu_s']:.2f} s), peak "
                  f"{result['peak_rss'] / MB:.0f} MB ({result['above_baseline'] / MB:+.0f} MB above baseline)", flush=True)
    summaries = {}
    for route, found in runs.items():
        walls = sorted(r["wall_s"] for r in found)
        worst = max(found, key=lambda r: r["peak_rss"])
        summaries[route] = {**worst, "wall_s": statistics.median(walls), "cpu_s": statistics.median(r["cpu_s"] for r in found),
                            "load_or_plan_s": statistics.median(r["load_or_plan_s"] for r in found),
                            "wall_min_s": walls[0], "wall_max_s": walls[-1], "walls_s": [r["wall_s"] for r in found],
                            "plans_s": [r["load_or_plan_s"] for r in found], "runs": len(found)}
    return summaries


def routes_table(title: str, results: dict[str, dict], descriptions: dict[str, str], load_note: str) -> None:
    """The routes side by side, with ratios to the naive route where it ran."""
    naive = results.get("naive")
    rows = []
    for route, r in results.items():
        ratio = (lambda key: f"{r[key] / naive[key]:.2f}" if naive and naive[key] else "-")
        rows.append([route, f"{r['wall_s']:.2f}", f"{r['wall_min_s']:.2f}-{r['wall_max_s']:.2f}", f"{r['cpu_s']:.2f}",
                     f"{r['load_or_plan_s']:.2f}", f"{r['peak_rss'] / MB:.0f}", f"{r['baseline_rss'] / MB:.0f}",
                     f"{r['above_baseline'] / MB:.0f}", ratio("wall_s"), ratio("peak_rss"), ratio("above_baseline"),
                     f"{r['written_bytes'] / MB:.0f}"])
    print()
    for route in results:
        print(f"  {route}: {descriptions[route]}")
    print("  wall s: median of the runs (range: fastest-slowest); cpu s: user + system CPU time (median)")
    print(f"  plan/load s: {load_note}")
    table(title, ["route", "wall s", "range s", "cpu s", "plan/load s", "peak RSS MB", "baseline MB",
                  "above baseline MB", "wall / naive", "peak / naive", "above / naive", "written MB"], rows)


def routes_verdict(results: dict[str, dict], bound: int, bound_text: str) -> dict[str, bool]:
    """Print and return, per vidport route, whether its RSS above baseline stayed within `bound`
    bytes and its wall time within the naive route's."""
    naive = results.get("naive")
    verdict = {}
    print(f"target: peak RSS above baseline at most {bound_text} ({bound / MB:.0f} MB), wall time no worse than "
          "the naive route")
    for route in (r for r in results if r.startswith("vidport")):
        r = results[route]
        memory_ok = r["above_baseline"] <= bound
        time_ok = naive is None or r["wall_s"] <= naive["wall_s"]
        verdict[route] = memory_ok and time_ok
        print(f"  {route}: memory {'met' if memory_ok else 'NOT met'} ({r['above_baseline'] / MB:.0f} MB above "
              "baseline); time " + ("n/a (naive not run)" if naive is None else
                                    f"{'met' if time_ok else 'NOT met'} ({r['wall_s']:.2f} s vs {naive['wall_s']:.2f} s)"))
    return verdict


def worker_main(argv: list[str] | None, doc: str, quick_help: str, sizes: dict, setups: dict[str, Callable],
                run: Callable[[bool, int, bool], dict]) -> dict:
    """The command line the MLX-vs-diffusers benchmarks share: the parent's options, and the worker
    mode (`--worker SIDE`) that serves one side's calls (bench/_common.serve)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per side (median reported)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one call per side by op category (conv, attention, norms, linear)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    add_measure_options(parser)
    parser.add_argument("--worker", choices=list(setups), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(sizes), default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        serve(lambda: setups[args.worker](args.size))
        return {}
    with measuring(args.processes, args.contention):
        report = run(args.quick, args.repeat, args.profile)
    write_json(args.json, report)
    return report


def conversion_main(argv: list[str] | None, doc: str, routes: dict[str, str], sizes: dict, quick_help: str,
                    build_child: Callable[[Path, str], dict], child: Callable[..., dict],
                    run: Callable[..., dict], options: dict[str, dict] | None = None) -> dict:
    """The command line the conversion benchmarks share: the parent's options (plus a benchmark's
    own `options`, flag -> argparse arguments, passed to `run` by name), and the two child modes
    (`--build` the cached checkpoint, `--route` one run) that print one JSON line."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeat", type=int, default=3, help="runs per route (the median wall time is reported)")
    parser.add_argument("--routes", nargs="+", choices=list(routes), help="routes to run (default: all)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoint")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--route", choices=list(routes), help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(sizes), default="full", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    for flag, arguments in (options or {}).items():
        parser.add_argument(flag, **arguments)
    args = parser.parse_args(argv)
    if args.build:
        print(json.dumps(build_child(args.build, args.size)))
        return {}
    if args.route:
        print(json.dumps(child(args.route, *args.paths)))
        return {}
    extra = {flag.lstrip("-").replace("-", "_"): None for flag in options or {}}
    report = run(args.quick, args.repeat, args.routes, args.rebuild, **{k: getattr(args, k) for k in extra})
    write_json(args.json, report)
    return report


if __name__ == "__main__" and sys.argv[1:] == ["--busy"]:
    busy()
