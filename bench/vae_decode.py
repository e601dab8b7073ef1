"""The SD 1.5 VAE decoding an AnimateDiff clip: 16 frames of 32x32 latents to 256x256 RGB
(runwayml/stable-diffusion-v1-5 vae config, random weights, float32):

- MLX: vidport's `runtime.sd_vae.AutoencoderKL.decode(z, slice_size=1)`, one frame at a time as
  vidport's pipeline decodes by default (measured, the fastest and lightest on the CPU: 16 frames
  in one batch took 66-83 s and 9.8 GB here, in slices of 1 40-44 s and 1.2 GB);
- torch: diffusers' `AutoencoderKL.decode(z)` on the 16 frames, as the AnimateDiff pipeline
  decodes them.

Workers alternate call by call (bench/_common.py); the table reports medians, MLX/torch ratios
of time and peak RSS, and the RSS above each side's baseline (weights and latents resident).
Goal (issues 3, 17): MLX no slower than diffusers in every one of separate runs (`--processes`),
no worse than 1.2 with a busy second process (`--contention`), peak memory no higher.

    .venv/bin/python bench/vae_decode.py            # 16 frames, 32x32 latents
    .venv/bin/python bench/vae_decode.py --quick    # 4 frames, 16x16 latents
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# runwayml/stable-diffusion-v1-5 vae/config.json
SD15_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SIZES = {"full": {"frames": 16, "latent": 32}, "quick": {"frames": 4, "latent": 16}}
SLICE = 1  # what vidport's pipeline uses by default


def latents(size: str):
    import numpy as np

    s = SIZES[size]
    return np.random.default_rng(0).standard_normal((s["frames"], 4, s["latent"], s["latent"]), dtype=np.float32)


def _mlx_setup(size: str):
    blas = common.start_mlx()
    import mlx.core as mx

    from vidport.runtime.sd_vae import AutoencoderKL

    vae = AutoencoderKL.from_config(SD15_VAE)
    mx.eval(vae.parameters())
    z = mx.array(latents(size).transpose(0, 2, 3, 1))  # channels-last
    mx.eval(z)

    def decode():
        mx.eval(vae.decode(z, slice_size=SLICE))

    return {"decode": decode, "profile": lambda: common.mlx_profile(decode)}, {"blas": blas, "slice_size": SLICE}


def _torch_setup(size: str):
    info = common.start_torch()
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**{k: v for k, v in SD15_VAE.items()}).eval()
    z = torch.from_numpy(latents(size))

    def decode():
        vae.decode(z)

    return {"decode": decode, "profile": lambda: common.torch_profile(decode)}, {"torch": info}


def run(quick: bool = False, repeat: int = 3, profile: bool = False) -> dict:
    size = "quick" if quick else "full"
    s = SIZES[size]
    pixels = s["latent"] * 8
    print(f"SD 1.5 VAE decode, float32: {s['frames']} frames of {s['latent']}x{s['latent']} latents -> "
          f"{pixels}x{pixels} RGB", flush=True)
    results = common.interleaved(__file__, ["mlx", "torch"], ["decode"], repeat, ["--size", size],
                                 extra_calls=["profile"] if profile else [])
    print(f"  MLX: {results['mlx']['info']['blas']}; diffusers: {results['torch']['info']['torch']}")
    records = common.side_by_side(
        f"SD VAE decode, MLX vs diffusers ({size}; median of {repeat}, alternating)", results,
        {"decode": f"decode {s['frames']} x {pixels}^2"})
    print(f"  MLX: decode(z, slice_size={SLICE}); torch: all frames in one call")
    print("goal: MLX no slower than diffusers, peak RSS no higher")
    met = common.verdict(records)
    report = {"size": size, "shape": s, "results": results, "rows": records, "goals_met": met}
    if profile:
        profiles = common.profile_tables(
            f"Where the decode's time goes, by op category ({size}; one profiled decode per side)", results)
        report["profile"] = profiles["quiet"]
        if "contention" in profiles:
            report["profile_contention"] = profiles["contention"]
    return report


PROCESS_RUNS = True  # takes --processes / --contention (bench/run.py passes --processes)


def main(argv: list[str] | None = None) -> dict:
    return common.worker_main(argv, __doc__, "4 frames of 16x16 latents", SIZES, {"mlx": _mlx_setup, "torch": _torch_setup}, run)


if __name__ == "__main__":
    main()
