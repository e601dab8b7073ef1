"""Conversion benchmark: a full-size AnimateDiff v2 motion module (mm_sd_v15_v2 shapes, random
weights, original key layout, torch zip `.ckpt`, about 1.8 GB float32) converted by

- vidport's streaming route: `plan_conversion(ckpt, "mlx")` then `convert(plan, out)`;
- the naive route a hand-written converter takes: `torch.load` everything, rename the keys with
  diffusers' own `convert_animatediff_checkpoint_to_diffusers`, `safetensors.torch.save_file`;
- vidport again with `--dtype bfloat16`;
- a plain file copy of the checkpoint: no conversion, the I/O floor on this disk.

Each route runs in a fresh subprocess, so its peak RSS is its own. The child records its RSS right
after its imports (the baseline) and `getrusage(RUSAGE_SELF).ru_maxrss` when it is done; "above
baseline" is the difference: the memory the conversion itself needed.

Target for vidport: peak RSS at most 1 GB above the interpreter's baseline, wall time no worse than
the naive route.

    .venv/bin/python bench/convert_motion.py            # full size, 3 runs per route (checkpoint cached in bench-output/)
    .venv/bin/python bench/convert_motion.py --quick    # a fifth of the widths (~70 MB), seconds
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

ROOT, OUTPUT, MB = common.ROOT, common.OUTPUT, common.MB
TARGET_ABOVE_BASELINE_MB = 1024

# diffusers MotionAdapter's default config == mm_sd_v15_v2; --quick keeps the structure, a fifth of the widths.
SIZES = {
    "full": {"block_out_channels": [320, 640, 1280, 1280]},
    "quick": {"block_out_channels": [64, 128, 256, 256]},  # ~70 MB
}

ROUTES = {
    "vidport": "vidport streaming (mlx, float32)",
    "naive": "naive torch.load + diffusers rename + save_file",
    "vidport-bf16": "vidport streaming (mlx, --dtype bfloat16)",
    "copy": "shutil.copyfile of the checkpoint (no conversion: the I/O floor)",
}


# ---------------------------------------------------------------------------------------------
# child side: one route, one process


def _child(route: str, ckpt: Path, out: Path) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    sys.path.insert(0, str(ROOT))
    # Imports first (everything the route will import, so the baseline is the interpreter + libraries).
    if route.startswith("vidport"):
        import vidport.runtime.animatediff_motion  # noqa: F401  (plan_conversion builds the MLX model to check shapes)
        import vidport.runtime.registry  # noqa: F401
        from vidport.converter.convert import convert, plan_conversion
    elif route == "naive":
        import torch
        from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
        from safetensors.torch import save_file

    def work() -> tuple[float | None, int]:
        if route == "copy":
            out.mkdir(parents=True)
            shutil.copyfile(ckpt, out / ckpt.name)
            return None, 0
        if route.startswith("vidport"):
            plan = plan_conversion(ckpt, "mlx", dtype="bfloat16" if route == "vidport-bf16" else None)
            planned = time.perf_counter()
            return planned, convert(plan, out)["tensors"]
        state = torch.load(ckpt, map_location="cpu")
        planned = time.perf_counter()
        state = convert_animatediff_checkpoint_to_diffusers(state)
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "diffusion_pytorch_model.safetensors"))
        return planned, len(state)

    return {"route": route, **common.measure_route(out, work)}


def _build_child(path: Path, size: str) -> dict:
    """Write the checkpoint with the reference fixtures (diffusers MotionAdapter, renamed to the
    original AnimateDiff key layout, pos_encoder tables included)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from fixtures.motion import motion_adapter_config, original_motion_state_dict, random_motion_adapter

    config = motion_adapter_config("v2", **SIZES[size])
    model = random_motion_adapter(config, seed=0)
    state = original_motion_state_dict(model)
    del model
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
    largest = max(state.items(), key=lambda kv: kv[1].numel() * kv[1].element_size())
    info = {"config": config, "tensors": len(state), "parameters": sum(v.numel() for v in state.values()),
            "bytes": path.stat().st_size, "largest_key": largest[0], "largest_shape": list(largest[1].shape),
            "largest_bytes": largest[1].numel() * largest[1].element_size()}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info


# ---------------------------------------------------------------------------------------------
# parent side


def checkpoint(size: str, rebuild: bool = False) -> tuple[Path, dict]:
    """The cached benchmark checkpoint (built on first use) and its description."""
    OUTPUT.mkdir(exist_ok=True)
    path = OUTPUT / f"mm_sd_v15_v2-random-{size}.ckpt"
    meta = path.with_suffix(".json")
    if rebuild or not path.exists() or not meta.exists():
        print(f"building {path.relative_to(ROOT)} (once; cached afterwards) ...", flush=True)
        start = time.perf_counter()
        common.run_child(__file__, ["--build", str(path), "--size", size], timeout=1200)
        print(f"  built in {time.perf_counter() - start:.1f} s", flush=True)
    return path, json.loads(meta.read_text())


def run(quick: bool = False, repeat: int = 3, routes: list[str] | None = None, rebuild: bool = False) -> dict:
    size = "quick" if quick else "full"
    ckpt, info = checkpoint(size, rebuild)
    print(f"checkpoint: {ckpt.relative_to(ROOT)}: {info['bytes'] / MB:.1f} MB, {info['tensors']} tensors, "
          f"{info['parameters'] / 1e6:.1f} M parameters (float32), block_out_channels "
          f"{info['config']['block_out_channels']}")
    print(f"largest tensor: {info['largest_key']} {info['largest_shape']}: {info['largest_bytes'] / MB:.1f} MB")
    results = common.run_routes(__file__, ckpt, routes or list(ROUTES), repeat)
    common.routes_table(f"AnimateDiff v2 motion module -> safetensors ({size} size, {info['bytes'] / MB:.0f} MB .ckpt, "
                        f"largest tensor {info['largest_bytes'] / MB:.0f} MB; median of {repeat})", results, ROUTES,
                        "vidport's plan_conversion (catalog, detection, every check) or naive's torch.load")

    verdict = common.routes_verdict(results, TARGET_ABOVE_BASELINE_MB * MB, "1 GB")
    if "copy" in results:
        print(f"  (copy: reading + writing {info['bytes'] / MB:.0f} MB with no conversion at all, "
              f"{results['copy']['wall_s']:.2f} s here: the floor for any route that writes float32)")
    return {"checkpoint": info, "results": results, "targets_met": verdict}


def main(argv: list[str] | None = None) -> dict:
    return common.conversion_main(argv, __doc__, ROUTES, SIZES, "a fifth of the widths (a ~70 MB checkpoint)", _build_child, _child, run)


if __name__ == "__main__":
    main()
