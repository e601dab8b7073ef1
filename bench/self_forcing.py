"""Self-Forcing's causal Wan 2.1 1.3B DiT on this CPU: MLX with its KV cache against diffusers without one.

Random float32 weights at the released 1.3B configuration (tests/fixtures/self_forcing.RELEASE_1_3B:
12 heads x 128, ffn 8960, text dim 4096), with `--layers` of its 30 blocks, each side its own random
weights as in bench/wan_forward.py (the timings do not depend on the values; parity is
tests/test_causal_wan.py's). A small video: blocks of 3 latent frames at 12x20 latents (96x160
pixels, 60 tokens a frame), 512 text tokens, and per block what the official inference runs:

- MLX (vidport `runtime.causal_wan.CausalWanTransformer` + `CausalWanCache`): 4 denoising passes
  over the block's frames at timesteps 1000, 937.5, 833.3, 625 (Self-Forcing's
  denoising_step_list [1000, 750, 500, 250] warped with shift 5), then the clean pass at timestep 0
  that writes the block's keys and values to the cache: 5 passes, each attending to the cache.
- the recompute (what a port without a cache does): diffusers' `WanTransformer3DModel` over every
  frame so far, the earlier blocks' clean latents at timestep 0 and the block at its timestep,
  under the block-causal mask with per-token timesteps (`reference.causal_wan.cached_pass`): 4
  passes a block, no clean pass (each pass re-runs the earlier clean frames).
- diffusers' per-block forward: the stock `WanTransformer3DModel` over a block's 3 frames alone (no
  history, no mask, one timestep), 4 passes: what a bidirectional chunk-by-chunk run costs. Every
  block costs the same, so a round times the first block's and counts it once a block.

Time to first frame is block 1's 4 denoising passes (the prompt's cross-attention keys and values
included; the text encoder, the clean pass that follows and the VAE decode excluded). Frames per
second count every pass of every block, latent frames and the pixel frames the Wan VAE makes of
them (1 + 4 (n - 1)). With fewer than 30 layers, times are projected to 30 as measured x 30 / layers
(the embeddings and head then count 30 / layers times: an upper bound on both sides).

One worker process per side (bench/_common.py); each round runs MLX's generation, then diffusers'
recompute, then its per-block forward; `--repeat` rounds, medians with their range, every
generation from an empty cache. Goals (issue 13): MLX faster than the recompute from the second
block on, and per pass no slower than diffusers' per-block forward; judged in every round.

    .venv/bin/python bench/self_forcing.py              # all 30 layers, 4 blocks of 3 latent frames (about 10 min)
    .venv/bin/python bench/self_forcing.py --layers 10  # 10 of 30 layers, projected to 30 (about 4 min)
    .venv/bin/python bench/self_forcing.py --quick      # 2 layers, 3 blocks
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

RELEASE_LAYERS = 30
DENOISING = (1000.0, 937.5, 2500.0 / 3, 625.0)  # [1000, 750, 500, 250] warped: 1000 s t / (1000 + (s - 1) t), s = 5
SIZES = {
    "full": {"layers": 30, "blocks": 4, "block_frames": 3, "height": 12, "width": 20, "text_tokens": 512},
    "quick": {"layers": 2, "blocks": 3, "block_frames": 3, "height": 12, "width": 20, "text_tokens": 512},
}
# Self-Forcing's release run: 21 latent frames (81 frames) at 480x832, 30 x 52 = 1560 tokens a frame
RELEASE_RUN = {"latent_frames": 21, "frame_tokens": 1560, "text_tokens": 512}
MLX_PASSES, RECOMPUTE_PASSES = len(DENOISING) + 1, len(DENOISING)


def dit_config(layers: int) -> dict:
    """The released 1.3B Diffusers config with `layers` of its 30 blocks."""
    from fixtures.self_forcing import RELEASE_1_3B

    return {**RELEASE_1_3B, "num_layers": layers}


def frame_tokens(size: str) -> int:
    s = SIZES[size]
    return (s["height"] // 2) * (s["width"] // 2)


def pixel_frames(latent_frames: int) -> int:
    """What the Wan 2.1 VAE decodes n latent frames to: the first alone, then 4 each."""
    return 1 + 4 * (latent_frames - 1)


def cache_bytes(layers: int, frames: int, tokens: int, text_tokens: int, itemsize: int, width: int = 12 * 128) -> int:
    """The cache's memory by formula: per layer the self-attention keys and values of every frame
    written, and the prompt's cross-attention keys and values."""
    return layers * 2 * (frames * tokens + text_tokens) * width * itemsize


def inputs(size: str) -> dict:
    """Channels-first [1, 16, F, H, W] latents (diffusers' layout): per block a noisy input per
    denoising pass and the clean latents its clean pass sees; the text states."""
    import numpy as np

    s = SIZES[size]
    rng = np.random.default_rng(0)
    shape = (1, 16, s["block_frames"], s["height"], s["width"])
    return {"noisy": [[rng.standard_normal(shape, dtype=np.float32) for _ in DENOISING] for _ in range(s["blocks"])],
            "clean": [rng.standard_normal(shape, dtype=np.float32) for _ in range(s["blocks"])],
            "context": rng.standard_normal((1, s["text_tokens"], 4096), dtype=np.float32)}


def _mlx_setup(size: str, layers: int):
    blas = common.start_mlx()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vidport.runtime.causal_wan import CausalWanTransformer
    from vidport.runtime.causal_wan_cache import CausalWanCache

    s, data = SIZES[size], inputs(size)
    net = CausalWanTransformer.from_config(dit_config(layers))
    net.eval()
    mx.eval(net.parameters())

    def channels_last(x):
        return mx.array(x.transpose(0, 2, 3, 4, 1))

    noisy = [[channels_last(x) for x in block] for block in data["noisy"]]
    clean = [channels_last(x) for x in data["clean"]]
    context = mx.array(data["context"])
    steps = [mx.full((s["block_frames"],), t) for t in DENOISING]
    zero = mx.zeros((s["block_frames"],))

    def generate() -> dict:
        cache, blocks, written = CausalWanCache(), [], []
        start = time.perf_counter()
        for b in range(s["blocks"]):
            began = time.perf_counter()
            for x, t in zip(noisy[b], steps):
                mx.eval(net(x, t, context, cache))
            if b == 0:
                first = time.perf_counter() - start
            mx.eval(net(clean[b], zero, context, cache, write=True))
            blocks.append(time.perf_counter() - began)
            written.append(cache.nbytes)
        return {"blocks_s": blocks, "first_frame_s": first, "cache_bytes": written}

    mx.eval(net(noisy[0][0], steps[0], context, CausalWanCache()))  # warm-up: one pass
    parameters = sum(v.size for _, v in tree_flatten(net.parameters()))
    return {"generate": generate}, {"blas": blas, "parameters": parameters}


def _torch_setup(size: str, layers: int):
    info = common.start_torch()
    import torch
    from diffusers import WanTransformer3DModel

    from vidport.reference.causal_wan import cached_pass

    s, data = SIZES[size], inputs(size)
    torch.manual_seed(0)
    net = WanTransformer3DModel(**dit_config(layers)).eval()
    noisy = [[torch.from_numpy(x) for x in block] for block in data["noisy"]]
    clean = [torch.from_numpy(x) for x in data["clean"]]
    context = torch.from_numpy(data["context"])
    frames = [s["block_frames"]] * s["blocks"]
    steps = [torch.full((1, s["block_frames"]), t) for t in DENOISING]

    def recompute() -> dict:
        blocks = []
        for b in range(s["blocks"]):
            began = time.perf_counter()
            before = torch.cat(clean[:b], dim=2) if b else None
            for x, t in zip(noisy[b], steps):
                cached_pass(net, before, x, t, context, frames[: b + 1])
            blocks.append(time.perf_counter() - began)
        return {"blocks_s": blocks, "first_frame_s": blocks[0]}

    def per_block() -> dict:
        began = time.perf_counter()
        for x, t in zip(noisy[0], DENOISING):
            net(x, torch.tensor([t]), context, return_dict=False)
        return {"block_s": time.perf_counter() - began}

    net(noisy[0][0], torch.tensor([DENOISING[0]]), context, return_dict=False)  # warm-up: one pass
    parameters = sum(p.numel() for p in net.parameters())
    return {"recompute": recompute, "per_block": per_block}, {"torch": info, "parameters": parameters}


# (worker side, call) of each measurement, in the order a round runs them
MEASURES = {"mlx": ("mlx", "generate"), "recompute": ("torch", "recompute"), "per_block": ("torch", "per_block")}


def rounds(size: str, layers: int, repeat: int) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """`repeat` rounds of every measurement; both workers alive at once where memory allows (else
    MLX's rounds, then diffusers'). Returns the runs per measurement and each worker's ready message
    plus its peak RSS."""
    args = ["--size", size, "--layers", str(layers)]
    need = 2 * (0.19 * layers + 1.0) * common.GB  # 186 MB of float32 weights a layer + embeddings and work, per side
    together = common.available_memory() >= need
    if not together:
        print(f"  {common.available_memory() / common.GB:.1f} GB available: the sides run one after the other")
    runs: dict[str, list[dict]] = {name: [] for name in MEASURES}
    workers: dict[str, common.Worker] = {}
    sides: dict[str, dict] = {}

    def measure(number: int, name: str) -> None:
        side, call = MEASURES[name]
        if side not in workers:
            workers[side] = common.Worker(__file__, side, args)
            sides[side] = {**workers[side].ready, "peak_rss": 0}
            print(f"  {side}: built in {sides[side]['build_s']:.1f} s, baseline RSS "
                  f"{sides[side]['baseline_rss'] / common.MB:.0f} MB", flush=True)
        time.sleep(common.SETTLE_S)
        found = workers[side].call(call)
        sides[side]["peak_rss"] = max(sides[side]["peak_rss"], found["peak_rss"])
        runs[name].append({**found["extra"], "wall_s": found["wall_s"], "cpu_s": found["cpu_s"]})
        blocks = ", ".join(f"{t:.2f}" for t in found["extra"].get("blocks_s", []))
        print(f"  [{number + 1}/{repeat}] {name}: {found['wall_s']:.2f} s (cpu {found['cpu_s']:.2f} s)"
              + (f"; blocks {blocks} s" if blocks else ""), flush=True)

    try:
        if together:
            for number in range(repeat):
                for name in MEASURES:
                    measure(number, name)
        else:
            for side in ("mlx", "torch"):
                for number in range(repeat):
                    for name in (n for n, (owner, _) in MEASURES.items() if owner == side):
                        measure(number, name)
                workers.pop(side).close()
    finally:
        for worker in workers.values():
            worker.close()
    return runs, sides


def spread(values: list[float]) -> str:
    """Median (fastest-slowest)."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def block_table(size: str, layers: int, runs: dict[str, list[dict]]) -> list[dict]:
    """Per block: each side's time (median, range), MLX / recompute, per pass against diffusers'
    per-block forward (the same for every block), the MLX cache after the block."""
    s = SIZES[size]
    found = {name: [[r["blocks_s"][b] for r in runs[name]] for b in range(s["blocks"])]
             for name in ("mlx", "recompute")}
    forward_pass = statistics.median(r["block_s"] for r in runs["per_block"]) / RECOMPUTE_PASSES
    rows, records = [], []
    for b in range(s["blocks"]):
        mlx, recompute = statistics.median(found["mlx"][b]), statistics.median(found["recompute"][b])
        mlx_pass = mlx / MLX_PASSES
        written = runs["mlx"][0]["cache_bytes"][b]
        records.append({"block": b + 1, "mlx_s": mlx, "recompute_s": recompute, "mlx_over_recompute": mlx / recompute,
                        "mlx_pass_s": mlx_pass, "per_block_pass_s": forward_pass,
                        "pass_ratio": mlx_pass / forward_pass, "cache_bytes": written})
        first = b * s["block_frames"]
        rows.append([f"block {b + 1} (frames {first}-{first + s['block_frames'] - 1})", spread(found["mlx"][b]),
                     spread(found["recompute"][b]), f"{mlx / recompute:.2f}", f"{mlx_pass:.2f}",
                     f"{forward_pass:.2f}", f"{mlx_pass / forward_pass:.2f}", f"{written / common.MB:.1f}"])
    common.table(f"Per block, {layers} of {RELEASE_LAYERS} layers, seconds (median of {len(runs['mlx'])} rounds, "
                 "range)",
                 ["", "MLX + cache (5 passes)", "diffusers recompute (4)", "MLX/recompute", "MLX s/pass",
                  "diffusers per-block s/pass", "pass MLX/per-block", "MLX cache MB after"], rows)
    return records


def whole_table(size: str, layers: int, runs: dict[str, list[dict]]) -> dict[str, dict]:
    """The whole generation per side: time to first frame, total, frames per second, and the same
    projected to 30 layers."""
    s = SIZES[size]
    scale = RELEASE_LAYERS / layers
    latent_frames = s["blocks"] * s["block_frames"]
    pixels = pixel_frames(latent_frames)
    whole, rows = {}, []
    measured = {name: ([r["first_frame_s"] for r in runs[name]], [sum(r["blocks_s"]) for r in runs[name]])
                for name in ("mlx", "recompute")}
    measured["per_block"] = ([r["block_s"] for r in runs["per_block"]],
                             [r["block_s"] * s["blocks"] for r in runs["per_block"]])
    for name, label in (("mlx", "MLX + KV cache"), ("recompute", "diffusers recompute"),
                        ("per_block", f"diffusers per-block forward (no history; 1 block x {s['blocks']})")):
        firsts, totals = measured[name]
        total, first = statistics.median(totals), statistics.median(firsts)
        whole[name] = {"first_frame_s": first, "total_s": total, "latent_fps": latent_frames / total,
                       "pixel_fps": pixels / total, "projected_first_frame_s": first * scale,
                       "projected_total_s": total * scale, "projected_pixel_fps": pixels / total / scale}
        rows.append([label, spread(firsts), spread(totals), f"{latent_frames / total:.2f}", f"{pixels / total:.2f}"]
                    + ([f"{first * scale:.1f}", f"{total * scale:.1f}", f"{pixels / total / scale:.3f}"]
                       if layers != RELEASE_LAYERS else []))
    projected = [f"{what}, {RELEASE_LAYERS} layers" for what in ("first frame s", "total s", "pixel fps")]
    common.table(f"Whole run: {latent_frames} latent frames -> {pixels} frames at {8 * s['height']}x{8 * s['width']} "
                 f"(median of {len(runs['mlx'])} rounds, range)",
                 ["", "first frame s", "total s", "latent fps", "pixel fps"]
                 + (projected if layers != RELEASE_LAYERS else []), rows)
    if layers != RELEASE_LAYERS:
        print(f"  {RELEASE_LAYERS}-layer columns: measured x {scale:.1f} (embeddings and head counted {scale:.1f} "
              "times: an upper bound on both sides)")
    print("  first frame: block 1's 4 denoising passes (MLX: with the prompt's cross-attention keys and values); "
          "text encoder, clean pass and VAE decode excluded")
    return whole


def cache_memory(size: str, layers: int, written: list[int]) -> dict:
    """The cache after each block by formula, checked against what `cache.nbytes` reported, and the
    formula at the release run's size."""
    s = SIZES[size]

    def at(layers: int, frames: int, tokens: int, itemsize: int) -> int:
        return cache_bytes(layers, frames, tokens, s["text_tokens"], itemsize)

    expected = [at(layers, (b + 1) * s["block_frames"], frame_tokens(size), 4) for b in range(s["blocks"])]
    release = {dtype: at(RELEASE_LAYERS, RELEASE_RUN["latent_frames"], RELEASE_RUN["frame_tokens"], itemsize)
               for dtype, itemsize in (("bfloat16", 2), ("float32", 4))}
    prompt = {dtype: at(RELEASE_LAYERS, 0, 0, itemsize) for dtype, itemsize in (("bfloat16", 2), ("float32", 4))}
    measured = "equal to cache.nbytes" if written == expected else f"cache.nbytes {written}: NOT equal"
    print(f"cache memory = layers x 2 (k, v) x (frames written x tokens a frame + {s['text_tokens']} text tokens) "
          "x 12 heads x 128 x bytes: here " + ", ".join(f"{e / common.MB:.1f}" for e in expected)
          + f" MB after blocks 1-{s['blocks']} ({measured}), "
          f"{at(RELEASE_LAYERS, s['blocks'] * s['block_frames'], frame_tokens(size), 4) / common.MB:.0f} MB "
          f"with {RELEASE_LAYERS} layers")
    print(f"  the release run ({RELEASE_RUN['latent_frames']} latent frames x {RELEASE_RUN['frame_tokens']} tokens "
          f"= 81 frames at 480x832, {RELEASE_LAYERS} layers): {release['bfloat16'] / common.GB:.2f} GiB in bfloat16, "
          f"{release['float32'] / common.GB:.2f} GiB in float32 (the prompt's part "
          f"{prompt['bfloat16'] / common.MB:.0f} / {prompt['float32'] / common.MB:.0f} MB)")
    return {"measured": written, "formula": expected, "release": release, "release_prompt": prompt}


def goals(runs: dict[str, list[dict]]) -> dict[str, list[bool]]:
    """Each goal, round by round: MLX's block faster than the recompute's from block 2 on, and its
    time per pass no more than diffusers' per-block forward's in every block."""
    by_round = {
        "faster than the recompute from block 2": [
            all(m < r for m, r in zip(mlx["blocks_s"][1:], recompute["blocks_s"][1:]))
            for mlx, recompute in zip(runs["mlx"], runs["recompute"])],
        "per pass no slower than diffusers' per-block forward": [
            all(m / MLX_PASSES <= forward["block_s"] / RECOMPUTE_PASSES for m in mlx["blocks_s"])
            for mlx, forward in zip(runs["mlx"], runs["per_block"])],
    }
    print("goals:")
    for goal, met in by_round.items():
        print(f"  MLX {goal}: " + ("met in every round" if all(met) else
                                   f"NOT met (met in {sum(met)} of {len(met)} rounds)"))
    return by_round


def run(quick: bool = False, repeat: int = 3, layers: int | None = None) -> dict:
    size = "quick" if quick else "full"
    s = SIZES[size]
    layers = layers or s["layers"]
    tokens = s["block_frames"] * frame_tokens(size)
    print(f"Self-Forcing causal Wan 2.1 1.3B DiT, {layers} of {RELEASE_LAYERS} layers, float32: {s['blocks']} "
          f"blocks of {s['block_frames']} latent frames at {s['height']}x{s['width']} ({tokens} tokens a block), "
          f"{s['text_tokens']} text tokens; load average {os.getloadavg()[0]:.2f}", flush=True)
    print("  MLX: per block 4 denoising passes over the block + 1 clean pass writing the KV cache; diffusers "
          "recompute: per block 4 passes over all frames so far under the block-causal mask; diffusers per-block: "
          "4 stock passes over the block alone", flush=True)
    runs, sides = rounds(size, layers, repeat)
    print(f"  load average after: {os.getloadavg()[0]:.2f}")
    blocks, whole = block_table(size, layers, runs), whole_table(size, layers, runs)
    for side, ready in sides.items():
        runtime = ready["info"]["blas"] if side == "mlx" else ready["info"]["torch"]
        print(f"  {side} worker: baseline RSS {ready['baseline_rss'] / common.MB:.0f} MB, peak "
              f"{ready['peak_rss'] / common.MB:.0f} MB; {runtime}")
    memory = cache_memory(size, layers, runs["mlx"][0]["cache_bytes"])
    by_round = goals(runs)
    return {"size": size, "shape": s, "layers": layers, "runs": runs, "blocks": blocks, "whole": whole,
            "cache": memory, "goals_by_round": by_round, "goals_met": {g: all(m) for g, m in by_round.items()},
            "workers": {side: {k: v for k, v in ready.items() if k != "ready"} for side, ready in sides.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 3 blocks")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--layers", type=int, help=f"DiT blocks of {RELEASE_LAYERS} (default: all; --quick 2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers is not None and not 1 <= args.layers <= RELEASE_LAYERS:
        parser.error(f"--layers {args.layers}: give 1 to {RELEASE_LAYERS}")
    if args.worker:
        setup = _mlx_setup if args.worker == "mlx" else _torch_setup
        common.serve(lambda: setup(args.size, args.layers or SIZES[args.size]["layers"]), warmup=False)
        return {}
    report = run(args.quick, args.repeat, args.layers)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
