"""`make demo`: vidport end to end on small checkpoints in real layouts (random weights, nothing
downloaded), driven through the `vidport` command line exactly as a user types it.

1. a small AnimateDiff v2 motion module in the original `mm_sd_v15_v2.ckpt` key layout;
2. `vidport convert` to MLX; 3. `vidport verify` against diffusers' MotionAdapter, with JSON and
HTML reports; 4. a small SD 1.5 base (a Diffusers folder, the same models as an LDM single file)
and an input image; 5. `vidport convert animatediff` into one MLX pipeline folder; 6. `vidport
generate` a short text-to-video clip. The files are those the README's commands use.

The checkpoints come from the test fixtures (tests/fixtures, not installed with vidport), which is
why the demo lives beside the tests: `.venv/bin/python tests/demo.py [--out demo-output]`.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from fixtures.motion import write_original_motion_module
from fixtures.pipelines import write_sample_image, write_sd_pipeline_folder
from fixtures.sd import write_sd_single_file


def vidport(*args: str | Path) -> None:
    """Run one `vidport` command in its own process, as a user would; stop the demo if it fails."""
    words = [str(a) for a in args]
    print(f"\n$ vidport {shlex.join(words)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "vidport.cli", *words])
    if done.returncode:
        sys.exit(done.returncode)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-output"), help="where the demo writes everything")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)

    motion = out / "mm_sd_v15_v2-small.ckpt"
    print(f"1. a small v2-layout motion module (random weights, the real keys): {motion}")
    write_original_motion_module(motion, "v2")
    print("2. converting it to MLX")
    vidport("convert", "animatediff-motion", motion, "--target", "mlx", "--out", out / "mm-v2-mlx", "--overwrite")
    print("3. verifying it against diffusers' MotionAdapter.from_single_file on the same file")
    vidport("verify", out / "mm-v2-mlx", "--json", out / "report.json", "--html", out / "report.html")

    base = out / "sd15-small"
    print(f"\n4. a small SD 1.5 base (random weights, real layouts): {base}/ (Diffusers folder), "
          f"{out / 'v1-5-small.safetensors'} (LDM single file), {out / 'image.png'}")
    if base.exists():
        shutil.rmtree(base)
    write_sd_pipeline_folder(base)
    write_sd_single_file(out / "v1-5-small.safetensors")
    write_sample_image(out / "image.png", 64, 64)
    print("5. converting the SD base and the motion module into one MLX pipeline folder")
    vidport("convert", "animatediff", base, "--motion", motion, "--target", "mlx", "--out", out / "animatediff-mlx",
            "--overwrite")
    print("6. generating 8 frames of 64x64 in 4 steps")
    vidport("generate", "t2v", "--model", out / "animatediff-mlx", "--prompt", "a cat", "--frames", "8", "--steps", "4",
            "--guidance", "7.5", "--height", "64", "--width", "64", "--seed", "0", "--decode-slice", "8",
            "--out", out / "animatediff-demo.gif")
    print(f"\ndone: everything is in {out}/ (reports: {out / 'report.json'}, {out / 'report.html'})")


if __name__ == "__main__":
    main()
