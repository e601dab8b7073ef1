"""Per-op timings, MLX runtime vs torch, at the shapes one SD 1.5 + AnimateDiff denoising step uses
(classifier-free guidance batch 2 x 8 frames = 16 images, 32x32 latents), so the op that loses
the step is visible:

- conv2d 3x3 at each UNet resolution (MLX: `runtime.layers.Conv2d`, channels-last, which runs
  vidport's native oneDNN primitive where it is built; torch: F.conv2d, NCHW as diffusers runs it);
- spatial self-attention at 32x32 and 16x16 tokens (and 8x8) with 8 heads, cross-attention to
  77 text tokens, and the motion modules' temporal attention (8 frames per pixel sequence):
  MLX `runtime.layers.attention` (the one attention all the runtime's models call) and, for
  comparison, MLX's own mx.fast.scaled_dot_product_attention; torch F.scaled_dot_product_attention;
- conv2d 3x3 at the SD VAE decoder's last stage (256x256x128, one frame);
- group norm (32 groups; MLX `runtime.layers.GroupNorm`, torch F.group_norm), SiLU
  (`runtime.layers.silu`, F.silu), layer norm;
- linear layers of the transformer blocks (q/k/v/out, GEGLU in, feed-forward out).

Each side runs in a worker process of its own (float32, the same input values; bench/_common.py),
the two alternating sample by sample (MLX, torch, MLX, ...) with a pause between them so one
side's idle BLAS/OpenMP threads have stopped spinning when the other starts; each sample repeats
the op enough times to last about 0.1 s. The table gives the median time per call, GFLOP/s for
the matmul-shaped ops, and MLX/torch.

    .venv/bin/python bench/ops.py            # the full-size shapes (~2-3 min)
    .venv/bin/python bench/ops.py --quick    # 4 images at 16x16 latents (seconds)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402


def shapes(quick: bool) -> dict:
    """The step's shapes: batch of images, latent side, widths, text tokens, frames."""
    if quick:
        return {"images": 4, "side": 16, "widths": [320, 640, 1280, 1280], "tokens": 77, "frames": 4, "heads": 8}
    return {"images": 16, "side": 32, "widths": [320, 640, 1280, 1280], "tokens": 77, "frames": 8, "heads": 8}


def cases(quick: bool) -> list[dict]:
    """(name, kind, arguments) for every op row."""
    s = shapes(quick)
    n, side, widths, heads = s["images"], s["side"], s["widths"], s["heads"]
    out = []
    for level, channels in enumerate(widths):
        res = side >> level
        out.append({"name": f"conv2d 3x3 {res}x{res} {channels}->{channels}", "kind": "conv",
                    "shape": (n, res, res, channels), "out": channels})
    out.append({"name": f"conv2d 3x3 {side}x{side} {2 * widths[0]}->{widths[0]} (up block)", "kind": "conv",
                "shape": (n, side, side, 2 * widths[0]), "out": widths[0]})
    vae_side = side * 8 // (4 if quick else 1)  # the SD VAE decoder's last stage, one frame
    out.append({"name": f"conv2d 3x3 {vae_side}x{vae_side} 128->128 (SD VAE, one frame)", "kind": "conv",
                "shape": (1, vae_side, vae_side, 128), "out": 128})
    for level in range(3):
        res, channels = side >> level, widths[level]
        tokens = res * res
        out.append({"name": f"self-attention {res}x{res}={tokens} tok, {heads}x{channels // heads}", "kind": "attention",
                    "q": (n, heads, tokens, channels // heads), "kv": (n, heads, tokens, channels // heads)})
        if level == 0:
            out.append({"name": "  mx.fast SDPA (MLX built-in), same shape", "kind": "fast_attention",
                        "q": (n, heads, tokens, channels // heads), "kv": (n, heads, tokens, channels // heads)})
    out.append({"name": f"cross-attention {side}x{side} tok -> {s['tokens']} text", "kind": "attention",
                "q": (n, heads, side * side, widths[0] // heads), "kv": (n, heads, s["tokens"], widths[0] // heads)})
    batch = n // s["frames"]
    for level in range(3):
        res, channels = side >> level, widths[level]
        seqs = batch * res * res
        out.append({"name": f"temporal attention {seqs} seqs x {s['frames']} frames, {heads}x{channels // heads}",
                    "kind": "attention", "q": (seqs, heads, s["frames"], channels // heads),
                    "kv": (seqs, heads, s["frames"], channels // heads)})
    for level in range(3):
        res, channels = side >> level, widths[level]
        out.append({"name": f"group norm 32 groups {res}x{res}x{channels}", "kind": "group_norm",
                    "shape": (n, res, res, channels)})
    out.append({"name": f"SiLU {n}x{side}x{side}x{widths[0]}", "kind": "silu", "shape": (n, side, side, widths[0])})
    out.append({"name": f"layer norm {n * side * side} tok x {widths[0]}", "kind": "layer_norm",
                "shape": (n * side * side, widths[0])})
    tokens = n * side * side
    for label, (fan_in, fan_out) in {"q/k/v/out": (widths[0], widths[0]), "GEGLU in": (widths[0], 8 * widths[0]),
                                     "feed-forward out": (4 * widths[0], widths[0])}.items():
        out.append({"name": f"linear {label} {tokens} tok {fan_in}->{fan_out}", "kind": "linear",
                    "shape": (tokens, fan_in), "out": fan_out})
    out.append({"name": f"linear q/k/v/out {n * (side // 2) ** 2} tok {widths[1]}->{widths[1]}", "kind": "linear",
                "shape": (n * (side // 2) ** 2, widths[1]), "out": widths[1]})
    return out


def flops(case: dict) -> float:
    if case["kind"] == "conv":
        b, h, w, c = case["shape"]
        return 2.0 * b * h * w * c * case["out"] * 9
    if case["kind"] in ("attention", "fast_attention"):
        b, heads, lq, d = case["q"]
        return 4.0 * b * heads * lq * case["kv"][2] * d
    if case["kind"] == "linear":
        return 2.0 * case["shape"][0] * case["shape"][1] * case["out"]
    return 0.0


def build(case: dict, side: str, rng):
    """The op as a callable on `side` ("mlx" or "torch"); both sides draw the same values."""
    import numpy as np

    def rand(shape):
        return rng.standard_normal(shape, dtype=np.float32)

    kind = case["kind"]
    if side == "mlx":
        import mlx.core as mx
        import mlx.nn as mnn

        from vidport.runtime.layers import Conv2d, GroupNorm, attention, silu

        if kind == "conv":
            x = mx.array(rand(case["shape"]))
            conv = Conv2d(case["shape"][-1], case["out"], 3, padding=1)
            mx.eval(x, conv.parameters())
            return lambda: mx.eval(conv(x))
        if kind in ("attention", "fast_attention"):
            q, k, v = mx.array(rand(case["q"])), mx.array(rand(case["kv"])), mx.array(rand(case["kv"]))
            scale = case["q"][-1] ** -0.5
            mx.eval(q, k, v)
            if kind == "fast_attention":
                return lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))
            return lambda: mx.eval(attention(q, k, v, scale))
        if kind in ("group_norm", "layer_norm"):
            x = mx.array(rand(case["shape"]))
            norm = GroupNorm(32, case["shape"][-1]) if kind == "group_norm" else mnn.LayerNorm(case["shape"][-1])
            mx.eval(x, norm.parameters())
            return lambda: mx.eval(norm(x))
        if kind == "linear":
            x = mx.array(rand(case["shape"]))
            layer = mnn.Linear(case["shape"][-1], case["out"])
            mx.eval(x, layer.parameters())
            return lambda: mx.eval(layer(x))
        if kind == "silu":
            x = mx.array(rand(case["shape"]))
            mx.eval(x)
            return lambda: mx.eval(silu(x))
        raise ValueError(kind)

    import torch
    import torch.nn.functional as F

    if kind == "conv":
        x = torch.from_numpy(rand(case["shape"]).transpose(0, 3, 1, 2).copy())
        conv = torch.nn.Conv2d(case["shape"][-1], case["out"], 3, padding=1)
        return lambda: conv(x)
    if kind in ("attention", "fast_attention"):
        q, k, v = torch.from_numpy(rand(case["q"])), torch.from_numpy(rand(case["kv"])), torch.from_numpy(rand(case["kv"]))
        scale = case["q"][-1] ** -0.5
        return lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)
    if kind == "group_norm":
        x = torch.from_numpy(rand(case["shape"]).transpose(0, 3, 1, 2).copy())
        norm = torch.nn.GroupNorm(32, case["shape"][-1])
        return lambda: norm(x)
    if kind == "layer_norm":
        x = torch.from_numpy(rand(case["shape"]))
        norm = torch.nn.LayerNorm(case["shape"][-1])
        return lambda: norm(x)
    if kind == "linear":
        x = torch.from_numpy(rand(case["shape"]))
        layer = torch.nn.Linear(case["shape"][-1], case["out"])
        return lambda: layer(x)
    if kind == "silu":
        x = torch.from_numpy(rand(case["shape"]).transpose(0, 3, 1, 2).copy())
        return lambda: F.silu(x)
    raise ValueError(kind)


def _setup(side: str, quick: bool, target_s: float):
    """Worker: build every op, warm it up, and calibrate how many calls make one ~target_s sample."""
    library = common.start_mlx() if side == "mlx" else common.start_torch()
    import numpy as np

    rng = np.random.default_rng(0)
    calls, counts = {}, {}
    for index, case in enumerate(cases(quick)):
        fn = build(case, side, rng)
        fn()  # warm-up (MLX compiles its fused kernels once)
        start = time.perf_counter()
        fn()
        once = time.perf_counter() - start
        count = max(1, min(200, int(target_s / max(once, 1e-6))))
        counts[str(index)] = count
        calls[str(index)] = (lambda fn=fn, count=count: [fn() for _ in range(count)])
    return calls, {"library": library, "counts": counts}


def run(quick: bool = False, repeat: int = 5, target_s: float = 0.1) -> dict:
    s = shapes(quick)
    print(f"shapes of one SD 1.5 + motion step: {s['images']} images ({s['images'] // s['frames']} x {s['frames']} frames), "
          f"{s['side']}x{s['side']} latents, widths {s['widths']}, float32", flush=True)
    found = cases(quick)
    args = ["--size", "quick" if quick else "full", "--target", str(target_s)]
    results = common.interleaved(__file__, ["mlx", "torch"], [str(i) for i in range(len(found))], repeat, args,
                                 log=lambda line: None)
    print(f"MLX: {results['mlx']['info']['library']}; {results['torch']['info']['library']}")
    rows, records = [], []
    for index, case in enumerate(found):
        per_call = {}
        for side in ("mlx", "torch"):
            count = results[side]["info"]["counts"][str(index)]
            per_call[side] = results[side]["summary"][str(index)]["wall_s"] / count
        gflop = flops(case) / 1e9
        ratio = per_call["mlx"] / per_call["torch"]
        records.append({"op": case["name"], "mlx_s": per_call["mlx"], "torch_s": per_call["torch"], "ratio": ratio,
                        "gflop": gflop})
        rate = (lambda t: f"{gflop / t:.0f}" if gflop else "-")
        rows.append([case["name"], f"{per_call['mlx'] * 1e3:.2f}", f"{per_call['torch'] * 1e3:.2f}", f"{ratio:.2f}",
                     rate(per_call["mlx"]), rate(per_call["torch"])])
    common.table(f"Per-op MLX vs torch at the SD 1.5 step's shapes ({'quick' if quick else 'full'}; median of "
                 f"{repeat}, alternating)", ["op", "MLX ms", "torch ms", "MLX/torch", "MLX GFLOP/s", "torch GFLOP/s"],
                 rows)
    return {"shapes": s, "rows": records}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 images at 16x16 latents")
    parser.add_argument("--repeat", type=int, default=5, help="alternating samples per side (median reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=["full", "quick"], default="full", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=float, default=0.1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        common.serve(lambda: _setup(args.worker, args.size == "quick", args.target), warmup=False)
        return {}
    report = run(args.quick, args.repeat)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
