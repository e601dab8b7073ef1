"""Wan 2.1 T2V 1.3B on this CPU, MLX vs diffusers, float32, random weights:

- one DiT forward at the real 1.3B configuration (30 layers, 12 heads x 128, ffn 8960, text dim
  4096) on a small latent: 5 frames at 240x416 pixels = 2 x 30 x 52 latents = 780 tokens, 512 text
  tokens: vidport's `runtime.wan_dit.WanTransformer3DModel.from_config` vs diffusers'
  `WanTransformer3DModel`;
- the Wan 2.1 VAE decoding the same clip (2 latent frames -> 5 frames of 240x416 RGB):
  `runtime.wan_vae.AutoencoderKLWan.decode` vs diffusers' `AutoencoderKLWan.decode`.

Each model runs in a worker process per side; the sides alternate call by call (bench/_common.py)
and the table reports medians, MLX/torch ratios of time and peak RSS, and RSS above each side's
baseline (weights and inputs resident). The two DiT workers hold 5.7 GB of float32 weights each:
when less memory is available than both need, the sides run one after the other instead (a
worker rebuilt per round). Goal (issues 5, 17): MLX no slower than diffusers in every one of
separate runs (`--processes`), no worse than 1.2 with a busy second process (`--contention`).

    .venv/bin/python bench/wan_forward.py            # the real 1.3B DiT, 5 frames at 240x416
    .venv/bin/python bench/wan_forward.py --quick    # 2 of the 30 layers, 1 frame at 120x208
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json
WAN_1_3B = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json (== diffusers' AutoencoderKLWan defaults)
WAN_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
           "temperal_downsample": [False, True, True], "dropout": 0.0}
SIZES = {
    "full": {"layers": 30, "frames": 5, "height": 240, "width": 416, "text_tokens": 512},
    "quick": {"layers": 2, "frames": 1, "height": 120, "width": 208, "text_tokens": 512},
}


def latent_shape(size: str, sizes: dict | None = None) -> tuple[int, int, int, int]:
    """(channels, latent frames, latent height, latent width) of a size in `sizes` (default SIZES)."""
    s = (sizes or SIZES)[size]
    return 16, (s["frames"] - 1) // 4 + 1, s["height"] // 8, s["width"] // 8


def inputs(size: str, sizes: dict | None = None):
    """The DiT's inputs at that size: latents (NCFHW, diffusers' layout) and text states, seeded."""
    import numpy as np

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, *latent_shape(size, sizes)), dtype=np.float32)
    text = rng.standard_normal((1, (sizes or SIZES)[size]["text_tokens"], WAN_1_3B["text_dim"]), dtype=np.float32)
    return latents, text


def _mlx_setup(model: str, size: str):
    blas = common.start_mlx()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    latents, text = inputs(size)
    z = mx.array(latents.transpose(0, 2, 3, 4, 1))  # channels-last (B, F, H, W, C)
    if model == "dit":
        from vidport.runtime.wan_dit import WanTransformer3DModel

        net = WanTransformer3DModel.from_config({**WAN_1_3B, "num_layers": SIZES[size]["layers"]})
        context, timestep = mx.array(text), mx.array([500.0])

        def call():
            mx.eval(net(z, timestep, context))
    else:
        from vidport.runtime.wan_vae import AutoencoderKLWan

        net = AutoencoderKLWan.from_config(WAN_VAE)

        def call():
            mx.eval(net.decode(z))
    mx.eval(net.parameters(), z)
    params = sum(v.size for _, v in tree_flatten(net.parameters()))
    return {model: call, "profile": lambda: common.mlx_profile(call)}, {"blas": blas, "parameters": params}


def _torch_setup(model: str, size: str):
    info = common.start_torch()
    import torch

    torch.manual_seed(0)
    latents, text = (torch.from_numpy(a) for a in inputs(size))
    if model == "dit":
        from diffusers import WanTransformer3DModel

        net = WanTransformer3DModel(**{**WAN_1_3B, "num_layers": SIZES[size]["layers"]}).eval()
        timestep = torch.tensor([500.0])

        def call():
            net(latents, timestep, text)
    else:
        from diffusers import AutoencoderKLWan

        net = AutoencoderKLWan(**WAN_VAE).eval()

        def call():
            net.decode(latents)
    params = sum(p.numel() for p in net.parameters())
    return {model: call, "profile": lambda: common.torch_profile(call)}, {"torch": info, "parameters": params}


def run(quick: bool = False, repeat: int = 3, profile: bool = False, models: list[str] | None = None) -> dict:
    size = "quick" if quick else "full"
    s = SIZES[size]
    c, f, h, w = latent_shape(size)
    tokens = f * (h // 2) * (w // 2)
    report = {"size": size, "shape": s, "results": {}, "rows": [], "profiles": {}}
    labels = {"dit": f"DiT forward ({s['layers']} layers, {tokens} tokens)",
              "vae": f"VAE decode {f} latent -> {s['frames']} frames {s['height']}x{s['width']}"}
    for model in models or ["dit", "vae"]:
        print(f"Wan 2.1 1.3B {labels[model]}, float32: latents {c}x{f}x{h}x{w}"
              + (f", {s['text_tokens']} text tokens" if model == "dit" else ""), flush=True)
        need = 2 * 6.5 * common.GB if model == "dit" and not quick else 0
        one_at_a_time = common.available_memory() < need
        if one_at_a_time:
            print(f"  {common.available_memory() / common.GB:.1f} GB available: the sides run one at a time")
        results = common.interleaved(__file__, ["mlx", "torch"], [model], repeat, ["--size", size, "--model", model],
                                     one_at_a_time=one_at_a_time, extra_calls=["profile"] if profile else [])
        print(f"  MLX: {results['mlx']['info']['blas']}, {results['mlx']['info']['parameters'] / 1e6:.0f} M "
              f"parameters; diffusers: {results['torch']['info']['torch']}, "
              f"{results['torch']['info']['parameters'] / 1e6:.0f} M")
        report["results"][model] = results
        report["rows"] += common.side_by_side(f"Wan 2.1 1.3B {model}, MLX vs diffusers ({size}; median of {repeat}, "
                                              "alternating)", results, {model: labels[model]})
        if profile:
            profiles = common.profile_tables(
                f"Where the {model}'s time goes, by op category ({size}; one profiled call per side)", results)
            report["profiles"][model] = profiles["quiet"]
            if "contention" in profiles:
                report["profiles"][f"{model} contention"] = profiles["contention"]
    print("goal: MLX no slower than diffusers")
    report["goals_met"] = common.verdict(report["rows"])
    return report


PROCESS_RUNS = True  # takes --processes / --contention (bench/run.py passes --processes)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 layers, 1 frame at 120x208")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per side (median reported)")
    parser.add_argument("--models", nargs="+", choices=["dit", "vae"], help="what to run (default: both)")
    parser.add_argument("--profile", action="store_true", help="also profile one call per side by op category")
    parser.add_argument("--json", type=Path, help="also write the results here")
    common.add_measure_options(parser)
    parser.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["dit", "vae"], default="dit", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        setup = _mlx_setup if args.worker == "mlx" else _torch_setup
        common.serve(lambda: setup(args.model, args.size))
        return {}
    with common.measuring(args.processes, args.contention):
        report = run(args.quick, args.repeat, args.profile, args.models)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
