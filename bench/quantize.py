"""Quantized MLX outputs on this CPU (issue 14): the Wan 2.1 T2V 1.3B DiT at its real per-layer
widths (12 heads x 128, ffn 8960, text dim 4096; wan_forward.WAN_1_3B) with random weights, saved
once as a float32 Diffusers transformer folder (bench-output/, cached) and converted to MLX as

- float32 (`vidport convert wan-dit SRC`: the unquantized MLX baseline),
- bfloat16 (`--dtype bfloat16`: the "16 bits" row),
- affine 8-bit and 4-bit in groups of 64 (`--quantize 8|4`), and mxfp4 (`--quantize 4 --q-mode mxfp4`):
  the blocks' linears quantized as the wan-dit family declares, everything else kept float32.

For each format: the weights (parameter bytes resident, MLX's active memory after `load_model`,
bytes on disk), the peak RSS and wall time of one DiT forward, its output's PCC against diffusers'
float32 forward on the same input, and the conversion's wall time (float32 source -> each format,
each run in a fresh process: bench/_common.run_routes). Every side runs in a worker process of its
own and the sides alternate call by call (bench/_common.interleaved); diffusers float32 on the
same weights is the reference in the same run.

A run holds `--layers` of the 30 blocks (default 1: MLX's quantized matrix products on this CPU
take tens of seconds per block). Figures for all 30 are projected linearly in blocks, the rest as
measured: time = non-block part (timed on its own, the blocks removed) + blocks x 30 / layers;
weights = non-block bytes + block bytes x 30 / layers; peak RSS = measured peak + the weights the
other blocks would add; conversion = plan + writing x (30-block source bytes / measured source bytes), run by run.

    .venv/bin/python bench/quantize.py              # 1 block, 1 frame at 240x416 (390 tokens), 512 text tokens
    .venv/bin/python bench/quantize.py --layers 2   # more blocks measured (slower; the projection leans less)
    .venv/bin/python bench/quantize.py --quick      # 1 block, 1 frame at 120x208 (91 tokens), 128 text tokens
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import wan_forward  # noqa: E402
from wan_forward import WAN_1_3B  # noqa: E402

ROOT, OUTPUT, MB, GB = common.ROOT, common.OUTPUT, common.MB, common.GB
RELEASE_LAYERS = WAN_1_3B["num_layers"]
SIZES = {
    "full": {"frames": 1, "height": 240, "width": 416, "text_tokens": 512},
    "quick": {"frames": 1, "height": 120, "width": 208, "text_tokens": 128},
}
# MLX side -> the conversion that makes its folder from the float32 source: --dtype, (--quantize, --q-group-size, --q-mode)
FORMATS = {
    "float32": {"dtype": None, "quantize": None, "label": "MLX float32 (unquantized baseline)"},
    "bfloat16": {"dtype": "bfloat16", "quantize": None, "label": "MLX bfloat16 (16 bits)"},
    "q8": {"dtype": None, "quantize": (8, 64, "affine"), "label": "MLX affine 8-bit g64"},
    "q4": {"dtype": None, "quantize": (4, 64, "affine"), "label": "MLX affine 4-bit g64"},
    "mxfp4": {"dtype": None, "quantize": (4, 32, "mxfp4"), "label": "MLX mxfp4 g32"},
}
REFERENCE = "diffusers"


def inputs(size: str):
    return wan_forward.inputs(size, SIZES)


def converted(source: Path, fmt: str) -> Path:
    return source.with_name(f"{source.name}-mlx-{fmt}")


def outputs_dir(source: Path) -> Path:
    return source.with_name(f"{source.name}-outputs")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# the source and its conversions (child processes)


def _build_child(folder: Path, layers: int) -> dict:
    """A float32 Diffusers transformer folder (`save_pretrained`) of random unit-scale weights
    (fixtures.wan_dit.random_wan_transformer), written into a partial folder renamed at the end."""
    from fixtures.wan_dit import random_wan_transformer

    config = {**WAN_1_3B, "num_layers": layers}
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model = random_wan_transformer(config, seed=0)
    model.save_pretrained(str(partial))
    parameters = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
    blocks = sum(b for k, b in parameters.items() if k.startswith("blocks."))
    info = {"config": config, "layers": layers, "bytes": folder_bytes(partial), "parameter_bytes": sum(parameters.values()),
            "block_bytes": blocks, "parameters": sum(p.numel() for p in model.parameters())}
    (partial / "bench-info.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return info


def _convert_child(fmt: str, source: Path, out: Path) -> dict:
    """One conversion, float32 source -> `fmt`, in this fresh process (plan_conversion + convert)."""
    import vidport.runtime.registry  # noqa: F401  (plan_conversion builds the MLX model to check shapes)
    import vidport.runtime.wan_dit  # noqa: F401
    from vidport.converter.convert import convert, plan_conversion
    from vidport.converter.quantize import QuantFormat

    spec = FORMATS[fmt]
    quantize = QuantFormat.parse(*spec["quantize"]) if spec["quantize"] else None

    def work() -> tuple[float, int]:
        plan = plan_conversion(source, "mlx", "wan-dit", spec["dtype"], quantize=quantize)
        planned = time.perf_counter()
        return planned, convert(plan, out)["tensors"]

    return {"route": fmt, **common.measure_route(out, work)}


# ---------------------------------------------------------------------------------------------
# workers: one per format and one for diffusers


def _mlx_setup(fmt: str, size: str, source: Path):
    blas = common.start_mlx()
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from vidport.runtime.loading import load_model

    folder = converted(source, fmt)
    net = load_model(folder)
    mx.eval(net.parameters())
    active = mx.get_active_memory()
    parameters = {k: v.nbytes for k, v in tree_flatten(net.parameters())}
    latents, text = inputs(size)
    z, context, timestep = mx.array(latents.transpose(0, 2, 3, 4, 1)), mx.array(text), mx.array([500.0])
    mx.eval(z, context)
    held = {}

    def forward():
        held["out"] = net(z, timestep, context)
        mx.eval(held["out"])

    def rest():  # everything but the blocks: embedders, patchify, head
        blocks, net.blocks = net.blocks, []
        try:
            mx.eval(net(z, timestep, context))
        finally:
            net.blocks = blocks

    def save():
        np.save(outputs_dir(source) / f"{fmt}.npy", np.array(held["out"].astype(mx.float32)).transpose(0, 4, 1, 2, 3))

    info = {"blas": blas, "active_bytes": active, "parameter_bytes": sum(parameters.values()),
            "block_bytes": sum(b for k, b in parameters.items() if k.startswith("blocks.")),
            "disk_bytes": folder_bytes(folder)}
    return {"forward": forward, "rest": rest, "save": save}, info


def _torch_setup(size: str, source: Path):
    info = common.start_torch()
    import numpy as np
    import torch
    from diffusers import WanTransformer3DModel

    net = WanTransformer3DModel.from_pretrained(str(source), torch_dtype=torch.float32).eval()
    parameters = {k: v.numel() * v.element_size() for k, v in net.state_dict().items()}
    latents, text = (torch.from_numpy(a) for a in inputs(size))
    timestep = torch.tensor([500.0])
    held = {}

    def forward():
        held["out"] = net(latents, timestep, text, return_dict=False)[0]

    def rest():
        blocks, net.blocks = net.blocks, torch.nn.ModuleList()
        try:
            net(latents, timestep, text, return_dict=False)
        finally:
            net.blocks = blocks

    def save():
        np.save(outputs_dir(source) / f"{REFERENCE}.npy", held["out"].numpy())

    info = {"torch": info, "parameter_bytes": sum(parameters.values()),
            "block_bytes": sum(b for k, b in parameters.items() if k.startswith("blocks.")),
            "disk_bytes": folder_bytes(source)}
    return {"forward": forward, "rest": rest, "save": save}, info


# ---------------------------------------------------------------------------------------------
# parent side


def source_checkpoint(layers: int, rebuild: bool) -> tuple[Path, dict]:
    name = f"wan2.1-t2v-1.3b-diffusers-f32-random-{layers}l"
    if rebuild:
        for fmt in FORMATS:
            shutil.rmtree(converted(OUTPUT / name, fmt), ignore_errors=True)
    return common.cached_checkpoint(__file__, name, "full", rebuild, args=["--layers", str(layers)])


def project(layers: int, per_block: float, rest: float) -> float:
    """A figure for all 30 blocks from one measured at `layers`: rest + (measured - rest) x 30 / layers."""
    return rest + (per_block - rest) * RELEASE_LAYERS / layers


def run(quick: bool = False, repeat: int = 3, convert_repeat: int = 3, layers: int = 1,
        formats: list[str] | None = None, rebuild: bool = False) -> dict:
    import numpy as np

    from vidport.golden.metrics import compare

    size = "quick" if quick else "full"
    s, formats = SIZES[size], formats or list(FORMATS)
    c, f, h, w = wan_forward.latent_shape(size, SIZES)
    tokens = f * (h // 2) * (w // 2)
    source, info = source_checkpoint(layers, rebuild)
    print(f"source: {source.relative_to(ROOT)}: {info['bytes'] / MB:.0f} MB float32, {info['parameters'] / 1e6:.0f} M "
          f"parameters, {layers} of the {RELEASE_LAYERS} blocks at the real 1.3B widths", flush=True)

    print(f"conversion, float32 source -> each format (a fresh process per run, median of {convert_repeat}):", flush=True)
    conversions = common.run_routes(__file__, source, formats, convert_repeat)
    for fmt in formats:  # the folders the forwards load (cached)
        if not converted(source, fmt).exists():
            common.run_child(__file__, ["--route", fmt, str(source), str(converted(source, fmt))])

    print(f"one DiT forward: latents {c}x{f}x{h}x{w} ({s['frames']} frame at {s['height']}x{s['width']}, {tokens} "
          f"tokens), {s['text_tokens']} text tokens, float32 activations", flush=True)
    outputs_dir(source).mkdir(exist_ok=True)
    sides = [REFERENCE, *formats]
    one_at_a_time = common.available_memory() < len(sides) * (2 * info["bytes"] + GB)
    results = common.interleaved(__file__, sides, ["forward", "rest"], repeat,
                                 ["--size", size, "--source", str(source)], one_at_a_time=one_at_a_time,
                                 extra_calls=["save"])
    reference = None
    rows, measured_rows, records = [], [], {}
    for side in sides:
        r = results[side]
        forward, rest = r["summary"]["forward"], r["summary"]["rest"]
        weights = r["info"]["parameter_bytes"]
        blocks = r["info"]["block_bytes"]
        weights_30 = weights + blocks * (RELEASE_LAYERS - layers) / layers
        record = {"weights_bytes": weights, "weights_bytes_30": weights_30,
                  "disk_bytes": r["info"]["disk_bytes"],
                  "disk_bytes_30": r["info"]["disk_bytes"] * weights_30 / weights,
                  "active_bytes": r["info"].get("active_bytes"), "forward": forward, "rest": rest,
                  "peak_rss_30": forward["peak_rss"] + weights_30 - weights,
                  "forward_s_30": project(layers, forward["wall_s"], rest["wall_s"]),
                  "forward_min_s_30": project(layers, forward["wall_min_s"], rest["wall_s"]),
                  "forward_max_s_30": project(layers, forward["wall_max_s"], rest["wall_s"])}
        out = np.load(outputs_dir(source) / f"{side}.npy")
        reference = out if side == REFERENCE else reference
        record["vs_diffusers"] = compare(reference, out)
        if side in conversions:
            conv = conversions[side]
            scale = info["parameter_bytes"] and (info["parameter_bytes"] + info["block_bytes"] *
                                                 (RELEASE_LAYERS - layers) / layers) / info["parameter_bytes"]
            projected = sorted(plan + (wall - plan) * scale for wall, plan in zip(conv["walls_s"], conv["plans_s"]))
            record["conversion"] = conv
            record["conversion_s_30"] = statistics.median(projected)
            record["conversion_range_s_30"] = [projected[0], projected[-1]]
        records[side] = record
    base, ref = records.get("float32"), records[REFERENCE]
    for side in sides:
        r = records[side]
        label = "diffusers float32 (reference)" if side == REFERENCE else FORMATS[side]["label"]
        conv = (f"{r['conversion_s_30']:.1f} ({r['conversion_range_s_30'][0]:.1f}-{r['conversion_range_s_30'][1]:.1f})"
                if "conversion" in r else "-")
        rows.append([label, f"{r['weights_bytes_30'] / GB:.2f}", f"{r['disk_bytes_30'] / GB:.2f}",
                     f"{r['peak_rss_30'] / GB:.2f}",
                     f"{r['forward_s_30']:.1f} ({r['forward_min_s_30']:.1f}-{r['forward_max_s_30']:.1f})",
                     f"{r['forward_s_30'] / base['forward_s_30']:.2f}" if base else "-",
                     f"{r['forward_s_30'] / ref['forward_s_30']:.2f}", f"{r['vs_diffusers']['pcc']:.5f}", conv])
        fw, conv_run = r["forward"], r.get("conversion")
        measured_rows.append([label, f"{r['weights_bytes'] / MB:.0f}",
                              "-" if r["active_bytes"] is None else f"{r['active_bytes'] / MB:.0f}",
                              f"{r['disk_bytes'] / MB:.0f}", f"{fw['baseline_rss'] / MB:.0f}",
                              f"{fw['peak_rss'] / MB:.0f}", f"{fw['above_baseline'] / MB:.0f}",
                              f"{fw['wall_s']:.2f} ({fw['wall_min_s']:.2f}-{fw['wall_max_s']:.2f})",
                              f"{r['rest']['wall_s']:.2f}", f"{r['vs_diffusers']['rel_l2']:.4f}",
                              f"{conv_run['wall_s']:.2f} ({conv_run['wall_min_s']:.2f}-{conv_run['wall_max_s']:.2f})"
                              if conv_run else "-", f"{conv_run['peak_rss'] / MB:.0f}" if conv_run else "-"])
    print(f"  MLX: {results[formats[0]]['info']['blas']}; diffusers: {results[REFERENCE]['info']['torch']}")
    common.table(f"Wan 2.1 T2V 1.3B DiT by weight format, measured at {layers} of {RELEASE_LAYERS} blocks ({size}; "
                 f"{tokens} tokens; forward: median of {repeat}, alternating; conversion: median of {convert_repeat})",
                 ["format", "weights MB", "MLX active MB", "disk MB", "baseline RSS MB", "peak RSS MB",
                  "above baseline MB", "forward s (range)", "non-block s", "rel L2 vs diffusers",
                  "conversion s (range)", "conversion peak MB"], measured_rows)
    common.table(f"Projected to all {RELEASE_LAYERS} blocks (linear in blocks, the rest as measured; {tokens} tokens)",
                 ["format", "weights GB", "disk GB", "peak RSS GB", "forward s (range)", "vs MLX float32",
                  "vs diffusers f32", "PCC vs diffusers", "conversion s (range)"], rows)
    return {"size": size, "shape": s, "tokens": tokens, "layers": layers, "source": info, "results": results,
            "rows": records}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 frame at 120x208 (91 tokens), 128 text tokens")
    parser.add_argument("--repeat", type=int, default=3, help="timed forwards per format (median reported)")
    parser.add_argument("--convert-repeat", type=int, default=3, help="conversions per format (median reported)")
    parser.add_argument("--layers", type=int, default=1, help=f"blocks measured (of {RELEASE_LAYERS}; projected to all)")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), help="MLX formats to run (default: all)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached source and its conversions")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=[REFERENCE, *FORMATS], help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(SIZES), default="full", help=argparse.SUPPRESS)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--route", choices=list(FORMATS), help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build:
        print(json.dumps(_build_child(args.build, args.layers)))
        return {}
    if args.route:
        print(json.dumps(_convert_child(args.route, *args.paths)))
        return {}
    if args.worker:
        setup = (lambda: _torch_setup(args.size, args.source)) if args.worker == REFERENCE else \
            (lambda: _mlx_setup(args.worker, args.size, args.source))
        common.serve(setup)
        return {}
    report = run(args.quick, args.repeat, args.convert_repeat, args.layers, args.formats, args.rebuild)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
