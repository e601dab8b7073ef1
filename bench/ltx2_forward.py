"""LTX-2 on this CPU, MLX vs diffusers, float32, random weights:

- one DiT forward at the real LTX-2 19B per-layer widths (video 32 heads x 128 = 4096, audio 32 x
  64 = 2048, cross-attention 4096 / 2048, caption 3840) with fewer blocks than the released 48
  (`--layers`, default 2: each block is 0.39 B parameters, 1.5 GB in float32 per side), on a short
  clip: 17 frames at 256x384 (3 x 8 x 12 = 288 video tokens), 0.7 s of audio (17 audio latent
  frames) and 128 text tokens: vidport's `runtime.ltx2.dit.LTX2VideoTransformer3DModel` vs
  diffusers' `LTX2VideoTransformer3DModel`;
- the LTX-2 video VAE (diffusers' defaults = the released structure, decoder not causal as the
  release) decoding 2 latent frames -> 9 frames of 256x384 RGB.

Each model runs in a worker process per side; the sides alternate call by call (bench/_common.py)
and the table reports medians, MLX/torch ratios of time and peak RSS. The DiT's projected time for
all 48 blocks is the measured time x 48 / layers (the embeddings and projections are a small
part; the projection says so). Goal (issue 11): MLX no slower than diffusers.

    .venv/bin/python bench/ltx2_forward.py            # 2 blocks at the real widths, 9-frame VAE decode
    .venv/bin/python bench/ltx2_forward.py --quick    # 1 block, 9 frames at 128x192; 1-frame decode
"""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from ltx2_convert import LTX2_19B  # noqa: E402

SIZES = {
    "full": {"layers": 2, "frames": 17, "height": 256, "width": 384, "audio_frames": 17, "text_tokens": 128,
             "vae_latent_frames": 2},
    "quick": {"layers": 1, "frames": 9, "height": 128, "width": 192, "audio_frames": 9, "text_tokens": 64,
              "vae_latent_frames": 1},
}
RELEASE_VAE = {"decoder_causal": False}  # what the LTX-2 release's vae/config.json changes from the defaults


def dit_config(layers: int) -> dict:
    """LTX-2.0's DiT config at the released widths with `layers` of its 48 blocks."""
    from fixtures.ltx2_dit import ltx2_config

    return ltx2_config("2.0", **{**LTX2_19B, "num_layers": layers, "rope_type": "split"})


def vae_config() -> dict:
    from diffusers import AutoencoderKLLTX2Video

    defaults = {n: p.default for n, p in inspect.signature(AutoencoderKLLTX2Video.__init__).parameters.items()
                if n != "self"}
    return {**defaults, **RELEASE_VAE, "spatial_compression_ratio": 32, "temporal_compression_ratio": 8}


def latent_grid(size: str) -> tuple[int, int, int]:
    s = SIZES[size]
    return (s["frames"] - 1) // 8 + 1, s["height"] // 32, s["width"] // 32


def inputs(size: str) -> dict:
    import numpy as np

    s, (f, h, w) = SIZES[size], latent_grid(size)
    rng = np.random.default_rng(0)
    return {"hidden_states": rng.standard_normal((1, f * h * w, 128), dtype=np.float32),
            "audio_hidden_states": rng.standard_normal((1, s["audio_frames"], 128), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, s["text_tokens"], 3840), dtype=np.float32),
            "audio_encoder_hidden_states": rng.standard_normal((1, s["text_tokens"], 3840), dtype=np.float32),
            "latents": rng.standard_normal((1, s["vae_latent_frames"], h, w, 128), dtype=np.float32)}


def _dit_arguments(size: str) -> dict:
    f, h, w = latent_grid(size)
    return {"num_frames": f, "height": h, "width": w, "fps": 24.0, "audio_num_frames": SIZES[size]["audio_frames"]}


def _mlx_setup(model: str, size: str):
    blas = common.start_mlx()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    data = {k: mx.array(v) for k, v in inputs(size).items()}
    if model == "dit":
        from vidport.runtime.ltx2.dit import LTX2VideoTransformer3DModel

        net = LTX2VideoTransformer3DModel.from_config(dit_config(SIZES[size]["layers"]))
        timestep = mx.array([500.0])

        def call():
            mx.eval(net(data["hidden_states"], data["audio_hidden_states"], data["encoder_hidden_states"],
                        data["audio_encoder_hidden_states"], timestep, audio_timestep=timestep, **_dit_arguments(size)))
    else:
        from vidport.runtime.ltx2.video_vae import AutoencoderKLLTX2Video

        net = AutoencoderKLLTX2Video.from_config(vae_config())

        def call():
            mx.eval(net.decode(data["latents"]))
    mx.eval(net.parameters())
    params = sum(v.size for _, v in tree_flatten(net.parameters()))
    return {model: call, "profile": lambda: common.mlx_profile(call)}, {"blas": blas, "parameters": params}


def _torch_setup(model: str, size: str):
    info = common.start_torch()
    import torch

    torch.manual_seed(0)
    data = {k: torch.from_numpy(v) for k, v in inputs(size).items()}
    if model == "dit":
        from diffusers import LTX2VideoTransformer3DModel

        net = LTX2VideoTransformer3DModel(**dit_config(SIZES[size]["layers"])).eval()
        timestep = torch.tensor([500.0])

        def call():
            with torch.no_grad():
                net(data["hidden_states"], data["audio_hidden_states"], data["encoder_hidden_states"],
                    data["audio_encoder_hidden_states"], timestep, audio_timestep=timestep, **_dit_arguments(size))
    else:
        from diffusers import AutoencoderKLLTX2Video

        net = AutoencoderKLLTX2Video(**{k: v for k, v in vae_config().items()
                                        if k not in ("spatial_compression_ratio", "temporal_compression_ratio")}).eval()
        latents = data["latents"].permute(0, 4, 1, 2, 3).contiguous()  # diffusers is channels-first

        def call():
            with torch.no_grad():
                net.decode(latents)
    params = sum(p.numel() for p in net.parameters())
    return {model: call, "profile": lambda: common.torch_profile(call)}, {"torch": info, "parameters": params}


def run(quick: bool = False, repeat: int = 3, profile: bool = False, models: list[str] | None = None) -> dict:
    size = "quick" if quick else "full"
    s = SIZES[size]
    f, h, w = latent_grid(size)
    report = {"size": size, "shape": s, "results": {}, "rows": [], "profiles": {}, "projected_48_blocks_s": {}}
    labels = {"dit": f"DiT forward ({s['layers']} of 48 blocks, {f * h * w} video + {s['audio_frames']} audio tokens)",
              "vae": f"video VAE decode {s['vae_latent_frames']} latent -> {1 + 8 * (s['vae_latent_frames'] - 1)} "
                     f"frames {s['height']}x{s['width']}"}
    for model in models or ["dit", "vae"]:
        print(f"LTX-2 {labels[model]}, float32", flush=True)
        need = 2 * (1.5 * s["layers"] + 1.6) * common.GB if model == "dit" else 2 * 5 * common.GB
        one_at_a_time = common.available_memory() < need
        if one_at_a_time:
            print(f"  {common.available_memory() / common.GB:.1f} GB available: the sides run one at a time")
        results = common.interleaved(__file__, ["mlx", "torch"], [model], repeat, ["--size", size, "--model", model],
                                     one_at_a_time=one_at_a_time, extra_calls=["profile"] if profile else [])
        print(f"  MLX: {results['mlx']['info']['blas']}, {results['mlx']['info']['parameters'] / 1e6:.0f} M "
              f"parameters; diffusers: {results['torch']['info']['torch']}, "
              f"{results['torch']['info']['parameters'] / 1e6:.0f} M")
        report["results"][model] = results
        report["rows"] += common.side_by_side(f"LTX-2 {model}, MLX vs diffusers ({size}; median of {repeat}, "
                                              "alternating)", results, {model: labels[model]})
        if model == "dit":
            scale = 48 / s["layers"]
            mlx_s, torch_s = (results[side]["summary"]["dit"]["wall_s"] * scale for side in ("mlx", "torch"))
            report["projected_48_blocks_s"] = {"mlx": mlx_s, "torch": torch_s}
            print(f"  projected, all 48 blocks at these sizes: MLX {mlx_s:.0f} s, diffusers {torch_s:.0f} s "
                  f"(measured x {scale:.0f}; the embeddings are counted {scale:.0f} times: an upper bound)")
        if profile:
            report["profiles"][model] = common.profile_table(
                f"Where the {model}'s time goes, by op category ({size}; one profiled call per side)",
                results["mlx"]["extra"]["profile"], results["torch"]["extra"]["profile"])
    print("goal: MLX no slower than diffusers")
    report["goals_met"] = common.verdict(report["rows"])
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 block, 9 frames at 128x192; 1-frame decode")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per side (median reported)")
    parser.add_argument("--models", nargs="+", choices=["dit", "vae"], help="what to run (default: both)")
    parser.add_argument("--profile", action="store_true", help="also profile one call per side by op category")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=["dit", "vae"], default="dit", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        setup = _mlx_setup if args.worker == "mlx" else _torch_setup
        common.serve(lambda: setup(args.model, args.size))
        return {}
    report = run(args.quick, args.repeat, args.profile, args.models)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
