"""vidport: convert video-diffusion checkpoints to MLX / TTNN, verify them layer by layer, generate video.

    vidport models
    vidport inspect mm_sd_v15_v2.ckpt
    vidport convert animatediff-motion mm_sd_v15_v2.ckpt --target mlx --out mm-v2-mlx
    vidport verify mm-v2-mlx --json report.json --html report.html
    vidport convert animatediff-motion mm_sd_v15_v2.ckpt --target ttnn --ttnn-dtype bfloat8_b --out mm-v2-ttnn
    vidport verify mm-v2-ttnn            (host emulator; --device on a machine with a Tenstorrent card)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from vidport.converter.core.errors import VidportError

INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug in vidport, not the input


class ErrorBoundary(typer.core.TyperGroup):
    """Every command's one error boundary: a known failure (VidportError, OSError) is one line and
    a hint, exit 1; an unexpected exception one line that says it is a bug, exit 70; --debug
    shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (VidportError, OSError) as err:
            fail(err)
        except Exception as err:
            if state["debug"]:
                raise
            message = " ".join(f"{type(err).__name__}: {err}".split())
            console.print(Text("internal error: ", style="bold red") + message, highlight=False, soft_wrap=True)
            console.print(Text("  hint: ", style="yellow") + "a bug in vidport; --debug shows the traceback to report",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(INTERNAL_ERROR) from None


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich", cls=ErrorBoundary,
                  help="Port video-diffusion checkpoints to MLX and TTNN, prove them layer by layer, generate video.")
console = Console() if sys.stdout.isatty() else Console(width=160)  # logs and pipes get wide tables
state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    state["debug"] = debug


def fail(err: Exception) -> None:
    """One line naming what is wrong (a file's path first), a hint line where there is one, exit 1."""
    if state["debug"]:
        raise err
    hint = getattr(err, "hint", None)
    if isinstance(err, VidportError):
        message = err.message
    elif isinstance(err, OSError) and err.filename is not None:
        message = f"{err.filename}: {err.strerror or err}" + (f" ({err.filename2})" if err.filename2 else "")
    else:
        message = str(err)
    error, note = Text("error: ", style="bold red"), Text("  hint: ", style="yellow")
    console.print(error + " ".join(message.split()), highlight=False, soft_wrap=True)
    if hint:
        console.print(note + " ".join(str(hint).split()), highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def notice(line: str) -> None:
    """A note the library has for the user (what an interrupted run left, removed)."""
    console.print(Text("note: ", style="yellow") + line, highlight=False, soft_wrap=True)


def progress_bar(description: str) -> Progress:
    return Progress(TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[item]}", style="dim"), console=console, transient=False)


def tasks_bar() -> Progress:
    """One bar per named task (denoise, decode), each with its own description."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[item]}", style="dim"), console=console, transient=False)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value`, the value read as JSON when it parses (8, true, [1,2]), else a string."""
    found = {}
    for pair in pairs:
        if "=" not in pair:
            raise VidportError(f"--set {pair}: expected KEY=VALUE", hint="for example --set motion_num_attention_heads=8")
        key, raw = pair.split("=", 1)
        try:
            found[key] = json.loads(raw)
        except json.JSONDecodeError:
            found[key] = raw
    return found


def print_assumed(assumed: dict[str, Any]) -> None:
    """The note for config values taken from the library's defaults (no known release matched)."""
    from vidport.converter.infer import assumption_note

    note = assumption_note(assumed)
    if note:
        console.print(f"  [yellow]note:[/] {note}", highlight=False, soft_wrap=True)


@app.command()
def convert(
    family: str = typer.Argument(..., help="Model family (see `vidport models`), e.g. animatediff-motion."),
    source: Path = typer.Argument(..., help="Checkpoint file (.ckpt/.pt/.pth/.safetensors/*.index.json) or model folder."),
    target: str = typer.Option("mlx", "--target", "-t", help="mlx | diffusers | ttnn"),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (default: keep the source's)."),
    set_: list[str] = typer.Option([], "--set", help="Override an architecture config value, e.g. --set motion_num_attention_heads=8."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder that vidport wrote."),
    overwrite_any: bool = typer.Option(False, "--overwrite-any", help="Replace whatever --out names (never a source or the working directory)."),
    shard_size: int = typer.Option(5000, "--shard-size", help="Largest weights shard, in MB."),
    ema: bool = typer.Option(False, "--ema", help="Convert the EMA copies the file keeps (an LDM file's model_ema.*)."),
    cache_style: Optional[str] = typer.Option(None, "--cache-style", help="ttnn: as_tensor | model_cache | tt_dit (file naming; default as_tensor)."),
    ttnn_dtype: Optional[str] = typer.Option(None, "--ttnn-dtype", help="ttnn: bfloat16 | bfloat8_b for linear weights (default bfloat16)."),
    ttnn_grid: Optional[str] = typer.Option(None, "--ttnn-grid", help="ttnn: core grid COLUMNSxROWS for group-norm packing (default 8x8)."),
    motion: Optional[Path] = typer.Option(None, "--motion", help="Pipelines (animatediff): the motion module, a file or Diffusers folder."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Pipelines: the tokenizer folder (an LDM single file carries none)."),
) -> None:
    """Convert a checkpoint to a target layout; or a whole pipeline (animatediff, sd15) into one folder.

    [dim]Example: vidport convert animatediff-motion mm_sd_v15_v2.ckpt --target mlx --out mm-v2-mlx --dtype bfloat16[/]
    [dim]Example: vidport convert animatediff v1-5-pruned-emaonly.safetensors --motion mm_sd_v15_v2.ckpt --tokenizer tokenizer/ --out animatediff-mlx[/]
    """
    from vidport.converter.convert import convert as run, plan_conversion
    from vidport.converter.pipeline_spec import find_pipeline

    options = {k: v for k, v in {"cache_style": cache_style, "dtype": ttnn_dtype, "grid": ttnn_grid}.items() if v}
    try:
        pipeline = find_pipeline(family)
        if pipeline is not None:
            return convert_pipeline_command(pipeline, source, motion, tokenizer, target, out, dtype, set_, overwrite,
                                            shard_size, options, overwrite_any=overwrite_any)
        if motion or tokenizer:
            raise VidportError(f"--motion / --tokenizer belong to pipeline conversions; '{family}' is a model family",
                               hint="for a whole AnimateDiff pipeline: vidport convert animatediff SD_SOURCE --motion MOTION ...")
        plan = plan_conversion(source, target, family, dtype, parse_overrides(set_), ema=ema, target_options=options)
        console.print(f"[bold]{plan.detected.spec.name}[/] ({plan.source.format}"
                      + (f", {plan.variant}" if plan.variant else "") + f") -> [bold]{target}[/]")
        print_assumed(plan.assumed)
        if plan.detected.tensors.wrappers or plan.detected.tensors.skipped:
            console.print(f"  unwrapped: {', '.join(plan.detected.tensors.wrappers) or '-'}; "
                          f"skipped: {', '.join(plan.detected.tensors.skipped) or '-'}")
        with progress_bar("converting") as bar:
            task = bar.add_task("convert", total=len(plan.final.recipes), item="")
            manifest = run(plan, out, overwrite, shard_size * 1024 * 1024,
                           lambda done, total, name: bar.update(task, completed=done, item=name[-60:]),
                           overwrite_any=overwrite_any, notice=notice)
    except (VidportError, OSError) as err:
        fail(err)
    console.print(f"wrote {manifest['tensors']} tensors ({manifest['parameters'] / 1e6:.2f}M parameters, "
                  f"{manifest['dtype']}) to [bold]{out}[/]; dropped {len(manifest['dropped'])} on purpose")


def convert_pipeline_command(spec, source: Path, motion: Optional[Path], tokenizer: Optional[Path], target: str,
                             out: Path, dtype: Optional[str], set_: list[str], overwrite: bool, shard_size: int,
                             options: dict[str, Any], overwrite_any: bool = False) -> None:
    """`vidport convert animatediff|sd15|wan ...`: every component, tokenizer and scheduler into one folder."""
    from vidport.converter.pipeline import convert_pipeline, plan_pipeline

    positional = next(name for name, entry in spec.inputs.items() if not entry.option)  # sd, wan
    sources = {positional: source}
    if "motion" in spec.inputs:
        sources["motion"] = motion
    elif motion is not None:
        raise VidportError(f"--motion: the {spec.name} pipeline has no motion module",
                           hint="vidport convert animatediff SD_SOURCE --motion MOTION ... adds one")
    plan = plan_pipeline(spec, sources, target, dtype, parse_overrides(set_), tokenizer, options)
    for name, component in plan.components.items():
        console.print(f"[bold]{name}[/]: {component.detected.spec.name} ({component.source.format}"
                      + (f", {component.variant}" if component.variant else "") + f") -> [bold]{target}[/]")
        print_assumed(component.assumed)
    console.print(f"[bold]tokenizer[/]: {plan.tokenizer or '-'}; [bold]scheduler[/]: "
                  f"{plan.scheduler.get('_class_name', '-')} ({plan.scheduler_from})")
    with progress_bar("converting") as bar:
        task = bar.add_task("convert", total=plan.total_tensors, item="")
        manifest = convert_pipeline(plan, out, overwrite, shard_size * 1024 * 1024,
                                    lambda done, total, name: bar.update(task, completed=done, item=name[-60:]),
                                    overwrite_any=overwrite_any, notice=notice)
    console.print(f"wrote the {spec.name} pipeline ({', '.join(manifest['components'])}; {manifest['tensors']} tensors, "
                  f"{manifest['parameters'] / 1e6:.2f}M parameters, {manifest['dtype']}) to [bold]{out}[/]")


@app.command()
def verify(
    converted: Path = typer.Argument(..., help="A folder written by `vidport convert`."),
    source: Optional[Path] = typer.Option(None, "--source", help="The source the reference is built from (default: the manifest's)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write the report as HTML with a depth plot."),
    save_golden: Optional[Path] = typer.Option(None, "--save-golden", help="Save the reference run (safetensors + .json)."),
    golden: Optional[Path] = typer.Option(None, "--golden", help="Compare against a saved golden; torch not needed."),
    seed: int = typer.Option(0, "--seed", help="Seed of the probe inputs."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames per probe (default: min(16, positions); --pipeline: 8, Wan 5)."),
    show_all: bool = typer.Option(False, "--all", help="Show every layer in the table."),
    device: bool = typer.Option(False, "--device", help="TTNN conversions: run on a Tenstorrent card (default: the host emulator)."),
    pipeline: bool = typer.Option(False, "--pipeline", help="A pipeline folder: whole generations against diffusers, step by step."),
    task: Optional[str] = typer.Option(None, "--task", help="--pipeline: t2v | i2v, Wan also ti2v (default: AnimateDiff both; Wan the model's own)."),
    image: Optional[Path] = typer.Option(None, "--image", help="--pipeline: the i2v input image (default: a generated one)."),
    steps: int = typer.Option(5, "--steps", help="--pipeline: scheduler steps."),
    size: Optional[str] = typer.Option(None, "--size", help="--pipeline: WIDTHxHEIGHT (default: 64x64, or the image's; Wan: the smallest it takes, 2 x 3 patches)."),
    strength: float = typer.Option(0.6, "--strength", help="--pipeline: i2v strength."),
    prompt: str = typer.Option("a cat and a dog", "--prompt", help="--pipeline: the prompt."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="--pipeline: swap the scheduler class on both sides."),
) -> None:
    """Compare a converted model with the PyTorch reference, layer by layer; name the first layer that diverges.
    A pipeline folder (or --pipeline): the same embeddings and noise through diffusers' pipeline and ours,
    latents compared after every step, the frames by PSNR.

    [dim]Example: vidport verify mm-v2-mlx --html report.html --save-golden mm-v2.golden.safetensors[/]
    [dim]Example: vidport verify animatediff-mlx --pipeline --image photo.png --json parity.json[/]
    """
    from vidport.runtime import configure_cpu

    configure_cpu(malloc=False)  # MLX's BLAS before golden imports mlx; malloc is the MLX port's (golden/port_mlx.py)
    from vidport.golden.report import print_report, write_html, write_json
    from vidport.golden.verify import verify as run
    from vidport.converter.core.manifest import read_manifest
    strict: bool = typer.Option(False, "--strict", help="A source that is not the file converted (SHA-256) is an error, not a warning."),
    self_mapped: bool = typer.Option(False, "--self-mapped", help="Build the reference through vidport's own mapping "
                                                                  "(not an independent check; the report says so)."),

    try:
        is_pipeline = read_manifest(converted).get("kind") == "pipeline"
    except (VidportError, OSError) as err:
        fail(err)
    if pipeline or is_pipeline:
        if not is_pipeline:
            fail(VidportError(f"{converted}: not a pipeline folder", hint="leave out --pipeline to verify a model layer by layer"))
        return verify_pipeline_command(converted, task, image, frames, steps, size, strength, prompt, seed, json_out,
                                       scheduler)
    if golden and save_golden:
        fail(VidportError("--golden and --save-golden exclude each other"))
    try:
        with progress_bar("comparing") as bar:
            task = bar.add_task("verify", total=None, item="building reference" if not golden else "reading golden")
            report = run(converted, source, golden, save_golden, seed, frames,
                         lambda done, total, name: bar.update(task, completed=done, total=total, item=name[-60:]),
                         device=device, self_mapped=self_mapped, strict=strict)
    except (VidportError, OSError) as err:
        fail(err)
    print_report(report, console, None if show_all else 25)
    if json_out:
        from vidport.golden.report import write_json

        write_json(report, json_out)
        console.print(f"JSON report: {json_out}")
    if html_out:
        write_html(report, html_out)
        console.print(f"HTML report: {html_out}")
    if save_golden:
        console.print(f"golden saved: {save_golden} (+ {save_golden.with_suffix('.json').name})")
    if not report.passed:
        raise typer.Exit(2)

    if golden and self_mapped:
        fail(VidportError("--self-mapped builds a reference; --golden reads a saved one"))

def parse_size(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """WIDTHxHEIGHT -> (height, width)."""
    if not size:
        return None, None
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise VidportError(f"--size {size}: expected WIDTHxHEIGHT, e.g. 64x64") from None
    return height, width


def verify_pipeline_command(folder: Path, task: Optional[str], image: Optional[Path], frames: Optional[int], steps: int,
                            size: Optional[str], strength: float, prompt: str, seed: int, json_out: Optional[Path],
                            scheduler: Optional[str] = None) -> None:
    from vidport.golden.pipeline_parity import TASKS, pipeline_parity
    from vidport.golden.pipeline_report import print_pipeline_report, write_pipeline_json

    reports = []
    try:
        wan = pipeline_name(folder) == "wan"  # Wan: golden/wan_parity.py, the tasks its model runs
        if wan:
            from vidport.golden.wan_parity import WAN_TASKS, model_tasks, wan_parity
        known = WAN_TASKS if wan else TASKS
        if task is not None and task not in known:
            raise VidportError(f"--task {task}: unknown", hint=f"one of {', '.join(known)}")
        height, width = parse_size(size)
        for name in [task] if task else list(model_tasks(folder) if wan else TASKS):
            with progress_bar(f"{name} parity") as bar:
                job = bar.add_task(name, total=None, item="")
                if wan:
                    report = wan_parity(folder, name, prompt=prompt, frames=frames or 5, steps=steps, height=height,
                                        width=width, seed=seed, image=image if name != "t2v" else None,
                                        scheduler=scheduler,
                                        progress=lambda done, total, item: bar.update(job, completed=done, item=item))
                else:
                    report = pipeline_parity(folder, name, prompt=prompt, frames=frames or 8, steps=steps,
                                             height=height, width=width, strength=strength, seed=seed,
                                             image=image if name == "i2v" else None, scheduler=scheduler,
                                             progress=lambda done, total, item: bar.update(job, completed=done, item=item))
            print_pipeline_report(report, console)
            reports.append(report)
    except (VidportError, OSError) as err:
        fail(err)
    if json_out:
        write_pipeline_json(reports, json_out)
        console.print(f"JSON report: {json_out}")
    if not all(r.passed for r in reports):
        raise typer.Exit(2)


GENERATE_TASKS = ("t2v", "i2v", "ti2v")


@app.command()
def generate(
    task: str = typer.Argument(..., help="t2v (text-to-video) | i2v (image-to-video) | ti2v (Wan 2.2 TI2V, with --image)."),
    model: Path = typer.Option(..., "--model", "-m", help="A pipeline folder (vidport convert animatediff|wan ...)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="What the video shows."),
    negative_prompt: str = typer.Option("", "--negative-prompt", "-n", help="What it should not show."),
    image: Optional[Path] = typer.Option(None, "--image", help="i2v: the input image (AnimateDiff: its size is the video's); "
                                                               "Wan i2v / ti2v: the first frame, resized to the video."),
    strength: float = typer.Option(0.8, "--strength", help="i2v: how far from the image (0..1]; diffusers' strength."),
    frames: Optional[int] = typer.Option(None, "--frames",
                                         help="Frames (AnimateDiff: up to the motion module's positions, 16; Wan: 1 + 4k, 81)."),
    steps: Optional[int] = typer.Option(None, "--steps",
                                        help="Scheduler steps (AnimateDiff 25, its i2v runs the last strength x steps; Wan 50)."),
    guidance: Optional[float] = typer.Option(None, "--guidance",
                                             help="Classifier-free guidance scale, <= 1: none (AnimateDiff 7.5, Wan 5)."),
    guidance_2: Optional[float] = typer.Option(None, "--guidance-2",
                                               help="Wan 2.2 A14B: the low-noise expert's guidance (default: --guidance)."),
    flow_shift: Optional[float] = typer.Option(None, "--flow-shift",
                                               help="Wan: the flow schedule's shift (default: the folder's; 3 at 480p, 5 at 720p)."),
    height: Optional[int] = typer.Option(None, "--height", help="Pixels: AnimateDiff a multiple of 8, Wan of 16 (TI2V 32); "
                                                                "default: the model's size, or the image's."),
    width: Optional[int] = typer.Option(None, "--width", help="Pixels: AnimateDiff a multiple of 8, Wan of 16 (TI2V 32); "
                                                              "default: the model's size, or the image's."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Frames per second of the video file (AnimateDiff 8, Wan 16)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the noise (default: random, printed)."),
    out: Path = typer.Option(..., "--out", "-o", help="video.mp4 | video.gif | video.webm | frames/ (PNG frames)."),
    noise: Optional[Path] = typer.Option(None, "--noise", help="Initial noise .npy, (1, C, latent frames, h, w) (AnimateDiff: "
                                                               "(1, 4, frames, h/8, w/8); its i2v: .npz with noise and encode_noise)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Swap the scheduler class, keeping the folder's schedule (e.g. EulerDiscreteScheduler)."),
    decode_slice: int = typer.Option(1, "--decode-slice",
                                    help="Frames the VAE decodes at a time (1: least memory, and fastest on the CPU)."),
) -> None:
    """Generate a video with the MLX runtime: text-to-video, or image-to-video from one image.

    [dim]Example: vidport generate t2v --model animatediff-mlx --prompt "a cat walking" --frames 16 --steps 25 --seed 1 --out cat.mp4[/]
    [dim]Example: vidport generate i2v --model wan21-i2v-mlx --image first.png --prompt "the cat turns" --out cat.webm[/]
    """
    from vidport.runtime import configure_cpu

    configure_cpu()  # before the runtime's models import mlx
    from vidport.runtime.pipelines.animatediff import AnimateDiffPipeline
    from vidport.runtime.pipelines.inputs import read_image, read_noise

    try:
        if task not in GENERATE_TASKS:
            raise VidportError(f"unknown task '{task}'", hint="t2v (text-to-video) or i2v (image-to-video, with --image)")
        if pipeline_name(model) == "wan":
            return generate_wan_command(task, model, prompt, negative_prompt, image, frames, steps, guidance,
                                        guidance_2, flow_shift, height, width, fps, seed, out, noise, scheduler)
        if task == "ti2v" or guidance_2 is not None or flow_shift is not None:
            raise VidportError("ti2v, --guidance-2 and --flow-shift are Wan options",
                               hint="vidport generate t2v|i2v for AnimateDiff")
        frames, steps, guidance = frames or 16, steps or 25, 7.5 if guidance is None else guidance
        if task == "i2v" and image is None:
            raise VidportError("i2v needs --image", hint="or run t2v for text alone")
        if task == "t2v" and image is not None:
            raise VidportError("--image is for i2v", hint="vidport generate i2v --image IMG ...")
        check_video_path(out)
        picture = read_image(image) if image is not None else None
        supplied = read_noise(noise) if noise is not None else {}
        if task == "t2v" and "encode_noise" in supplied:
            raise VidportError(f"{noise}: encode_noise is for i2v; t2v takes the initial noise alone")
        pipe = AnimateDiffPipeline.open(model, scheduler)
        if picture is not None:
            height, width = height or picture.shape[0], width or picture.shape[1]
        else:
            height, width = height or pipe.default_size()[0], width or pipe.default_size()[1]
        pipe.check_request(frames, height, width, steps, strength if task == "i2v" else None, picture, supplied)
        result = run_generation(pipe, task, picture, supplied, prompt=prompt, negative_prompt=negative_prompt,
                                strength=strength, frames=frames, steps=steps, guidance=guidance, height=height,
                                width=width, seed=seed, decode_slice=decode_slice)
        from vidport.runtime.video import write_video

        written = write_video(out, result.frames, fps or 8)
    except (VidportError, OSError) as err:
        fail(err)
    print_generation_summary(pipe, task, result, written, frames, height, width)


def pipeline_name(folder: Path) -> str | None:
    """The pipeline a converted folder holds (its manifest's `pipeline`), None for a model folder."""
    from vidport.converter.core.manifest import read_manifest

    manifest = read_manifest(folder)
    return manifest.get("pipeline") if manifest.get("kind") == "pipeline" else None


def generate_wan_command(task: str, model: Path, prompt: str, negative_prompt: str, image: Optional[Path],
                         frames: Optional[int], steps: Optional[int], guidance: Optional[float],
                         guidance_2: Optional[float], flow_shift: Optional[float], height: Optional[int],
                         width: Optional[int], fps: Optional[int], seed: Optional[int], out: Path, noise: Optional[Path],
                         scheduler: Optional[str]) -> None:
    """`vidport generate t2v|i2v|ti2v --model WAN_DIR`: Wan 2.1 T2V / I2V, Wan 2.2 A14B and TI2V.
    The task must be the model's (a TI2V model also runs t2v); checked before any weight loads."""
    import mlx.core as mx

    from vidport.runtime.pipelines.inputs import read_image, read_noise
    from vidport.runtime.pipelines.wan import WanPipeline
    from vidport.runtime.video import write_video

    pipe = WanPipeline.open(model, scheduler, flow_shift)
    allowed = {"t2v": ("t2v",), "i2v": ("i2v",), "ti2v": ("ti2v", "t2v")}[pipe.task]
    if task not in allowed:
        raise VidportError(f"{model}: a Wan {pipe.task} model runs {' or '.join(allowed)}, not {task}",
                           hint=f"vidport generate {allowed[0]} --model {model} ..."
                                + (" --image IMG" if allowed[0] != "t2v" else ""))
    if task != "t2v" and image is None:
        raise VidportError(f"{task} needs --image (the first frame)", hint=f"vidport generate {task} --image IMG ...")
    if task == "t2v" and image is not None:
        raise VidportError("--image is for i2v / ti2v", hint=f"vidport generate {allowed[0]} --image IMG ...")
    check_video_path(out)
    picture = read_image(image) if image is not None else None
    supplied = read_noise(noise) if noise is not None else {}
    if set(supplied) - {"noise"}:
        raise VidportError(f"{noise}: Wan takes the initial noise alone (a .npy of shape (1, C, F, h, w))")
    request = dict(prompt=prompt, negative_prompt=negative_prompt, frames=81 if frames is None else frames,
                   steps=steps or 50, guidance=5.0 if guidance is None else guidance, guidance_2=guidance_2,
                   height=height, width=width, seed=seed, noise=supplied.get("noise"))
    pipe.check_request(pipe.request(picture, **request))  # every refusal before any weight loads
    mx.reset_peak_memory()
    with tasks_bar() as bar:
        denoise = bar.add_task("denoising", total=request["steps"], item="loading weights")
        pipe.release_experts = True  # A14B: one expert resident at a time
        pipe.load(skip=("transformer_2",))  # the low-noise expert loads when it takes over
        decode = bar.add_task("decoding", total=None, item="", visible=False)
        bar.update(denoise, item="encoding the prompt" + (" and the image" if picture is not None else ""))

        def on_step(index, total, t, latents):
            expert = pipe.expert_at(t)
            bar.update(denoise, total=total, completed=index + 1, item=f"step {index + 1}/{total} (t={t.item():g}"
                       + (f", {expert}" if pipe.layout.boundary_ratio is not None else "") + ")")

        def on_slice(done, total):
            bar.update(decode, visible=True, total=total, completed=done, item=f"latent frame {done}/{total}")

        if picture is not None:
            result = pipe.image_to_video(picture, on_step=on_step, on_slice=on_slice, **request)
        else:
            result = pipe.text_to_video(on_step=on_step, on_slice=on_slice, **request)
    written = write_video(out, result.frames, fps or 16)
    print_generation_summary(pipe, task, result, written, len(result.frames), result.frames.shape[1],
                             result.frames.shape[2])


def check_video_path(out: Path) -> None:
    """Refuse an output format before any work."""
    from vidport.runtime.video import FORMATS

    if out.suffix and out.suffix.lower() not in FORMATS and not str(out).endswith("/"):
        raise VidportError(f"{out}: unknown video format '{out.suffix}'", hint="use .mp4, .webm, .gif or a folder/ for PNG frames")


def run_generation(pipe, task: str, picture, supplied: dict, **request):
    """One generation with a progress bar per scheduler step and one for the decode."""
    import mlx.core as mx

    mx.reset_peak_memory()
    with tasks_bar() as bar:
        denoise = bar.add_task("denoising", total=None, item="loading weights")
        pipe.load()
        decode = bar.add_task("decoding", total=request["frames"], item="", visible=False)
        bar.update(denoise, item="encoding the prompt" + (" and the image" if task == "i2v" else ""))

        def on_step(index, total, t, latents):
            bar.update(denoise, total=total, completed=index + 1, item=f"step {index + 1}/{total} (t={t.item():g})")

        def on_slice(done, total):
            bar.update(decode, visible=True, total=total, completed=done, item=f"frames {done}/{total}")

        strength = request.pop("strength")
        if task == "t2v":
            return pipe.text_to_video(noise=supplied.get("noise"), on_step=on_step, on_slice=on_slice, **request)
        return pipe.video_to_video(picture, request.pop("prompt"), strength=strength, noise=supplied.get("noise"),
                                   encode_noise=supplied.get("encode_noise"), on_step=on_step, on_slice=on_slice, **request)


def print_generation_summary(pipe, task: str, result, written: Path, frames: int, height: int, width: int) -> None:
    import resource

    import mlx.core as mx
    import psutil

    steps = result.step_seconds
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    table = Table(show_header=False, title=f"{task}: {written}")
    rows = {
        "video": f"{frames} frames, {width}x{height}, seed {result.seed}",
        "scheduler": f"{pipe.scheduler_config['_class_name']}, {len(steps)} steps (timesteps {result.timesteps[0]:g} .. {result.timesteps[-1]:g})" if steps else "-",
        "time per step": (f"{sum(steps) / len(steps):.2f} s mean (first {steps[0]:.2f} s, fastest {min(steps):.2f} s)" if steps else "-"),
        "denoise": f"{sum(steps):.1f} s",
        "decode": f"{result.decode_seconds:.1f} s",
        "peak memory": f"MLX {mx.get_peak_memory() / 2**30:.2f} GiB; process RSS {psutil.Process().memory_info().rss / 2**30:.2f} GiB now, "
                       f"{rss_peak / 2**30:.2f} GiB peak",
    }
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)


@app.command()
def inspect(path: Path = typer.Argument(..., help="A checkpoint file, model folder or converted folder.")) -> None:
    """Say what a checkpoint is: family, format, variant, tensors, parameters, dtypes, wrappers.

    [dim]Example: vidport inspect mm_sd_v15_v2.ckpt[/]
    """
    from vidport.converter.inspect import describe

    try:
        rows = describe(path)
    except (VidportError, OSError) as err:
        fail(err)
    table = Table(show_header=False, title=str(path))
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", str(value))
    console.print(table)


@app.command()
def explain(
    source: Path = typer.Argument(..., help="A checkpoint file or model folder."),
    key: str = typer.Argument(..., help="A tensor name as the file holds it (vidport inspect describes the file)."),
    target: str = typer.Option("mlx", "--target", "-t", help="mlx | diffusers | ttnn"),
    family: Optional[str] = typer.Option(None, "--family", help="The model family (needed for a file holding several)."),
    set_: list[str] = typer.Option([], "--set", help="A config value the shapes cannot tell, as for convert."),
) -> None:
    """Show where one source key goes: the rules that take it (file:line), the transforms, the target name(s) and shape(s).

    [dim]Example: vidport explain mm_sd_v15_v2.ckpt down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight[/]
    """
    from vidport.converter.explain import explain_key

    try:
        found = explain_key(source, key, target, family, parse_overrides(set_))
    except (VidportError, OSError) as err:
        fail(err)
    def shape(dims: tuple[int, ...]) -> str:
        return "[" + ", ".join(str(d) for d in dims) + "]"

    def chain(steps: list[str]) -> str:
        return ", ".join(steps) or "none"

    table = Table(show_header=False, title=f"{found.source.name}: {found.key}")
    table.add_row("[bold]source key[/]", f"{found.key} {shape(found.shape)} {found.dtype}")
    table.add_row("[bold]family[/]", f"{found.family} (spec {found.spec}" + (f", {found.variant}" if found.variant else "") + ")")
    if found.assumed:
        table.add_row("[bold]assumed[/]", ", ".join(f"{k}={v!r}" for k, v in found.assumed.items()))
    if found.rule:
        table.add_row("[bold]rule[/]", f"{found.rule.where}  {found.rule.text}")
    if found.rule is None:
        table.add_row("[bold red]no rule[/]", f"no rule of {found.spec} takes this key (a conversion refuses the file)"
                      + (f"; closest rule: {found.closest.where}  {found.closest.text}" if found.closest else ""))
    if found.dropped:
        table.add_row("[bold yellow]dropped[/]", f"on purpose: {found.dropped}")
    for tensor in found.canonical:
        table.add_row("[bold]canonical[/]", f"{tensor.key} {shape(tensor.shape) if tensor.shape else ''}"
                      + (f" ({tensor.part})" if tensor.part else ""))
        table.add_row("  source transforms", chain(tensor.steps))
        if tensor.omitted:
            table.add_row(f"  [yellow]{found.target}[/]", f"left out: {tensor.omitted}")
        for out in tensor.targets:
            if out.companion_of:
                table.add_row(f"  {found.target} companion", f"{out.role}: {chain(out.role_steps)} ({found.target_spec})")
            else:
                table.add_row(f"  {found.target} role", f"{out.role}: {chain(out.role_steps)} ({found.target_spec})")
                table.add_row(f"  {found.target} rule", f"{out.rule.where}  {out.rule.text}; transforms: {chain(out.rule_steps)}"
                              if out.rule else "none (the canonical name is kept)")
            stored = ", ".join(v for v in (out.layout, out.dtype) if v)
            table.add_row(f"  [bold]{found.target}[/]", f"{out.key} {shape(out.shape)}" + (f" ({stored})" if stored else ""))
    if found.problem:
        table.add_row("[bold red]target side[/]", f"unknown: the conversion cannot be planned: {found.problem}")
    console.print(table)


@app.command()
def models() -> None:
    """List model families, their source formats, and the targets."""
    from vidport.converter.spec import load_catalog

    try:
        catalog = load_catalog()
    except VidportError as err:
        fail(err)
    table = Table(title="model families")
    for column in ("family", "canonical", "sources", "description"):
        table.add_column(column)
    for family in catalog.families.values():
        table.add_row(family.name, family.canonical, "\n".join(f"{s.source} ({s.path.name})" for s in family.sources),
                      family.description)
    console.print(table)
    console.print("targets: " + ", ".join(f"{t.name} (v{t.version})" for t in catalog.targets.values()))
    from vidport.converter.pipeline_spec import load_pipeline_specs

    try:
        pipelines = load_pipeline_specs()
    except VidportError as err:
        fail(err)
    table = Table(title="pipelines (vidport convert PIPELINE SD_SOURCE ...: one folder)")
    for column in ("pipeline", "components", "inputs", "description"):
        table.add_column(column)
    for spec in pipelines.values():
        table.add_row(spec.name, "\n".join(f"{c.name} ({c.family})" for c in spec.components),
                      "\n".join(f"{i.option or i.name.upper() + '_SOURCE'}: {', '.join(l.name for l in i.layouts)}"
                                for i in spec.inputs.values()), spec.description)
    console.print(table)


if __name__ == "__main__":
    sys.exit(app())
