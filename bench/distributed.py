"""The Wan DiT across processes (issue 15): one denoising step under each parallel plan (cfg,
sequence, tensor; runtime.parallel_wan) on 2 processes over MLX's ring backend against 1 process,
with every collective counted, then the step time of Wan 14B and LTX-2 19B on 2, 4 and 8 machines
(and 3 for LTX-2's cfg) over 10 GbE and Thunderbolt 5, projected from what was measured.

What is measured (this machine, float32, random weights, the real Wan 2.1 T2V 1.3B configuration:
dim 1536, 12 heads x 128, 30 layers, FFN 8960, text dim 4096):

- a step as the pipeline takes it: `plan.predict` with guidance (the conditional and the
  unconditional pass; under cfg one pass on each rank), on 5 frames at 240x416 (780 tokens) with
  512 text tokens. Each process holds `--layers` of the 30 blocks (default 10: a float32 1.3B process
  holds 5.7 GB, and two of them beside the other work on this 24 GB machine is more than the bench
  should take); the step of all 30 is projected linearly in blocks: non-block part (the same step
  with the blocks removed, timed on its own) + blocks x 30 / layers. `--layers 30` measures it whole.
- the wall time of a step (the slowest rank's), median of `--repeat` steps after a warm-up, with the
  range; the 2-rank runs start each step on a barrier.
- each rank's compute: the same steps with `mx.distributed.all_sum` / `all_gather` replaced by local
  stand-ins of the same shapes (identity; the local part repeated N times), so the rank computes
  exactly what it does in the real step without waiting or sending; its wall time and its CPU
  time; real and local steps alternate. Wall - compute is what the collectives cost here
  (transfer over loopback TCP plus waiting for the slower rank). The plan factor (per-rank compute per FLOP over one process's) is taken
  from CPU time: other work time-slices this machine's cores, which wall time counts and CPU time
  (one BLAS thread, no spinning) mostly does not.
- the traffic: `mx.distributed.all_sum` / `all_gather` wrapped, each call's shape and dtype
  recorded while the step's graph is built (one step; the barrier is not counted). Per rank the
  bytes it sends under the ring algorithms: all_gather of a local part of B bytes sends (N-1) B;
  all_sum of B bytes sends 2 (N-1)/N B (reduce-scatter + all-gather). The count is checked against
  the formula from shapes (`wan_collectives`) that the projection uses.

Processes: 1 process with 2 BLAS threads (this machine's two cores) and with 1 thread (the resources
of one rank), and each plan on 2 ranks of 1 thread each over the ring backend on free local ports,
each rank given the environment `mlx.launch -n 2 --backend ring` gives it, but started by the bench:
mlx.launch 0.32.4 keeps most of a core busy while its ranks run (see `launch_run`). Other work
shares this machine: the load average is printed with every run.

The projection (printed with its assumptions): per-rank FLOPs from shapes (linears, attention,
patch embedding; elementwise work left out) at a reference machine's achieved FLOP rate, times
the plan's measured per-FLOP cost relative to one process (its "plan factor"); communication from
the collectives' bytes (bfloat16 activations, float32 norm sums) over a link of bandwidth BW with a
latency per ring step; no overlap of compute and communication. LTX-2's rows follow
runtime.parallel_ltx2 (its dev recipe's 3 passes a step; cfg over 2-3 ranks, tensor, sequence) with
Wan's plan factors (`ltx2_collectives`).

    .venv/bin/python bench/distributed.py            # 10 of 30 blocks, 780 tokens, 3 steps per run
    .venv/bin/python bench/distributed.py --layers 30 --repeat 5
    .venv/bin/python bench/distributed.py --quick    # 2 blocks, 112 tokens, 2 steps: a smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from ltx2_convert import LTX2_19B  # noqa: E402
from wan_forward import WAN_1_3B  # noqa: E402

MB = common.MB  # memory in MiB, as the other benchmarks
MB_, GB_ = 1e6, 1e9  # traffic and parameter bytes in decimal units, as link speeds
# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json: 40 heads x 128 = 5120, FFN 13824, 40 layers
WAN_14B = {**WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
SIZES = {
    "full": {"layers": 10, "frames": 5, "height": 240, "width": 416, "text_tokens": 512, "dit": {}},
    "quick": {"layers": 2, "frames": 1, "height": 128, "width": 224, "text_tokens": 512, "dit": {}},
    # tests/test_distributed_traffic.py: a DiT small enough to launch in seconds
    "tiny": {"layers": 2, "frames": 1, "height": 32, "width": 64, "text_tokens": 16,
             "dit": {"num_attention_heads": 4, "attention_head_dim": 12, "ffn_dim": 96, "text_dim": 24}},
}
GUIDANCE = 5.0  # Wan's default; any value > 1 runs both passes
RUNS = [  # (label, plan, processes, BLAS threads per process)
    ("1 proc, 2 threads", None, 1, 2),
    ("1 proc, 1 thread", None, 1, 1),
    ("cfg, 2 ranks", "cfg", 2, 1),
    ("sequence, 2 ranks", "sequence", 2, 1),
    ("tensor, 2 ranks", "tensor", 2, 1),
]
PLANS = ("cfg", "sequence", "tensor")
MACHINES = (2, 3, 4, 8)  # 3: LTX-2's cfg plan only (one pass a rank)
BF16, F32 = 2, 4


# ---------------------------------------------------------------------------------------------
# shapes: tokens, collectives, FLOPs


def wan_tokens(frames: int, height: int, width: int) -> int:
    """Patch tokens of a Wan clip: VAE 4x8x8, patch 1x2x2."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


@dataclass(frozen=True)
class Collective:
    """`calls` collectives over `n` ranks, each on a local array of `elements` x `itemsize` bytes."""

    op: str  # all_sum | all_gather
    elements: int
    itemsize: int
    calls: int = 1

    def sent(self, n: int) -> float:
        """Bytes one rank sends, ring algorithms."""
        local = self.elements * self.itemsize * self.calls
        return (n - 1) * local if self.op == "all_gather" else 2 * (n - 1) / n * local

    def steps(self, n: int) -> int:
        """Ring steps (each pays the link latency once)."""
        return self.calls * ((n - 1) if self.op == "all_gather" else 2 * (n - 1))


def wan_collectives(config: dict, tokens: int, text_tokens: int, plan: str, n: int, itemsize: int,
                    passes: int = 2) -> list[Collective]:
    """Every collective of one guided step under `plan` on `n` ranks, from shapes, as
    runtime.parallel_wan issues them (activations of `itemsize` bytes; the tensor plan's RMS-norm
    sums of squares are float32 whatever the model's dtype)."""
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    patch = config["out_channels"] * 4  # patch 1x2x2
    if plan == "cfg":  # each rank's prediction, gathered once
        return [Collective("all_gather", tokens * patch, itemsize)]
    if plan == "sequence":  # per self-attention K and V of the rank's tokens; the output tokens at the end
        share = tokens // n
        return [Collective("all_gather", share * inner, itemsize, 2 * layers * passes),
                Collective("all_gather", share * patch, itemsize, passes)]
    # tensor: attn1, attn2 and FFN outputs summed; q/k RMS norms across heads: one value per token
    return [Collective("all_sum", tokens * inner, itemsize, 3 * layers * passes),
            Collective("all_sum", tokens, F32, 3 * layers * passes),
            Collective("all_sum", text_tokens, F32, layers * passes)]


def ltx2_collectives(config: dict, video: int, audio: int, text: int, plan: str, n: int, itemsize: int,
                     passes: int = 3) -> list[Collective]:
    """LTX-2's collectives of one step, as runtime.parallel_ltx2 issues them: cfg deals the passes
    round-robin and gathers ceil(passes / N) rows of both streams' predictions from every rank;
    tensor sums the output of every attention and feed-forward of both streams and the q/k RMS
    norms across heads; sequence splits the video tokens (the audio stream, 84 tokens for 81
    frames, whole on every rank) and gathers K/V for video self-attention and, at the audio heads'
    width, for video-to-audio attention."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    audio_dim = config["audio_num_attention_heads"] * config["audio_attention_head_dim"]
    layers = config["num_layers"]
    if plan == "cfg":
        values = video * config["out_channels"] + audio * config["audio_out_channels"]
        return [Collective("all_gather", math.ceil(passes / n) * values, itemsize)]
    if plan == "sequence":
        share = video // n
        return [Collective("all_gather", share * dim, itemsize, 2 * layers * passes),
                Collective("all_gather", share * audio_dim, itemsize, 2 * layers * passes),
                Collective("all_gather", share * config["out_channels"], itemsize, passes)]
    # per block: video attn1, attn2, audio-to-video, FF; audio attn1, attn2, video-to-audio, FF; the
    # norms of q and k over: video tokens (attn1 q k, attn2 q, a2v q, v2a k), audio tokens (audio attn1
    # q k, audio attn2 q, v2a q, a2v k), text tokens (both attn2 k)
    return [Collective("all_sum", video * dim, itemsize, 4 * layers * passes),
            Collective("all_sum", audio * audio_dim, itemsize, 4 * layers * passes),
            Collective("all_sum", video, F32, 5 * layers * passes),
            Collective("all_sum", audio, F32, 5 * layers * passes),
            Collective("all_sum", text, F32, 2 * layers * passes)]


@dataclass(frozen=True)
class Flops:
    """Multiply-adds x 2 of one pass, by how the plans divide them: `tokens` (split by the sequence
    plan: work per own token or per own query), `whole` (repeated on every rank under sequence);
    `block_*` are inside the DiT blocks (split by the tensor plan), `outer_*` outside (repeated)."""

    block_tokens: float
    block_whole: float
    outer_tokens: float
    outer_whole: float

    def per_rank(self, plan: str | None, n: int, passes: int = 2) -> float:
        """FLOPs of one rank's share of a step of `passes` passes (cfg: the passes dealt round-robin)."""
        one = self.block_tokens + self.block_whole + self.outer_tokens + self.outer_whole
        if plan is None:
            return passes * one
        if plan == "cfg":
            return math.ceil(passes / n) * one
        if plan == "sequence":
            return passes * ((self.block_tokens + self.outer_tokens) / n + self.block_whole + self.outer_whole)
        return passes * ((self.block_tokens + self.block_whole) / n + self.outer_tokens + self.outer_whole)


def wan_flops(config: dict, tokens: int, text_tokens: int) -> Flops:
    """One Wan DiT pass. The sequence plan patch-embeds every token on every rank (then keeps its
    share) and projects the whole text context for cross-attention on every rank."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    t, c, layers = tokens, text_tokens, config["num_layers"]
    own = 8 * t * d * d + 4 * t * t * d + 4 * t * d * d + 4 * t * c * d + 4 * t * d * config["ffn_dim"]
    whole = 4 * c * d * d  # cross-attention k, v of the text
    patch = config["in_channels"] * 4
    return Flops(block_tokens=layers * own, block_whole=layers * whole,
                 outer_tokens=2 * t * d * config["out_channels"] * 4,
                 outer_whole=2 * t * patch * d + 2 * c * (config["text_dim"] * d + d * d))


def ltx2_flops(config: dict, video: int, audio: int, text: int) -> Flops:
    """One LTX-2 DiT pass (video attn1, attn2, audio-to-video, FF; audio attn1, attn2,
    video-to-audio, FF), divided as `ltx2_collectives` describes: under sequence the video tokens'
    work splits, the audio stream's and the text K/V stay whole, and the audio queries still attend
    to every video key."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    da = config["audio_num_attention_heads"] * config["audio_attention_head_dim"]
    cross = da  # both cross-modal attentions run at the audio heads' width
    v, a, c, layers = video, audio, text, config["num_layers"]
    video_own = (8 * v * d * d + 4 * v * v * d + 4 * v * d * d + 4 * v * c * d + 4 * v * d * cross
                 + 4 * v * a * cross + 4 * v * d * 4 * d + 4 * v * d * cross)  # ... + v2a's video k, v
    whole = (4 * c * d * d + 4 * a * da * cross  # text k, v; a2v's audio k, v
             + 8 * a * da * da + 4 * a * a * da + 4 * a * da * da + 4 * c * da * da + 4 * a * c * da
             + 4 * a * da * cross + 4 * a * v * cross + 4 * a * da * 4 * da)
    channels, caption = config["in_channels"], config["caption_channels"]
    return Flops(block_tokens=layers * video_own, block_whole=layers * whole,
                 outer_tokens=4 * v * channels * d,
                 outer_whole=4 * a * config["audio_in_channels"] * da + 2 * c * (caption * d + d * d)
                 + 2 * c * (caption * da + da * da))


# ---------------------------------------------------------------------------------------------
# rank worker (one process of a run)


class Collectives:
    """`mx.distributed.all_sum` / `all_gather` wrapped: each call's op, shape and itemsize is
    recorded while `recording`; with `local` the call is replaced by a stand-in of the same shape
    computed on this rank alone (all_sum: the array itself; all_gather: it repeated N times)."""

    def __init__(self) -> None:
        import mlx.core as mx

        self.mx = mx
        self.all_sum, self.all_gather = mx.distributed.all_sum, mx.distributed.all_gather
        self.calls: list[dict] = []
        self.recording = False
        self.local = False
        mx.distributed.all_sum, mx.distributed.all_gather = self._sum, self._gather

    def _record(self, op: str, x: Any, group: Any) -> None:
        if self.recording:
            self.calls.append({"op": op, "shape": list(x.shape), "itemsize": x.itemsize, "ranks": group.size()})

    def _sum(self, x: Any, *, group: Any = None, stream: Any = None) -> Any:
        self._record("all_sum", x, group)
        return x if self.local else self.all_sum(x, group=group, stream=stream)

    def _gather(self, x: Any, *, group: Any = None, stream: Any = None) -> Any:
        self._record("all_gather", x, group)
        if self.local:
            return self.mx.concatenate([x] * group.size(), axis=0)
        return self.all_gather(x, group=group, stream=stream)

    def barrier(self, world: Any) -> None:
        if world.size > 1:
            self.mx.eval(self.all_sum(self.mx.array(1.0), group=world.group))


def _build(plan: str | None, config: dict, world: Any) -> Any:
    """The DiT as `plan` holds it on this rank (runtime.parallel_wan's plan loaders, with random
    weights instead of a folder): seeded alike on every rank, so the shards are one model's."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vidport.runtime.parallel_wan import GuardedBlock, SequenceParallelDiT, shard_block
    from vidport.runtime.wan_dit import WanTransformer3DModel

    mx.random.seed(0)
    dit = WanTransformer3DModel.from_config(config)
    if plan == "tensor":
        for block in dit.blocks:
            shard_block(block, world)
        for _, value in tree_flatten(dit.parameters()):  # one whole tensor at a time, as TensorPlan.load
            mx.eval(value)
        return GuardedBlock.wrap(dit, world)
    mx.eval(dit.parameters())
    return SequenceParallelDiT(dit, world) if plan == "sequence" else dit


def _timed(step: Callable[[], None], collectives: Collectives, world: Any, repeat: int) -> dict[str, list[dict]]:
    """`repeat` rounds of a real step (started on a barrier) then the same step with the collectives
    local: alternating, so drift in the machine's load hits both alike."""
    runs: dict[str, list[dict]] = {"real": [], "local": []}
    for _ in range(repeat):
        for mode in runs:
            collectives.local = mode == "local"
            collectives.barrier(world)
            cpu0, t0 = common.cpu_seconds(), time.perf_counter()
            step()
            runs[mode].append({"wall_s": time.perf_counter() - t0, "cpu_s": common.cpu_seconds() - cpu0})
    collectives.local = False
    return runs


def rank_main(plan: str | None, size: str, layers: int, repeat: int, out: Path, count_only: bool) -> None:
    """One process of a run: build, run the counted warm-up step, time `repeat` rounds of a real and
    a local step (and the same without the blocks, when some were left out), write this rank's JSON
    into `out`."""
    load_start = os.getloadavg()
    common.start_mlx()
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from vidport.runtime.distributed import world as get_world
    from vidport.runtime.parallel_wan import wan_plan

    collectives = Collectives()
    world = get_world()
    s = SIZES[size]
    config = {**WAN_1_3B, **s["dit"], "num_layers": layers}
    tokens = wan_tokens(s["frames"], s["height"], s["width"])
    runner = wan_plan(plan, world)
    runner.check([config], tokens, True)
    model = _build(plan, config, world)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))

    rng = np.random.default_rng(0)
    f, h, w = (s["frames"] - 1) // 4 + 1, s["height"] // 8, s["width"] // 8
    latents = mx.array(rng.standard_normal((1, f, h, w, config["in_channels"]), dtype=np.float32))
    text = [mx.array(rng.standard_normal((1, s["text_tokens"], config["text_dim"]), dtype=np.float32))
            for _ in range(2)]
    timestep = mx.array([500.0])
    mx.eval(latents, *text)

    def step() -> None:
        prediction = runner.predict(model, latents, timestep, text[0], text[1], None, GUIDANCE)
        world.evaluate(prediction, what="the step")

    dit = model.dit if plan == "sequence" else model
    report: dict[str, Any] = {"rank": world.rank, "ranks": world.size, "plan": plan, "size": size, "layers": layers,
                              "tokens": tokens, "text_tokens": s["text_tokens"], "config": config,
                              "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "weight_bytes": weights,
                              "load_start": load_start}
    collectives.recording = True
    step()  # the warm-up step is the counted one
    collectives.recording = False
    report["collectives"] = collectives.calls
    if not count_only:
        report.update(_timed(step, collectives, world, repeat))
        if layers < WAN_1_3B["num_layers"]:
            blocks, dit.blocks = dit.blocks, []
            step()
            report.update({f"outer_{mode}": runs for mode, runs in _timed(step, collectives, world, repeat).items()})
            dit.blocks = blocks
        collectives.barrier(world)
    report["peak_rss"] = common.peak_rss()
    report["load_end"] = os.getloadavg()
    (out / f"rank{world.rank}.json").write_text(json.dumps(report))


# ---------------------------------------------------------------------------------------------
# parent: the runs


def launch_run(plan: str | None, processes: int, threads: int, size: str, layers: int, repeat: int,
               count_only: bool = False) -> list[dict]:
    """One run: 1 process, or `processes` ranks of the ring backend on this machine, each given the
    environment `mlx.launch -n N --backend ring` gives it (MLX_RANK, MLX_HOSTFILE) but started here:
    mlx.launch 0.32.4 itself keeps most of a core busy while its ranks run (each rank's relay thread
    select()s on the rank's stdin pipe, always writable, so it never sleeps; measured: 36 s of CPU
    in a 45 s run), which on this 2-core machine would be taken from the ranks. Each rank's report."""
    from vidport.runtime.distributed import free_ports

    with tempfile.TemporaryDirectory(prefix="vidport-bench-distributed-") as folder:
        argv = ["--rank-worker", "--plan", plan or "none", "--size", size, "--layers", str(layers),
                "--repeat", str(repeat), "--out", folder] + (["--count-only"] if count_only else [])
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads)}
        if processes > 1:
            hosts = Path(folder) / "hosts.json"
            base = free_ports(processes)
            hosts.write_text(json.dumps([[f"127.0.0.1:{base + rank}"] for rank in range(processes)]))
            env["MLX_HOSTFILE"] = str(hosts)
        logs = [tempfile.TemporaryFile(mode="w+") for _ in range(processes)]
        ranks = [subprocess.Popen([sys.executable, __file__, *argv], cwd=common.ROOT, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=log,
                                  env={**env, "MLX_RANK": str(rank)} if processes > 1 else env)
                 for rank, log in enumerate(logs)]
        try:
            while any(r.poll() is None for r in ranks) and all(r.poll() in (None, 0) for r in ranks):
                time.sleep(0.5)
        finally:
            for r in ranks:  # one rank failed: the others would wait on it (until the watchdog)
                if r.poll() is None:
                    r.kill()
                r.wait()
        reports = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank*.json"))]
        failed = [rank for rank, r in enumerate(ranks) if r.returncode != 0]
        if failed or len(reports) != processes:
            log = logs[failed[0] if failed else 0]
            log.seek(0)
            raise RuntimeError(f"run plan={plan} on {processes} process(es) failed (ranks {failed}):\n"
                               f"{log.read()[-4000:]}")
        return reports


def projected(runs: list[dict], outer: list[dict] | None, layers: int, key: str = "wall_s") -> list[float]:
    """Per run, the step of all 30 blocks: non-block median + (step - non-block) x 30 / layers."""
    values = [r[key] for r in runs]
    if outer is None:
        return values
    base = statistics.median(r[key] for r in outer)
    return [base + (v - base) * WAN_1_3B["num_layers"] / layers for v in values]


def slowest(reports: list[dict], runs: str, key: str, layers: int) -> dict:
    """Per step, the slowest rank's figure (projected to 30 blocks); median and range over steps."""
    per_rank = [projected(r[runs], r.get(f"outer_{runs}"), layers, key) for r in reports]
    return stats([max(values) for values in zip(*per_rank)])


def summarize_run(reports: list[dict], layers: int) -> dict:
    """Step wall, per-rank compute (wall and CPU time, the slowest rank's), traffic per rank."""
    calls = reports[0]["collectives"]
    n = reports[0]["ranks"]
    sent = sum(Collective(c["op"], _size(c["shape"]), c["itemsize"]).sent(n) for c in calls)
    return {"wall": slowest(reports, "real", "wall_s", layers), "compute": slowest(reports, "local", "wall_s", layers),
            "compute_cpu": slowest(reports, "local", "cpu_s", layers), "sent": sent,
            "collectives": len(calls), "peak_rss": max(r["peak_rss"] for r in reports),
            "weight_bytes": max(r["weight_bytes"] for r in reports), "counted": counted(calls),
            "measured_layers": [r["real"] for r in reports]}


def _size(shape: list[int]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def counted(calls: list[dict]) -> dict[str, int]:
    """(op, elements, itemsize) -> calls, as wan_collectives lists them."""
    found: dict[str, int] = {}
    for c in calls:
        key = f"{c['op']} {_size(c['shape'])} x {c['itemsize']} B"
        found[key] = found.get(key, 0) + 1
    return found


def expected(collectives: list[Collective]) -> dict[str, int]:
    found: dict[str, int] = {}
    for c in collectives:
        key = f"{c.op} {c.elements} x {c.itemsize} B"
        found[key] = found.get(key, 0) + c.calls
    return found


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _range(s: dict) -> str:
    return f"{s['min']:.2f}-{s['max']:.2f}"


def measure(size: str, layers: int, repeat: int) -> dict:
    s = SIZES[size]
    tokens = wan_tokens(s["frames"], s["height"], s["width"])
    print(f"Wan 2.1 1.3B DiT, one guided step (2 passes), float32, random weights: {s['frames']} frames at "
          f"{s['height']}x{s['width']} = {tokens} tokens, {s['text_tokens']} text tokens; {layers} of 30 blocks held"
          + (", steps projected to 30 blocks" if layers < 30 else ""), flush=True)
    print(f"  this machine: {os.cpu_count()} cores, {common.total_memory() / common.GB:.0f} GiB RAM, "
          f"{common.available_memory() / common.GB:.1f} GiB available", flush=True)
    results = {}
    for label, plan, processes, threads in RUNS:
        load = os.getloadavg()
        start = time.perf_counter()
        reports = launch_run(plan, processes, threads, size, layers, repeat)
        results[label] = summarize_run(reports, layers)
        results[label].update({"plan": plan, "processes": processes, "threads": threads, "load_before": load})
        r = results[label]
        print(f"  {label}: step {r['wall']['median']:.2f} s ({_range(r['wall'])}), compute/rank "
              f"{r['compute']['median']:.2f} s, {r['collectives']} collectives, {r['sent'] / MB:.1f} MB sent/rank; "
              f"load {load[0]:.2f}; {time.perf_counter() - start:.0f} s", flush=True)
    return {"size": size, "layers": layers, "repeat": repeat, "tokens": tokens, "text_tokens": s["text_tokens"],
            "runs": results}


def measured_table(measured: dict) -> tuple[dict[str, float], float]:
    """The measured runs side by side. Returns each plan's factor (its per-rank compute CPU time per
    FLOP over the 1-thread process's) and that process's FLOP rate (CPU time)."""
    runs, tokens, text, layers = measured["runs"], measured["tokens"], measured["text_tokens"], measured["layers"]
    config = dict(WAN_1_3B)
    flops = wan_flops(config, tokens, text)
    single2, single1 = runs[RUNS[0][0]], runs[RUNS[1][0]]
    rate = flops.per_rank(None, 1) / single1["compute_cpu"]["median"]
    factors, times, work = {}, [], []
    for label, plan, processes, threads in RUNS:
        r = runs[label]
        share = flops.per_rank(plan, processes) / flops.per_rank(None, 1)
        factor = r["compute_cpu"]["median"] / share / single1["compute_cpu"]["median"]
        check = "-"
        if plan:
            factors[plan] = factor
            want = expected(wan_collectives({**config, "num_layers": layers}, tokens, text, plan, processes, F32))
            r["formula_matches"] = want == r["counted"]
            check = "yes" if r["formula_matches"] else f"NO: counted {r['counted']}, formula {want}"
        comm = r["wall"]["median"] - r["compute"]["median"]
        times.append([label, f"{r['wall']['median']:.2f}", _range(r["wall"]),
                      f"{r['wall']['median'] / single2['wall']['median']:.2f}",
                      f"{r['wall']['median'] / single1['wall']['median']:.2f}", f"{r['compute']['median']:.2f}",
                      _range(r["compute"]), f"{r['compute_cpu']['median']:.2f}", f"{comm:.2f}" if plan else "-"])
        work.append([label, f"{share:.2f}", f"{factor:.2f}" if plan or threads == 1 else "-", str(r["collectives"]), _bytes(r["sent"]), check,
                     f"{r['weight_bytes'] / MB:.0f}", f"{r['peak_rss'] / MB:.0f}"])
    note = f"{layers} of 30 blocks held, projected to 30" if layers < 30 else "all 30 blocks"
    common.table(f"Wan 2.1 1.3B, one guided step, float32, {tokens} tokens ({note}): seconds, median of "
                 f"{measured['repeat']} steps",
                 ["run", "step s", "range", "/ 1 proc 2 thr", "/ 1 proc 1 thr", "compute/rank s", "range",
                  "compute CPU s", "comm + wait s"], times)
    common.table(f"The same runs: work and traffic per rank ({layers} blocks counted)",
                 ["run", "FLOPs/rank share", "plan factor", "collectives", "sent/rank", "counted = formula",
                  "weights MiB", "peak RSS MiB"], work)
    print("  step: the slowest rank's, each step started on a barrier; compute/rank: the slowest rank's step with "
          "the collectives replaced by local stand-ins (wall, and its CPU time); comm + wait: step - compute "
          "(loopback TCP, both ranks sharing this machine's 2 cores)")
    print(f"  FLOPs/rank share: per-rank FLOPs from shapes / one process's; plan factor: per-rank compute CPU time / "
          f"(share x the 1-thread process's): 1.00 = the plan splits the work without overhead. CPU time, not wall: "
          f"other work time-slices these cores, which wall time counts. The 1-thread process ran "
          f"{rate / 1e9:.0f} GFLOP/s")
    per_step = ", ".join(f"{p} {_bytes(sum(c.sent(2) for c in wan_collectives(config, tokens, text, p, 2, F32)))}"
                         for p in PLANS)
    print(f"  sent/rank per step at all 30 blocks (formula, checked against the count above): {per_step}")
    return factors, rate


# ---------------------------------------------------------------------------------------------
# projection


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per rank, effective
    latency: float  # s per ring step


LINKS = (
    Link("10 GbE", 1.1e9, 50e-6),
    Link("TB5", 8.0e9, 10e-6),
)
# M3 Ultra (80-core GPU): twice the 40-core M3 Max's 14.32 TFLOPS FP32 peak (5120 ALUs x 2 x 1.398 GHz,
# hmc-tech.com's spec sheet), which Apple's GPUs also run bfloat16 at; half of that peak assumed reached.
REFERENCE_TFLOPS = 14.3
TARGETS = {  # (frames, height, width) per size; LTX-2 needs multiples of 32: its "720p" is 704x1280
    "Wan 14B": {"480p": (81, 480, 832), "720p": (81, 720, 1280)},
    "LTX-2 19B": {"480p": (81, 480, 832), "720p": (81, 704, 1280)},
}
LTX2_TEXT, WAN_TEXT, LTX2_FPS = 1024, 512, 24.0
# passes a step: Wan's CFG pair; LTX-2.0's dev recipe: conditional, unconditional, modality-isolated
# (runtime.pipelines.ltx2_denoise.pass_names; STG adds a fourth on LTX-2.3 only)
WAN_PASSES, LTX2_PASSES = 2, 3


def _ltx2_config() -> dict:
    from fixtures.ltx2_dit import ltx2_config

    return ltx2_config("2.0", **LTX2_19B)


def parameters(model: str) -> tuple[int, int]:
    """(block, other) parameter counts of the real model, built lazily (nothing allocated)."""
    from mlx.utils import tree_flatten

    if model == "Wan 14B":
        from vidport.runtime.wan_dit import WanTransformer3DModel

        net = WanTransformer3DModel.from_config(WAN_14B)
        prefix = "blocks."
    else:
        from vidport.runtime.ltx2.dit import LTX2VideoTransformer3DModel

        net = LTX2VideoTransformer3DModel.from_config(_ltx2_config())
        prefix = "transformer_blocks."
    sizes = [(k, v.size) for k, v in tree_flatten(net.parameters())]
    blocks = sum(s for k, s in sizes if k.startswith(prefix))
    return blocks, sum(s for _, s in sizes) - blocks


def target(model: str, size: str) -> dict:
    """A target's shapes, FLOPs and collectives per plan and machine count."""
    frames, height, width = TARGETS[model][size]
    if model == "Wan 14B":
        tokens = wan_tokens(frames, height, width)
        heads = {"num_attention_heads": WAN_14B["num_attention_heads"], "ffn_dim": WAN_14B["ffn_dim"]}
        flops = wan_flops(WAN_14B, tokens, WAN_TEXT)
        return {"tokens": tokens, "label": f"{width}x{height}, {frames} frames: {tokens} tokens", "flops": flops,
                "passes": WAN_PASSES,
                "divides": heads, "collectives": lambda plan, n: wan_collectives(WAN_14B, tokens, WAN_TEXT, plan, n,
                                                                                  BF16)}
    config = _ltx2_config()
    video = ((frames - 1) // 8 + 1) * (height // 32) * (width // 32)
    audio = round(frames / LTX2_FPS * 16000 / 160 / 4)  # runtime.pipelines.ltx2_latents.audio_latent_frames
    divides = {"num_attention_heads": config["num_attention_heads"],
               "audio_num_attention_heads": config["audio_num_attention_heads"]}
    return {"tokens": video, "label": f"{width}x{height}, {frames} frames: {video} video + {audio} audio tokens",
            "flops": ltx2_flops(config, video, audio, LTX2_TEXT), "divides": divides, "passes": LTX2_PASSES,
            "collectives": lambda plan, n: ltx2_collectives(config, video, audio, LTX2_TEXT, plan, n, BF16,
                                                            LTX2_PASSES)}


def refusal(plan: str, n: int, found: dict) -> str | None:
    """Why `plan` cannot run on `n` machines (the runtime's rules), or None."""
    if plan == "cfg":
        return None if n <= found["passes"] else f"cfg: {found['passes']} passes, {n} ranks"
    if plan == "sequence":
        return None if found["tokens"] % n == 0 else f"{found['tokens']} tokens do not split into {n}"
    bad = [k for k, v in found["divides"].items() if v % n]
    return f"{', '.join(bad)} do not split into {n}" if bad else None


def _bytes(value: float) -> str:
    """Decimal units, as link speeds."""
    return f"{value / GB_:.2f} GB" if value >= 0.1 * GB_ else f"{value / MB_:.2f} MB"


def project(factors: dict[str, float], measured_rate: float, reference_tflops: float) -> list[dict]:
    """The projection table (see the module doc); its assumptions printed above it."""
    rate = reference_tflops * 1e12
    print("\nProjection: one step on N machines, bfloat16: Wan's 2 DiT passes (conditional, unconditional), "
          "LTX-2.0 dev's 3 (conditional, unconditional, modality-isolated)")
    print(f"  compute/rank: FLOPs per rank from shapes (linears, attention, patch embedding) / {reference_tflops:g} "
          "TFLOPS, x the plan factor measured above (" + ", ".join(f"{p} {f:.2f}" for p, f in factors.items())
          + f"). {reference_tflops:g} TFLOPS: half the peak of an M3 Ultra's 80-core GPU, taken as twice the 40-core "
          "M3 Max's 14.32 TFLOPS FP32 (5120 ALUs x 2 x 1.398 GHz, hmc-tech.com's spec sheet), bf16 at the fp32 "
          f"rate; an assumption, not measured. This machine's CPU ran {measured_rate / 1e9:.0f} GFLOP/s, "
          f"{rate / measured_rate:.0f}x less (--reference-tflops changes it)")
    print("  communication/rank (ring, no overlap with compute): all_gather of a local part of B bytes: (N-1) "
          "latencies + (N-1) B / BW; all_sum of B bytes: 2 (N-1) latencies + 2 (N-1)/N B / BW")
    print("  10 GbE (ring backend over TCP): BW 1.1 GB/s effective of 1.25, latency 50 us; Thunderbolt 5 (JACCL, "
          "RDMA, a cable per ring neighbour): 80 Gb/s, BW 8 GB/s effective (a TB5 RDMA backend measured ~7.6 GB/s "
          "per rank, pytorch/pytorch#189856), latency 10 us (JACCL: an order of magnitude below TCP, "
          "mlx/distributed/jaccl/lib/README.md)")
    print("  on the wire: activations bf16, the tensor plan's RMS-norm sums of squares f32. Text: Wan 512 tokens, "
          "LTX-2 1024 and an 84-token soundtrack. LTX-2's plans are runtime.parallel_ltx2's (cfg: the passes "
          "dealt round-robin to 2-3 ranks; tensor; sequence: video tokens split, the soundtrack whole, video K/V "
          "gathered twice a block). The plan factors are Wan's")
    rows, records = [], []
    for model in TARGETS:
        blocks, other = parameters(model)
        for size in TARGETS[model]:
            found = target(model, size)
            print(f"  {model} {size}: {found['label']}; {(blocks + other) / 1e9:.1f} B parameters")
            passes = found["passes"]
            single = found["flops"].per_rank(None, 1, passes) / rate
            rows.append([model, size, "1 machine", "1", f"{single:.1f}", "-", "-",
                         f"{(blocks + other) * BF16 / GB_:.1f}", "-", f"{single:.1f}", "1.00", "-", f"{single:.1f}",
                         "1.00"])
            records.append({"model": model, "size": size, "plan": None, "n": 1, "step_s": single})
            for plan in PLANS:
                for n in MACHINES:
                    if (plan == "cfg" and n > found["passes"]) or (plan != "cfg" and n == 3):
                        continue
                    label = plan
                    why = refusal(plan, n, found)
                    if why:
                        rows.append([model, size, label, str(n), "-", "-", "-", "-", why, "", "", "", "", ""])
                        continue
                    compute = found["flops"].per_rank(plan, n, passes) / rate * factors[plan]
                    collectives = found["collectives"](plan, n)
                    sent = sum(c.sent(n) for c in collectives)
                    calls = sum(c.calls for c in collectives)
                    weights = (blocks / n + other if plan == "tensor" else blocks + other) * BF16
                    row = [model, size, label, str(n), f"{compute:.1f}", _bytes(sent), str(calls),
                           f"{weights / GB_:.1f}"]
                    record = {"model": model, "size": size, "plan": plan, "n": n, "compute_s": compute,
                              "sent_bytes": sent, "collectives": calls, "weights_bytes": weights}
                    for link in LINKS:
                        comm = sum(c.steps(n) * link.latency + c.sent(n) / link.bandwidth for c in collectives)
                        row += [f"{comm:.1f}", f"{compute + comm:.1f}", f"{single / (compute + comm):.2f}"]
                        record[link.name] = {"comm_s": comm, "step_s": compute + comm,
                                             "speedup": single / (compute + comm)}
                    rows.append(row)
                    records.append(record)
    a, b = (link.name for link in LINKS)
    common.table(f"Projected seconds per step, {reference_tflops:g} TFLOPS per machine",
                 ["model", "size", "plan", "N", "compute s", "sent/rank", "collectives", "weights GB",
                  f"{a} comm s", f"{a} step s", f"{a} speed-up", f"{b} comm s", f"{b} step s", f"{b} speed-up"], rows)
    print("  compute s: per rank; speed-up: the 1-machine step / this step; weights GB: bf16 parameters per rank "
          "(the tensor plan holds 1/N of the blocks; a 1-machine row needs them all on one machine)")
    return records


def run(quick: bool, repeat: int, layers: int | None, reference_tflops: float) -> dict:
    size = "quick" if quick else "full"
    layers = layers or SIZES[size]["layers"]
    measured = measure(size, layers, repeat)
    factors, rate = measured_table(measured)
    projection = project(factors, rate, reference_tflops)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return {"measured": measured, "plan_factors": factors, "cpu_rate_flops": rate, "projection": projection,
            "reference_tflops": reference_tflops}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks, 1 frame at 128x224 (112 tokens), 2 steps")
    parser.add_argument("--repeat", type=int, help="timed steps per run (median reported; default 3, quick 2)")
    parser.add_argument("--layers", type=int, help="blocks held of the 30 (default 10, quick 2); the rest projected")
    parser.add_argument("--reference-tflops", type=float, default=REFERENCE_TFLOPS,
                        help="achieved TFLOPS per machine in the projection")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", default="none", choices=["none", *PLANS], help=argparse.SUPPRESS)
    parser.add_argument("--size", default="full", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_worker:
        plan = None if args.plan == "none" else args.plan
        rank_main(plan, args.size, args.layers or SIZES[args.size]["layers"], args.repeat or 3, args.out,
                  args.count_only)
        return {}
    if args.layers is not None and not 1 <= args.layers <= WAN_1_3B["num_layers"]:
        parser.error(f"--layers {args.layers}: between 1 and {WAN_1_3B['num_layers']}")
    report = run(args.quick, args.repeat or (2 if args.quick else 3), args.layers, args.reference_tflops)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
