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
import time
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
# Under mlx.launch every rank refuses a bad request; the first to exit makes mlx.launch stop the
# rest, so a rank other than 0 (which prints nothing) waits this long for rank 0 to print the error.
REFUSAL_GRACE_S = 30.0


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
    ema: Optional[bool] = typer.Option(None, "--ema/--no-ema", help="Convert the EMA weights the file keeps (an LDM file's "
                                       "model_ema.*, Self-Forcing's generator_ema), or not; default: the format's choice "
                                       "(Self-Forcing: EMA, where the file has it; others: not)."),
    cache_style: Optional[str] = typer.Option(None, "--cache-style", help="ttnn: as_tensor | model_cache | tt_dit | sd_demo (file naming; default as_tensor; tt_dit: the keyed folder tt_dit loads, for wan-dit; sd_demo: the model cache of tt-metal's SD 1.4 demo, for sd15-unet and animatediff-motion)."),
    ttnn_dtype: Optional[str] = typer.Option(None, "--ttnn-dtype", help="ttnn: bfloat16 | bfloat8_b for linear weights (default bfloat16)."),
    ttnn_grid: Optional[str] = typer.Option(None, "--ttnn-grid", help="ttnn: core grid COLUMNSxROWS for group-norm packing (default 8x8)."),
    ttnn_mesh: Optional[str] = typer.Option(None, "--ttnn-mesh", help="ttnn, --cache-style tt_dit: the device mesh ROWSxCOLS "
                                            "the cache is sharded for (1x4, 2x2, 2x4, 4x8, 4x32; default 1x1)."),
    tp_axis: Optional[int] = typer.Option(None, "--tp-axis", help="ttnn, tt_dit: the mesh axis splitting heads (default: tt_dit's plan for the mesh)."),
    sp_axis: Optional[int] = typer.Option(None, "--sp-axis", help="ttnn, tt_dit: the mesh axis splitting the sequence (default: tt_dit's plan)."),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp/--no-fsdp", help="ttnn, tt_dit: also split weights over the sp axis (default: tt_dit's plan)."),
    quantize: Optional[int] = typer.Option(None, "--quantize", help="Quantize the linears the family declares: mlx to BITS (affine 2-8; mxfp4/nvfp4 4, mxfp8 8); ttnn 8 = bfloat8_b, 4 = bfloat4_b."),
    q_group_size: Optional[int] = typer.Option(None, "--q-group-size", help="--quantize: weights per scale, 32 | 64 | 128 (default: the mode's; affine 64)."),
    q_mode: Optional[str] = typer.Option(None, "--q-mode", help="--quantize: affine | mxfp4 | mxfp8 | nvfp4 (MLX's formats; default affine)."),
    motion: Optional[Path] = typer.Option(None, "--motion", help="Pipelines (animatediff): the motion module, a file or Diffusers folder (= --input motion=PATH)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Pipelines (self-forcing): the Wan 2.1 base that gives the VAE, "
                                        "text encoder and tokenizer, a Diffusers or release folder (= --input base=PATH)."),
    inputs: list[str] = typer.Option([], "--input", help="Pipelines: another input the pipeline spec declares, NAME=PATH (repeatable)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Pipelines: the tokenizer folder (an LDM single file carries none)."),
) -> None:
    """Convert a checkpoint to a target layout; or a whole pipeline (animatediff, sd15) into one folder.

    [dim]Example: vidport convert animatediff-motion mm_sd_v15_v2.ckpt --target mlx --out mm-v2-mlx --dtype bfloat16[/]
    [dim]Example: vidport convert animatediff v1-5-pruned-emaonly.safetensors --motion mm_sd_v15_v2.ckpt --tokenizer tokenizer/ --out animatediff-mlx[/]
    [dim]Example: vidport convert self-forcing self_forcing_dmd.pt --base Wan2.1-T2V-1.3B --out self-forcing-mlx[/]
    """
    from vidport.converter.convert import convert as run, plan_conversion
    from vidport.converter.pipeline_spec import find_pipeline

    from vidport.converter.quantize import QuantFormat

    options = {k: v for k, v in {"cache_style": cache_style, "dtype": ttnn_dtype, "grid": ttnn_grid, "mesh": ttnn_mesh,
                                 "tp_axis": None if tp_axis is None else str(tp_axis),
                                 "sp_axis": None if sp_axis is None else str(sp_axis),
                                 "fsdp": None if fsdp is None else str(fsdp).lower()}.items() if v}
    try:
        if quantize is None and (q_group_size or q_mode):
            raise VidportError("--q-group-size / --q-mode set the format of --quantize", hint="add --quantize BITS")
        fmt = QuantFormat.parse(quantize, q_group_size, q_mode) if quantize is not None else None
        pipeline = find_pipeline(family)
        if pipeline is not None and not (motion or base or inputs or tokenizer) and model_alone(pipeline, family):
            pipeline = None
        if pipeline is not None:
            named = parse_inputs(inputs, {"motion": motion, "base": base})
            return convert_pipeline_command(pipeline, source, named, tokenizer, target, out, dtype, set_, overwrite,
                                            shard_size, options, overwrite_any=overwrite_any, ema=ema, quantize=fmt)
        if motion or base or inputs or tokenizer:
            raise VidportError(f"--motion / --base / --input / --tokenizer belong to pipeline conversions; '{family}' is a "
                               "model family", hint="vidport models lists the pipelines and their inputs")
        plan = plan_conversion(source, target, family, dtype, parse_overrides(set_), ema=ema, target_options=options,
                               quantize=fmt)
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
    print_quantization(manifest)


def print_quantization(manifest: dict[str, Any]) -> None:
    """What --quantize did: the format, how many layers took it, which declared ones stayed float."""
    section = manifest.get("quantization")
    if section:
        kept = section["unquantized"]
        console.print(f"  quantized {len(section['tensors'])} layers to {section['name']}"
                      + (f"; {len(kept)} kept float ({next(iter(kept.values()))}, ...)" if kept else ""),
                      highlight=False, soft_wrap=True)


def model_alone(spec, name: str) -> bool:
    """`vidport convert self-forcing CKPT` without --base: a name that is a pipeline's and a model
    family's converts the model alone where the pipeline needs inputs besides SOURCE (the wan
    pipeline, also an alias of wan-dit, needs none: its name converts the pipeline)."""
    from vidport.converter.spec import load_catalog

    _positional, *others = spec.inputs
    return (any(not spec.inputs[other].optional for other in others)
            and any(name == found.name or name in found.aliases for found in load_catalog().families.values()))


def parse_inputs(pairs: list[str], shorthands: dict[str, Optional[Path]]) -> dict[str, Path]:
    """`--input NAME=PATH` (repeatable), and the options that are shorthand for one (`--motion X`)."""
    found: dict[str, Path] = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not name or not path:
            raise VidportError(f"--input {pair}: expected NAME=PATH", hint="for example --input motion=mm_sd_v15_v2.ckpt")
        if name in found:
            raise VidportError(f"--input {name} is given twice")
        found[name] = Path(path)
    for name, path in shorthands.items():
        if path is not None:
            if name in found:
                raise VidportError(f"--{name} and --input {name}=... name the same input", hint="give one of them")
            found[name] = path
    return found


def convert_pipeline_command(spec, source: Path, inputs: dict[str, Path], tokenizer: Optional[Path], target: str,
                             out: Path, dtype: Optional[str], set_: list[str], overwrite: bool, shard_size: int,
                             options: dict[str, Any], overwrite_any: bool = False, ema: Optional[bool] = None,
                             quantize=None) -> None:
    """`vidport convert PIPELINE SOURCE [--input NAME=PATH ...]`: SOURCE is the spec's first input, the
    others come by name; every component, tokenizer and scheduler go into one folder."""
    from vidport.converter.pipeline import convert_pipeline, plan_pipeline

    positional, *others = spec.inputs
    unknown = sorted(set(inputs) - set(others))
    if unknown:
        takes = ", ".join(f"{spec.inputs[name].option or '--input ' + name + '=PATH'}" for name in others)
        raise VidportError(f"the {spec.name} pipeline has no input {', '.join(unknown)}"
                           + (" besides SOURCE" if positional in unknown else ""),
                           hint=f"its inputs: SOURCE ({positional})" + (f", {takes}" if takes else ""))
    sources = {positional: source, **inputs}
    plan = plan_pipeline(spec, sources, target, dtype, parse_overrides(set_), tokenizer, options, ema, quantize)
    for name, component in plan.components.items():
        console.print(f"[bold]{name}[/]: {component.detected.spec.name} ({component.source.format}"
                      + (f", {component.variant}" if component.variant else "") + f") -> [bold]{target}[/]")
        print_assumed(component.assumed)
    for name, why in plan.absent.items():
        console.print(f"[bold]{name}[/]: [yellow]absent[/] from the sources, left out" + (f" ({why})" if why else ""),
                      highlight=False, soft_wrap=True)
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
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames per probe (default: min(16, positions); --pipeline: the pipeline's parity default)."),
    show_all: bool = typer.Option(False, "--all", help="Show every layer in the table."),
    device: bool = typer.Option(False, "--device", help="TTNN conversions: run on a Tenstorrent card (default: the host emulator)."),
    strict: bool = typer.Option(False, "--strict", help="A source that is not the file converted (SHA-256) is an error, not a warning."),
    self_mapped: bool = typer.Option(False, "--self-mapped", help="Build the reference through vidport's own mapping "
                                                                  "(not an independent check; the report says so)."),
    pipeline: bool = typer.Option(False, "--pipeline", help="A pipeline folder: whole generations against diffusers, step by step."),
    components: bool = typer.Option(False, "--components", help="A pipeline folder: verify each component layer by layer "
                                                                "(the default for a pipeline with no step parity yet)."),
    task: Optional[str] = typer.Option(None, "--task", help="--pipeline: one of the folder's tasks, t2v | i2v | ti2v ... (default: each)."),
    image: Optional[Path] = typer.Option(None, "--image", help="--pipeline: the image of the tasks that take one (default: a synthetic one)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="--pipeline: scheduler steps (default: the pipeline's parity default, a few)."),
    size: Optional[str] = typer.Option(None, "--size", help="--pipeline: WIDTHxHEIGHT (default: small, the pipeline's parity default, or the image's)."),
    strength: Optional[float] = typer.Option(None, "--strength", help="--pipeline: image-to-video strength, where the pipeline takes one."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="--pipeline: the prompt (default: the pipeline's parity prompt)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="--pipeline: swap the scheduler class on both sides."),
    set_: list[str] = typer.Option([], "--set", help="--pipeline: a pipeline-specific setting on both sides, KEY=VALUE "
                                                     "(LTX-2: --set recipe=distilled)."),
) -> None:
    """Compare a converted model with the PyTorch reference, layer by layer; name the first layer that diverges.
    A pipeline folder (or --pipeline): the same embeddings and noise through diffusers' pipeline and ours,
    latents compared after every step, the frames by PSNR.

    [dim]Example: vidport verify mm-v2-mlx --html report.html --save-golden mm-v2.golden.safetensors[/]
    [dim]Example: vidport verify animatediff-mlx --pipeline --image photo.png --json parity.json[/]
    [dim]Example: vidport verify ltx2-mlx --pipeline --set recipe=distilled[/]
    """
    from vidport.runtime import configure_cpu

    configure_cpu(malloc=False)  # MLX's BLAS before golden imports mlx; malloc is the MLX port's (golden/port_mlx.py)
    from vidport.golden.report import print_report, write_html, write_json
    from vidport.golden.verify import verify as run
    from vidport.converter.core.manifest import read_manifest

    try:
        is_pipeline = read_manifest(converted).get("kind") == "pipeline"
    except (VidportError, OSError) as err:
        fail(err)
    if (pipeline or components) and not is_pipeline:
        fail(VidportError(f"{converted}: not a pipeline folder",
                          hint="leave out --pipeline / --components to verify a model layer by layer"))
    if is_pipeline and (components or (not pipeline and not has_step_parity(converted))):
        return verify_components_command(converted, seed, frames, show_all, json_out, strict)
    if is_pipeline:
        return verify_pipeline_command(converted, task, source, size, json_out, dict(
            image=image, frames=frames, steps=steps, strength=strength, prompt=prompt, scheduler=scheduler, seed=seed,
            extra=parse_overrides(set_)))
    if golden and save_golden:
        fail(VidportError("--golden and --save-golden exclude each other"))
    if golden and self_mapped:
        fail(VidportError("--self-mapped builds a reference; --golden reads a saved one"))
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
        write_json(report, json_out)
        console.print(f"JSON report: {json_out}")
    if html_out:
        write_html(report, html_out)
        console.print(f"HTML report: {html_out}")
    if save_golden:
        console.print(f"golden saved: {save_golden} (+ {save_golden.with_suffix('.json').name})")
    if not report.passed:
        raise typer.Exit(2)


def has_step_parity(folder: Path) -> bool:
    from vidport.converter.core.manifest import read_manifest
    from vidport.converter.pipeline_spec import pipeline_spec

    return pipeline_spec(read_manifest(folder)["pipeline"]).parity is not None


def verify_components_command(folder: Path, seed: int, frames: Optional[int], show_all: bool,
                              json_out: Optional[Path], strict: bool) -> None:
    """Each component of a pipeline folder against its reference, layer by layer, from the source
    its own manifest names; exit 2 if any fails."""
    from vidport.converter.core.manifest import read_manifest
    from vidport.golden.report import print_report
    from vidport.golden.verify import verify as run

    reports = {}
    try:
        for name, entry in read_manifest(folder)["components"].items():
            with progress_bar(f"{name}") as bar:
                job = bar.add_task(name, total=None, item="building reference")
                reports[name] = run(folder / entry["folder"], None, None, None, seed, frames,
                                    lambda done, total, item: bar.update(job, completed=done, total=total, item=item[-60:]),
                                    strict=strict)
            console.print(f"[bold]{name}[/] ({entry['family']})")
            print_report(reports[name], console, None if show_all else 10)
    except (VidportError, OSError) as err:
        fail(err)
    if json_out:
        json_out.write_text(json.dumps({name: report.as_json() for name, report in reports.items()}, indent=2))
        console.print(f"JSON report: {json_out}")
    failed = [name for name, report in reports.items() if not report.passed]
    console.print(f"components: {len(reports) - len(failed)} passed" + (f", failed: {', '.join(failed)}" if failed else ""))
    if failed:
        raise typer.Exit(2)


def parse_size(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """WIDTHxHEIGHT -> (height, width)."""
    if not size:
        return None, None
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise VidportError(f"--size {size}: expected WIDTHxHEIGHT, e.g. 64x64") from None
    return height, width


def verify_pipeline_command(folder: Path, task: Optional[str], source: Optional[Path], size: Optional[str],
                            json_out: Optional[Path], settings: dict[str, Any]) -> None:
    """`vidport verify PIPELINE_DIR`: each task (or `task`) through the pipeline spec's parity; `settings`
    are request fields, None for the pipeline's parity defaults."""
    from vidport.golden.pipeline_parity import parity_tasks, pipeline_parity
    from vidport.golden.pipeline_report import print_pipeline_report, write_pipeline_json

    reports = []
    try:
        height, width = parse_size(size)
        for name in [task] if task else parity_tasks(folder):
            with progress_bar(f"{name} parity") as bar:
                job = bar.add_task(name, total=None, item="")
                report = pipeline_parity(folder, name, source,
                                         lambda done, total, item: bar.update(job, completed=done, item=item),
                                         height=height, width=width, **settings)
            print_pipeline_report(report, console)
            reports.append(report)
    except (VidportError, OSError) as err:
        fail(err)
    if json_out:
        write_pipeline_json(reports, json_out)
        console.print(f"JSON report: {json_out}")
    if not all(r.passed for r in reports):
        raise typer.Exit(2)


@app.command("quantize-report")
def quantize_report(
    source: Path = typer.Argument(..., help="The checkpoint file or model folder to quantize."),
    family: Optional[str] = typer.Option(None, "--family", "-f", help="Model family (default: detected), e.g. wan-dit."),
    formats: Optional[str] = typer.Option(None, "--formats",
                                          help="Comma-separated formats: affine-qBITS-gGROUP (BITS 2-8, GROUP 32 | 64 | 128), "
                                               "mxfp8-g32, mxfp4-g32, nvfp4-g16 (default: affine 8, 6 and 4 bits at "
                                               "group 64, mxfp8, mxfp4, nvfp4)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for quantize-report.json and quantize-report.html."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 of what stays float (default: the source's)."),
    set_: list[str] = typer.Option([], "--set", help="Override an architecture config value (as convert takes it)."),
) -> None:
    """Convert SOURCE at each quantized format, verify each layer by layer against the float32 reference,
    and write a table (rich + JSON) of each format's worst / median layer PCC and SNR and weight bytes, and
    an HTML page plotting the error by layer depth per format: pick the bits from evidence.

    [dim]Example: vidport quantize-report Wan2.1-T2V-1.3B/transformer --family wan-dit --formats affine-q8-g64,affine-q4-g64,mxfp4-g32 --out wan-q-report[/]
    """
    from vidport.runtime import configure_cpu

    configure_cpu(malloc=False)
    from vidport.golden.quantize_report import (DEFAULT_FORMATS, parse_format, print_table, quantize_report as run,
                                                write_html, write_json)

    try:
        names = [name.strip() for name in formats.split(",") if name.strip()] if formats is not None else list(DEFAULT_FORMATS)
        if not names:
            raise VidportError("--formats names no format", hint=f"e.g. --formats {','.join(DEFAULT_FORMATS[:3])}")
        for name in names:
            parse_format(name)  # every name checked before the first conversion
        out.mkdir(parents=True, exist_ok=True)
        with progress_bar("quantize-report") as bar:
            job = bar.add_task("formats", total=None, item="")
            results = run(source, family, names, dtype, parse_overrides(set_), lambda item: bar.update(job, item=item))
    except (VidportError, OSError) as err:
        fail(err)
    print_table(results, console)
    write_json(results, out / "quantize-report.json", source)
    write_html(results, out / "quantize-report.html", source)
    console.print(f"wrote {out / 'quantize-report.json'} and {out / 'quantize-report.html'}")


@app.command()
def generate(
    task: str = typer.Argument(..., help="The pipeline's task: t2v (text-to-video), i2v (image-to-video), ti2v (Wan 2.2 TI2V) ..."),
    model: Path = typer.Option(..., "--model", "-m", help="A pipeline folder (vidport convert PIPELINE ...)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="What the video shows (or --prompt-embeds)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", "-n", help="What it should not show."),
    image: Optional[Path] = typer.Option(None, "--image", help="Tasks that take an image: the input image or first frame."),
    strength: Optional[float] = typer.Option(None, "--strength", help="AnimateDiff i2v: how far from the image (0..1]; diffusers' strength."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frames of the video."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Scheduler steps."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale, <= 1: none."),
    guidance_2: Optional[float] = typer.Option(None, "--guidance-2",
                                               help="Wan 2.2 A14B: the low-noise expert's guidance (default: --guidance)."),
    flow_shift: Optional[float] = typer.Option(None, "--flow-shift",
                                               help="Flow-matching pipelines: the schedule's shift (default: the folder's)."),
    height: Optional[int] = typer.Option(None, "--height", help="Pixels (default: the model's size, or the image's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Pixels (default: the model's size, or the image's)."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Frames per second of the video file."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the noise (default: random, printed)."),
    out: Path = typer.Option(..., "--out", "-o", help="video.mp4 | video.gif | video.webm | frames/ (PNG frames)."),
    noise: Optional[Path] = typer.Option(None, "--noise", help="Initial noise .npy in the latent layout (1, C, latent frames, h, w), "
                                                               "or .npz of named draws (AnimateDiff i2v: noise, encode_noise)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Swap the scheduler class, keeping the folder's schedule (e.g. EulerDiscreteScheduler)."),
    decode_slice: Optional[int] = typer.Option(None, "--decode-slice",
                                               help="AnimateDiff: frames the VAE decodes at a time (1: least memory, and fastest on the CPU)."),
    prompt_embeds: Optional[Path] = typer.Option(None, "--prompt-embeds", help="Text states computed elsewhere, an .npz with diffusers' "
                                                                             "names (prompt_embeds, negative_prompt_embeds, LTX-2: their attention masks)."),
    audio: Optional[bool] = typer.Option(None, "--audio/--no-audio", help="LTX-2: make the soundtrack (default: when the folder has its audio VAE and vocoder)."),
    wav: bool = typer.Option(False, "--wav", help="LTX-2: also write the soundtrack as a WAV beside the video."),
    resize: bool = typer.Option(False, "--resize", help="LTX-2 i2v: stretch an image of another aspect ratio to --width x --height."),
    stream: bool = typer.Option(False, "--stream", help="Self-Forcing, LTX-2: write the video at --out as it grows (a fragmented MP4, "
                                                        "or PNG frames), to watch while later frames are generated; removed if the run fails."),
    low_memory: bool = typer.Option(False, "--low-memory", help="LTX-2: stream the DiT's blocks from disk, one at a time (slower; for models larger than RAM)."),
    set_: list[str] = typer.Option([], "--set", help="A pipeline-specific setting, KEY=VALUE (e.g. Wan: --set max_sequence_length=256; "
                                                     "LTX-2: --set recipe=distilled; on several processes: --set parallel=cfg|sequence|tensor "
                                                     "(Wan: all three; LTX-2: cfg, tensor; Self-Forcing: sequence, tensor); "
                                                     "Wan: --set vae_tiling=true splits the decode's tiles across the ranks)."),
    launch: Optional[str] = typer.Option(None, "--launch", help='Run on several processes through mlx.launch with these arguments, e.g. '
                                                                '--launch "-n 2 --backend ring" (with --set parallel=PLAN); rank 0 writes --out.'),
) -> None:
    """Generate a video with the MLX runtime: text-to-video, or image-to-video from one image. Every
    default is the pipeline's own (shown before the run); a bad request fails before any weight loads.

    [dim]Example: vidport generate t2v --model animatediff-mlx --prompt "a cat walking" --frames 16 --steps 25 --seed 1 --out cat.mp4[/]
    [dim]Example: vidport generate i2v --model wan21-i2v-mlx --image first.png --prompt "the cat turns" --out cat.webm[/]
    [dim]Example: vidport generate t2v --model ltx2-mlx --prompt "waves on a beach" --set recipe=distilled --wav --out beach.mp4[/]
    [dim]Example: vidport generate t2v --model self-forcing-mlx --prompt "a fox in the snow" --stream --out fox.mp4[/]
    [dim]Example: vidport generate t2v --model wan21-mlx --prompt "a cat" --set parallel=tensor --launch "-n 2 --backend ring" --out cat.mp4[/]
    """
    from vidport.runtime import configure_cpu

    if launch is not None:
        from vidport.runtime.distributed import launch as launch_ranks, strip_option

        try:
            status = launch_ranks(launch, strip_option(sys.argv[1:], "--launch"), sys.argv[0])
        except VidportError as err:
            fail(err)
        raise typer.Exit(status)
    configure_cpu()  # before the runtime's models import mlx
    from vidport.runtime.distributed import world
    from vidport.runtime.pipelines.inputs import read_noise, read_prompt_embeds
    from vidport.runtime.pipelines.protocol import Request, open_pipeline
    from vidport.runtime.video import check_live, open_video, write_video, write_wav

    flags = {"audio": audio, "resize": resize or None, "low_memory": low_memory or None}
    rank, checked = world().rank, False
    console.quiet = rank != 0  # under mlx.launch rank 0 speaks and writes; the others only compute
    try:
        check_video_path(out)
        if stream:
            check_live(out)
        if prompt is None and prompt_embeds is None:
            raise VidportError("no prompt", hint='--prompt "what the video shows", or --prompt-embeds FILE.npz')
        pipe = open_pipeline(model)
        request = pipe.check(Request(  # every refusal before any weight loads
            task=task, prompt=prompt, negative_prompt=negative_prompt, image=image, frames=frames, steps=steps,
            guidance=guidance, guidance_2=guidance_2, height=height, width=width, seed=seed,
            noise=read_noise(noise) if noise is not None else None, strength=strength, scheduler=scheduler,
            flow_shift=flow_shift, decode_slice=decode_slice, fps=fps, release_weights=True,
            prompt_embeds=read_prompt_embeds(prompt_embeds) if prompt_embeds is not None else None,
            extra={**{k: v for k, v in flags.items() if v is not None}, **parse_overrides(set_)}))
        if world().size > 1 and "parallel" not in pipe.settings(request.task):
            raise VidportError(f"the {pipe.name} pipeline has no parallel plans: under mlx.launch every rank would "
                               "repeat the whole run", hint="run it as one process (Wan, LTX-2 and Self-Forcing have --set parallel=...)")
        checked = True
        if wav and not request.extra.get("audio"):
            raise VidportError("--wav: this run makes no soundtrack", hint="drop --wav, or use an LTX-2 folder with audio")
        console.print(f"[bold]{pipe.name} {request.task}[/]: {request_line(request)}", highlight=False)
        if request.extra.get("parallel"):
            console.print(f"parallel: {pipe.describe_plan(request)}", highlight=False)
        if stream and not pipe.streams_frames:
            raise VidportError(f"--stream: the {pipe.name} pipeline decodes the video in one piece at the end",
                               hint="drop --stream (Self-Forcing and LTX-2 stream their frames)")
        if pipe.streams_frames:  # frames go to the file as they are decoded, with the soundtrack
            request.writer = lambda sound, rate: open_video(out, request.fps, sound, rate, live=stream)
        result = run_generation(pipe, request)
        if rank:
            return
        written = out if pipe.streams_frames else write_video(out, result.frames, result.fps)
        if wav:
            console.print(f"soundtrack: {write_wav(out.with_suffix('.wav'), result.audio, result.sample_rate)}")
    except (VidportError, OSError) as err:
        if rank and checked:  # a failure of this rank alone (a refusal is rank 0's to say)
            console.quiet = False
            err = VidportError(f"rank {rank}: {getattr(err, 'message', err)}", getattr(err, "hint", None))
        elif rank:  # rank 0 refuses the same request: let it say so before mlx.launch stops every rank
            time.sleep(REFUSAL_GRACE_S)
        fail(err)
    print_generation_summary(request, result, written)


def request_line(request) -> str:
    """The settings a run uses, the pipeline's defaults filled in."""
    shown = {"frames": request.frames, "size": f"{request.width}x{request.height}" if request.width else None,
             "steps": request.steps, "guidance": request.guidance, "guidance 2": request.guidance_2,
             "strength": request.strength, "scheduler": request.scheduler, "flow shift": request.flow_shift,
             "fps": request.fps, "seed": request.seed, **request.extra}
    return ", ".join(f"{key} {value}" for key, value in shown.items() if value is not None)


def check_video_path(out: Path) -> None:
    """Refuse an output format before any work."""
    from vidport.runtime.video import FORMATS

    if out.suffix and out.suffix.lower() not in FORMATS and not str(out).endswith("/"):
        raise VidportError(f"{out}: unknown video format '{out.suffix}'", hint="use .mp4, .webm, .gif or a folder/ for PNG frames")


def run_generation(pipe, request):
    """One generation with a progress bar for the scheduler steps and one for the decode."""
    import mlx.core as mx

    mx.reset_peak_memory()
    with tasks_bar() as bar:
        denoise = bar.add_task("denoising", total=request.steps, item="loading weights, encoding the prompt"
                               + (" and the image" if request.image is not None else ""))
        decode = bar.add_task("decoding", total=None, item="", visible=False)

        def on_step(step):
            bar.update(denoise, total=step.total, completed=step.index + 1,
                       item=f"step {step.index + 1}/{step.total} (t={step.timestep:g}"
                            + (f", {step.model}" if step.model else "") + ")")

        def on_decode(done, total):
            bar.update(decode, visible=True, total=total, completed=done, item=f"{pipe.decode_unit} {done}/{total}")

        return pipe.generate(request, on_step=on_step, on_decode=on_decode)


def print_generation_summary(request, result, written: Path) -> None:
    import resource

    import mlx.core as mx
    import psutil

    steps = result.step_seconds
    frames, height, width = result.frames.shape[:3] if result.frames is not None else (
        request.frames, request.height, request.width)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    table = Table(show_header=False, title=f"{request.task}: {written}")
    rows = {
        "video": f"{frames} frames, {width}x{height}, {result.fps} fps, seed {result.seed}",
        **({"audio": f"{len(result.audio) / result.sample_rate:.2f} s, {result.audio.shape[1]} channels, "
                     f"{result.sample_rate} Hz"} if result.audio is not None else {}),
        "scheduler": f"{result.scheduler}, {len(steps)} steps (timesteps {result.timesteps[0]:g} .. {result.timesteps[-1]:g})" if steps else "-",
        "time per step": (f"{sum(steps) / len(steps):.2f} s mean (first {steps[0]:.2f} s, fastest {min(steps):.2f} s)" if steps else "-"),
        "denoise": f"{sum(steps):.1f} s",
        "decode": f"{result.decode_seconds:.1f} s",
        **{name: f"{value:.2f}" for name, value in result.stats.items()},
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
