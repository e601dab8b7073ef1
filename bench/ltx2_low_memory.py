"""LTX-2 low-memory mode (runtime.streamed_blocks.load_streamed) against the normally loaded DiT:
one forward of the LTX-2 19B DiT at its real per-layer widths (video 32 x 128, audio 32 x 64; 8 of
the 48 blocks, float32: 1.56 GB a block), converted to an MLX folder, on bench/ltx2_forward.py's
clip (288 video + 17 audio tokens, 128 text tokens).

Modes, each in a fresh worker process per run (its peak RSS, VmHWM, is its own):
- normal: `load_model`, every weight resident (read before the clock);
- low-memory: `load_streamed`, each block read at its call from the page cache (the files fit in
  RAM here, and the warm-up forward put them there);
- low-memory, cold: the folder's pages dropped from the page cache before each forward
  (POSIX_FADV_DONTNEED): every block comes from the disk, as for a model larger than RAM.

Reported: forward seconds (median of the runs, range), the extra time per block over normal, peak
RSS and MLX's peak memory during the forward (mx.get_peak_memory: weights + activations), and the
ratios to normal. The checkpoint is bench/ltx2_convert.py's (cached in bench-output/), converted
to float32 once and cached beside it.

    .venv/bin/python bench/ltx2_low_memory.py              # 8 blocks, 3 runs per mode
    .venv/bin/python bench/ltx2_low_memory.py --quick      # 1 block, quick clip
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import ltx2_convert  # noqa: E402
import ltx2_forward  # noqa: E402

MB = common.MB
MODES = {
    "normal": "load_model: every weight resident",
    "low-memory": "load_streamed: each block read at its call (from the page cache: the warm-up forward put the files there)",
    "low-memory-cold": "load_streamed, the files' pages dropped before each forward: every block read from the disk",
}


def converted_folder(size: str) -> Path:
    """bench-output/ltx2-19b-dit-mlx-float32-SIZE: the cached checkpoint converted to MLX float32 (once)."""
    folder = common.OUTPUT / f"ltx2-19b-dit-mlx-float32-{size}"
    if not (folder / "vidport_manifest.json").exists():
        source, _ = ltx2_convert.checkpoint(size)
        print(f"converting {source.relative_to(common.ROOT)} -> {folder.relative_to(common.ROOT)} (once) ...",
              flush=True)
        common.run_child(__file__, ["--convert", str(source), str(folder)], timeout=3600)
    return folder


def _convert_child(source: Path, out: Path) -> dict:
    import vidport.runtime.ltx2.dit  # noqa: F401  (plan_conversion builds the MLX model to check shapes)
    from vidport.converter.convert import convert, plan_conversion

    index = next(source.glob("*.safetensors.index.json"))
    plan = plan_conversion(index, "mlx", "ltx2-dit", dtype="float32", overrides=dict(ltx2_convert.HEADS))
    return {"tensors": convert(plan, out)["tensors"]}


def drop_page_cache(folder: Path) -> None:
    """Drop the folder's file pages from the page cache (clean pages: no root needed)."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _setup(mode: str, size: str, folder: Path):
    blas = common.start_mlx()
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from vidport.runtime.loading import load_model
    from vidport.runtime.streamed_blocks import load_streamed

    model = load_model(folder) if mode == "normal" else load_streamed(folder)
    mx.eval(model.parameters())  # load_model's arrays are lazy: read them before the clock
    data = {k: mx.array(v) for k, v in ltx2_forward.inputs(size).items()}
    timestep = mx.array([500.0])
    arguments = ltx2_forward._dit_arguments(size)

    def forward() -> dict:
        if mode == "low-memory-cold":
            drop_page_cache(folder)
        mx.reset_peak_memory()
        start = time.perf_counter()
        mx.eval(model(data["hidden_states"], data["audio_hidden_states"], data["encoder_hidden_states"],
                      data["audio_encoder_hidden_states"], timestep, audio_timestep=timestep, **arguments))
        return {"forward_s": time.perf_counter() - start, "mlx_peak": mx.get_peak_memory()}

    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return {"forward": forward}, {"blas": blas, "blocks": len(model.transformer_blocks), "resident_weights": resident}


def summarize(runs: list[dict], baseline: int) -> dict:
    times = sorted(r["extra"]["forward_s"] for r in runs)
    return {"forward_s": statistics.median(times), "min_s": times[0], "max_s": times[-1], "runs": len(runs),
            "peak_rss": max(r["peak_rss"] for r in runs), "mlx_peak": max(r["extra"]["mlx_peak"] for r in runs),
            "baseline_rss": baseline}


def run(quick: bool = False, repeat: int = 3, modes: list[str] | None = None) -> dict:
    size = "quick" if quick else "full"
    folder = converted_folder(size)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    modes = modes or list(MODES)
    print(f"LTX-2 19B DiT, {ltx2_convert.SIZES[size]['num_layers']} of 48 blocks at the real widths, float32, "
          f"{weights / MB:.0f} MB in {folder.relative_to(common.ROOT)}")
    results = common.interleaved(__file__, modes, ["forward"], repeat, ["--size", size, "--folder", str(folder)],
                                 one_at_a_time=True)
    blocks = results[modes[0]]["info"]["blocks"]
    summary = {mode: summarize(results[mode]["runs"]["forward"], results[mode]["baseline_rss"]) for mode in modes}
    normal = summary.get("normal")
    rows = []
    for mode, s in summary.items():
        ratio = (lambda key: f"{s[key] / normal[key]:.2f}" if normal else "-")
        per_block = f"{1000 * (s['forward_s'] - normal['forward_s']) / blocks:+.0f}" if normal else "-"
        rows.append([mode, f"{s['forward_s']:.2f}", f"{s['min_s']:.2f}-{s['max_s']:.2f}", per_block,
                     ratio("forward_s"), f"{s['baseline_rss'] / MB:.0f}", f"{s['peak_rss'] / MB:.0f}",
                     ratio("peak_rss"), f"{s['mlx_peak'] / MB:.0f}", ratio("mlx_peak")])
    print()
    for mode in modes:
        print(f"  {mode}: {MODES[mode]}")
    common.table(f"LTX-2 DiT forward, normal vs low-memory ({blocks} blocks, median of {repeat}; a fresh process "
                 "per run)", ["mode", "forward s", "range s", "ms per block vs normal", "time / normal",
                              "RSS after load MB", "peak RSS MB", "peak / normal", "MLX peak MB", "MLX peak / normal"],
                 rows)
    return {"size": size, "folder_bytes": weights, "blocks": blocks, "summary": summary, "results": results}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 block, 9 frames at 128x192")
    parser.add_argument("--repeat", type=int, default=3, help="runs per mode (median reported)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), help="what to run (default: every mode)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=list(ltx2_forward.SIZES), default="full", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.convert:
        print(json.dumps(_convert_child(*args.convert)))
        return {}
    if args.worker:
        common.serve(lambda: _setup(args.worker, args.size, args.folder))
        return {}
    report = run(args.quick, args.repeat, args.modes)
    common.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
