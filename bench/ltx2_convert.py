"""Conversion benchmark: the LTX-2 19B DiT at its real widths (video 32 x 128 channels, audio
32 x 64, cross-attention 4096 / 2048, the official key names under `model.diffusion_model.`,
random bfloat16 weights, release-style safetensors shards with an `.index.json`) converted by

- vidport's streaming route: `plan_conversion(index_json, "mlx", "ltx2-dit")` then `convert(plan, out)`;
- the naive route a hand-written converter takes: load every shard with `safetensors.torch`,
  rename with diffusers' own `convert_ltx2_transformer_to_diffusers`, `save_file`;
- a plain copy of the shards: no conversion, the I/O floor on this disk.

The real model has 48 blocks (18.9 B parameters, 37.8 GB in bfloat16). This machine has 24 GB of
RAM and ~70 GB of free disk, so:

- `--blocks large`: 24 of the 48 blocks (9.6 B parameters, 19 GB): vidport and copy only; the naive
  route holds the whole checkpoint and its serialized copy (about twice 19 GB) and cannot run here;
- `--blocks full` (default): 8 blocks (3.8 B parameters, 7.6 GB): every route, naive included;
- `--quick`: 1 block (1.5 GB), seconds.

Each route runs in a fresh subprocess, so its peak RSS is its own; the routes alternate round by
round. Target (issue 11): peak RSS above baseline bounded by the largest tensor plus a small
constant (largest tensor + 256 MB) at every size, wall time no worse than the naive route.
The checkpoint is cached in bench-output/ between runs; `--clean` deletes it at the end.

    .venv/bin/python bench/ltx2_convert.py                      # 8 blocks, 3 runs per route
    .venv/bin/python bench/ltx2_convert.py --blocks large --repeat 1 --routes vidport copy --clean
    .venv/bin/python bench/ltx2_convert.py --quick
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

ROOT, OUTPUT, MB = common.ROOT, common.OUTPUT, common.MB
CONSTANT_MB = 256
# diffusers' LTX-2 19B transformer (the widths of scripts/convert_ltx2_to_diffusers.py version "2.0")
LTX2_19B = {"in_channels": 128, "out_channels": 128, "num_attention_heads": 32, "attention_head_dim": 128,
            "cross_attention_dim": 4096, "audio_in_channels": 128, "audio_out_channels": 128,
            "audio_num_attention_heads": 32, "audio_attention_head_dim": 64, "audio_cross_attention_dim": 2048,
            "caption_channels": 3840, "num_layers": 48}
SIZES = {"large": {"num_layers": 24, "shards": 8}, "full": {"num_layers": 8, "shards": 4},
         "quick": {"num_layers": 1, "shards": 2}}
ROUTES = {
    "vidport": "vidport streaming (plan_conversion + convert, mlx, bfloat16 kept)",
    "naive": "naive safetensors.torch.load_file of every shard + diffusers rename + save_file",
    "copy": "shutil.copyfile of the shards (no conversion: the I/O floor)",
}


def _build_child(folder: Path, size: str) -> dict:
    """diffusers' model on the meta device gives the names and shapes; the official names come
    from fixtures.ltx2_dit.to_original_key."""
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers import LTX2VideoTransformer3DModel

    from fixtures.ltx2_dit import ltx2_config, to_original_key

    config = ltx2_config("2.0", **{**LTX2_19B, "num_layers": SIZES[size]["num_layers"]})
    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**config)
    shapes = {to_original_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    return common.write_random_shards(folder, shapes, SIZES[size]["shards"], "ltx-2-19b-dev", config)


def checkpoint(size: str, rebuild: bool = False) -> tuple[Path, dict]:
    return common.cached_checkpoint(__file__, f"ltx2-19b-dit-original-bf16-random-{size}", size, rebuild, timeout=3600)


def _child(route: str, folder: Path, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    import vidport.runtime.ltx2.dit  # noqa: F401  (plan_conversion builds the MLX model to check shapes)
    import vidport.runtime.registry  # noqa: F401
    from diffusers.loaders.single_file_utils import convert_ltx2_transformer_to_diffusers

    from vidport.converter.convert import plan_conversion

    return common.shards_route(route, folder, out, "ltx-2-19b-dev",
                               lambda index: plan_conversion(index, "mlx", "ltx2-dit", overrides=dict(HEADS)),
                               convert_ltx2_transformer_to_diffusers)


HEADS = {"num_attention_heads": 32, "audio_num_attention_heads": 32}  # what a release's variant table gives


def run(quick: bool = False, repeat: int = 3, routes: list[str] | None = None, rebuild: bool = False,
        blocks: str = "full", clean: bool = False) -> dict:
    size = "quick" if quick else blocks
    routes = routes or [r for r in ROUTES if not (size == "large" and r == "naive")]
    folder, info = checkpoint(size, rebuild)
    print(f"checkpoint: {folder.relative_to(ROOT)}: {info['bytes'] / MB:.0f} MB in {info['shards']} shards, "
          f"{info['tensors']} tensors, {info['parameters'] / 1e9:.2f} B parameters (bfloat16), "
          f"{info['config']['num_layers']} of 48 blocks")
    print(f"largest tensor: {info['largest_key']} {info['largest_shape']}: {info['largest_bytes'] / MB:.1f} MB")
    try:
        results = common.run_routes(__file__, folder, routes, repeat)
    finally:
        if clean:
            shutil.rmtree(folder, ignore_errors=True)
    common.routes_table(f"LTX-2 19B DiT ({info['config']['num_layers']} of 48 blocks), original bf16 shards -> MLX "
                        f"({info['bytes'] / MB:.0f} MB, largest tensor {info['largest_bytes'] / MB:.1f} MB; median of "
                        f"{repeat})", results, ROUTES,
                        "vidport's plan_conversion (catalog, detection, every check) or naive's load_file of the shards")
    verdict = common.routes_verdict(results, info["largest_bytes"] + CONSTANT_MB * MB,
                                    f"the largest tensor + {CONSTANT_MB} MB")
    per_block = results.get("vidport", {}).get("wall_s", 0) / max(1, info["config"]["num_layers"])
    if per_block:
        print(f"projected vidport wall time for all 48 blocks at this disk's speed: {per_block * 48:.0f} s "
              "(linear in the blocks; the embeddings add a little)")
    return {"checkpoint": info, "results": results, "targets_met": verdict}


def main(argv: list[str] | None = None) -> dict:
    options = {"--blocks": {"choices": ["large", "full"], "default": "full",
                            "help": "large: 24 of the 48 blocks (19 GB; naive cannot run); full: 8 blocks, every route"},
               "--clean": {"action": "store_true", "help": "delete the generated checkpoint at the end"}}
    return common.conversion_main(argv, __doc__, ROUTES, SIZES, "1 of the 48 blocks (~1.5 GB)", _build_child, _child,
                                  run, options)


if __name__ == "__main__":
    main()
