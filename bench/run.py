"""`make bench`: run every benchmark module in bench/ that exposes `main(argv)`, printing its tables.

    .venv/bin/python bench/run.py            # full sizes
    .venv/bin/python bench/run.py --quick    # smaller sizes, for a smoke run
    .venv/bin/python bench/run.py convert_motion -- --repeat 5   # one benchmark; arguments after -- go to it
    .venv/bin/python bench/run.py unet_step --processes 1 -- --contention

The MLX-vs-diffusers benchmarks that declare `PROCESS_RUNS = True` are given `--processes N`
(default 3): each ratio is then the median of N runs in freshly started workers, with their
range, and a goal counts as met only when every run meets it (bench/_common.measuring).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def discover() -> dict[str, Path]:
    """bench/*.py modules other than this one and private ones, by name."""
    return {p.stem: p for p in sorted(BENCH.glob("*.py")) if p.stem != "run" and not p.stem.startswith("_")}


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run vidport's benchmarks")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all in bench/)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--processes", type=int, default=3,
                        help="separate runs in fresh workers for the benchmarks that take --processes (default 3)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    sys.path.insert(0, str(ROOT))
    found = discover()
    unknown = [n for n in args.names if n not in found]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(found)}")
    failed = []
    for name in args.names or list(found):
        module = load(name, found[name])
        if not callable(getattr(module, "main", None)):
            continue
        print(f"=== bench/{name}.py{' (quick)' if args.quick else ''} ===", flush=True)
        start = time.perf_counter()
        try:
            runs = ["--processes", str(args.processes)] if getattr(module, "PROCESS_RUNS", False) else []
            module.main((["--quick"] if args.quick else []) + runs + extra)
        except Exception as err:  # report and go on with the other benchmarks
            failed.append(name)
            print(f"bench/{name}.py failed: {type(err).__name__}: {err}", file=sys.stderr)
        print(f"=== bench/{name}.py: {time.perf_counter() - start:.0f} s ===\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
