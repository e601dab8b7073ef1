"""Conversion benchmark: a full-size Wan 2.1 T2V 1.3B DiT checkpoint (the real 1.3B shapes and the
official Wan key names, random bfloat16 weights, release-style safetensors shards with an
`.index.json`, about 2.8 GB) converted by

- vidport's streaming route: `plan_conversion(index_json, "mlx")` then `convert(plan, out)`;
- the naive route a hand-written converter takes: load every shard with `safetensors.torch`,
  rename the keys with diffusers' own `convert_wan_transformer_to_diffusers`, `save_file`;
- a plain copy of the shards: no conversion, the I/O floor on this disk.

Each route runs in a fresh subprocess, so its peak RSS is its own; the routes alternate round by
round. The child records its RSS right after its imports (the baseline) and its peak RSS when it
is done; "above baseline" is what the conversion itself needed.

Target (issue 5): peak RSS above baseline bounded by the largest tensor plus a small constant
(here: largest tensor + 256 MB), wall time no worse than the naive route.

    .venv/bin/python bench/wan_convert.py            # full size, 3 runs per route (checkpoint cached in bench-output/)
    .venv/bin/python bench/wan_convert.py --quick    # 2 of the 30 blocks (~0.3 GB), seconds
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from wan_forward import WAN_1_3B  # noqa: E402

ROOT, OUTPUT, MB = common.ROOT, common.OUTPUT, common.MB
CONSTANT_MB = 256
SIZES = {"full": {"num_layers": 30, "shards": 3}, "quick": {"num_layers": 2, "shards": 2}}
ROUTES = {
    "vidport": "vidport streaming (plan_conversion + convert, mlx, bfloat16 kept)",
    "naive": "naive safetensors.torch.load_file of every shard + diffusers rename + save_file",
    "copy": "shutil.copyfile of the shards (no conversion: the I/O floor)",
}


# ---------------------------------------------------------------------------------------------
# the checkpoint


def _build_child(folder: Path, size: str) -> dict:
    """diffusers' model on the meta device gives the names and shapes, the official names come
    from fixtures.wan_dit.to_native_key; the shards are written by common.write_random_shards."""
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers import WanTransformer3DModel

    from fixtures.wan_dit import to_native_key

    config = {**WAN_1_3B, "num_layers": SIZES[size]["num_layers"]}
    with torch.device("meta"):
        model = WanTransformer3DModel(**config)
    shapes = {to_native_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    return common.write_random_shards(folder, shapes, SIZES[size]["shards"], "diffusion_pytorch_model", config)


def checkpoint(size: str, rebuild: bool = False) -> tuple[Path, dict]:
    return common.cached_checkpoint(__file__, f"wan2.1-t2v-1.3b-native-bf16-random-{size}", size, rebuild)


# ---------------------------------------------------------------------------------------------
# one route, one process


def _child(route: str, folder: Path, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    import vidport.runtime.registry  # noqa: F401  (plan_conversion builds the MLX model to check shapes)
    import vidport.runtime.wan_dit  # noqa: F401
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    from vidport.converter.convert import plan_conversion

    return common.shards_route(route, folder, out, "diffusion_pytorch_model", lambda index: plan_conversion(index, "mlx"),
                               convert_wan_transformer_to_diffusers)


# ---------------------------------------------------------------------------------------------
# parent side


def run(quick: bool = False, repeat: int = 3, routes: list[str] | None = None, rebuild: bool = False) -> dict:
    size = "quick" if quick else "full"
    folder, info = checkpoint(size, rebuild)
    print(f"checkpoint: {folder.relative_to(ROOT)}: {info['bytes'] / MB:.0f} MB in {info['shards']} shards, "
          f"{info['tensors']} tensors, {info['parameters'] / 1e6:.0f} M parameters (bfloat16), "
          f"{info['config']['num_layers']} blocks")
    print(f"largest tensor: {info['largest_key']} {info['largest_shape']}: {info['largest_bytes'] / MB:.1f} MB "
          f"(bfloat16; {info['largest_bytes_float32'] / MB:.1f} MB as float32)")
    results = common.run_routes(__file__, folder, routes or list(ROUTES), repeat)
    common.routes_table(f"Wan 2.1 T2V 1.3B DiT, native bf16 shards -> MLX safetensors ({size}; {info['bytes'] / MB:.0f} MB, "
                        f"largest tensor {info['largest_bytes'] / MB:.1f} MB; median of {repeat})", results, ROUTES,
                        "vidport's plan_conversion (catalog, detection, every check) or naive's load_file of the shards")
    verdict = common.routes_verdict(results, info["largest_bytes"] + CONSTANT_MB * MB,
                                    f"the largest tensor + {CONSTANT_MB} MB")
    return {"checkpoint": info, "results": results, "targets_met": verdict}


def main(argv: list[str] | None = None) -> dict:
    return common.conversion_main(argv, __doc__, ROUTES, SIZES, "2 of the 30 blocks (~0.3 GB)", _build_child, _child, run)


if __name__ == "__main__":
    main()
