"""One AnimateDiff denoising step: the SD 1.5 UNet with the v2 motion modules (mm_sd_v15_v2:
diffusers' `UNetMotionModel.from_unet2d(UNet2DConditionModel(**sd15), MotionAdapter())`, 1.3 B
parameters, float32), classifier-free guidance batch 2 x 8 frames, 32x32 latents (a 256x256
video), 77 text tokens per frame:

- MLX: vidport's `runtime.unet_motion.UNetMotionModel.from_configs(sd15, adapter)` with MLX's own
  random initialisation;
- torch: diffusers' `UNetMotionModel` with its own random initialisation.

Weights differ (timing needs only equal shapes and dtypes: float32 on both sides). Each side runs
in a worker process of its own; the calls alternate MLX, torch, MLX, ... (bench/_common.py), and
the table reports medians, the MLX/torch ratios of time and of peak RSS, and RSS above each
side's baseline (model and inputs resident): the activations' memory.

Goal (issues 3, 17): MLX no slower than diffusers (time ratio <= 1.0) in every one of separate
runs (`--processes`), no worse than 1.2 with a busy second process (`--contention`), peak
memory no higher.

    .venv/bin/python bench/unet_step.py            # full size, 3 steps per side
    .venv/bin/python bench/unet_step.py --quick    # a fifth of the widths, 16x16 latents (seconds)
    .venv/bin/python bench/unet_step.py --quick --processes 3 --contention --profile
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15 = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# diffusers MotionAdapter() defaults == guoyww/animatediff-motion-adapter-v1-5-2 (mm_sd_v15_v2)
ADAPTER = {
    "block_out_channels": [320, 640, 1280, 1280], "motion_layers_per_block": 2,
    "motion_transformer_layers_per_block": 1, "motion_mid_block_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": 1, "motion_num_attention_heads": 8, "motion_norm_num_groups": 32,
    "motion_max_seq_length": 32, "use_motion_mid_block": True,
}
SIZES = {
    # batch (CFG), frames, latent side, widths, text tokens
    "full": {"batch": 2, "frames": 8, "latent": 32, "widths": [320, 640, 1280, 1280], "tokens": 77},
    "quick": {"batch": 2, "frames": 8, "latent": 16, "widths": [64, 128, 256, 256], "tokens": 77},
}


def configs(size: str) -> tuple[dict, dict]:
    widths = SIZES[size]["widths"]
    return {**SD15, "block_out_channels": widths}, {**ADAPTER, "block_out_channels": widths}


def inputs(size: str):
    """Seeded numpy inputs, the same on both sides: latents (B, C, F, H, W), text (B*F, 77, 768)."""
    import numpy as np

    s = SIZES[size]
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((s["batch"], 4, s["frames"], s["latent"], s["latent"]), dtype=np.float32)
    text = rng.standard_normal((s["batch"] * s["frames"], s["tokens"], SD15["cross_attention_dim"]), dtype=np.float32)
    return sample, 500.0, text


def _mlx_setup(size: str):
    blas = common.start_mlx()
    import mlx.core as mx

    from vidport.runtime.unet_motion import UNetMotionModel

    unet_config, adapter_config = configs(size)
    model = UNetMotionModel.from_configs(unet_config, adapter_config)
    mx.eval(model.parameters())  # MLX initialises lazily: materialise the weights before the baseline
    sample, t, text = inputs(size)
    sample, text = mx.array(sample), mx.array(text)
    mx.eval(sample, text)
    params = sum(v.size for _, v in _flatten(model.parameters()))

    def step():
        mx.eval(model(sample, t, text))

    return {"step": step, "profile": lambda: common.mlx_profile(step)}, \
        {"blas": blas, "parameters": params, "dtype": str(model.dtype)}


def _flatten(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _torch_setup(size: str):
    info = common.start_torch()
    import torch
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    unet_config, adapter_config = configs(size)
    unet = UNet2DConditionModel(**unet_config)
    model = UNetMotionModel.from_unet2d(unet, MotionAdapter(**adapter_config)).eval()
    del unet
    sample, t, text = (torch.from_numpy(x) if not isinstance(x, float) else x for x in inputs(size))
    params = sum(p.numel() for p in model.parameters())

    def step():
        model(sample, t, encoder_hidden_states=text)

    return {"step": step, "profile": lambda: common.torch_profile(step)}, {"torch": info, "parameters": params, "dtype": str(next(model.parameters()).dtype)}


def run(quick: bool = False, repeat: int = 3, profile: bool = False) -> dict:
    size = "quick" if quick else "full"
    s = SIZES[size]
    print(f"UNetMotionModel (SD 1.5 + v2 motion modules, widths {s['widths']}), float32: batch {s['batch']} x "
          f"{s['frames']} frames, {s['latent']}x{s['latent']} latents, {s['tokens']} text tokens", flush=True)
    results = common.interleaved(__file__, ["mlx", "torch"], ["step"], repeat, ["--size", size],
                                 extra_calls=["profile"] if profile else [])
    print(f"  MLX: {results['mlx']['info']['blas']}; {results['mlx']['info']['parameters'] / 1e6:.0f} M parameters; "
          f"diffusers: {results['torch']['info']['torch']}, {results['torch']['info']['parameters'] / 1e6:.0f} M")
    records = common.side_by_side(
        f"One denoising step, MLX vs diffusers ({size}; median of {repeat}, alternating)", results,
        {"step": f"UNet+motion step {s['batch']}x{s['frames']}x{s['latent']}^2"})
    print("goal: MLX no slower than diffusers, peak RSS no higher")
    met = common.verdict(records)
    report = {"size": size, "shape": s, "results": results, "rows": records, "goals_met": met}
    if profile:
        profiles = common.profile_tables(
            f"Where the step's time goes, by op category ({size}; one profiled step per side)", results)
        report["profile"] = profiles["quiet"]
        if "contention" in profiles:
            report["profile_contention"] = profiles["contention"]
        print("  MLX: each op evaluated on its own (inputs first, off the clock); torch: torch.profiler, inclusive "
              "CPU time of the top-level aten ops; other = total - the categories")
    return report


PROCESS_RUNS = True  # takes --processes / --contention (bench/run.py passes --processes)


def main(argv: list[str] | None = None) -> dict:
    return common.worker_main(argv, __doc__, "a fifth of the widths, 16x16 latents", SIZES, {"mlx": _mlx_setup, "torch": _torch_setup}, run)


if __name__ == "__main__":
    main()
