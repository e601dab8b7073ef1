"""Pipeline parity: one generation through the reference library's pipeline (diffusers) and through
the MLX port, with the same text states and the same noise, the latents compared after every
scheduler step (PCC) and the decoded frames by PSNR, against golden/metrics.py's PIPELINE_THRESHOLDS.

The comparison is the same for every pipeline; what a model contributes is named by its pipeline
spec's `parity:` entry: a function `(ours, request, source, note) -> ParityCase` that builds the
reference pipeline and the inputs both sides get (golden/animatediff_parity.py, golden/wan_parity.py).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.golden.metrics import PipelineThreshold, compare, pipeline_threshold_for, psnr, snr
from vidport.golden.quantized import pipeline_format
from vidport.runtime.pipelines.protocol import SETTINGS, Pipeline, Request, Step, open_pipeline, option

Progress = Callable[[int, int | None, str], None]


@dataclass
class StepRow:
    index: int
    timestep: float
    metrics: dict[str, float]
    passed: bool


@dataclass
class PipelineReport:
    task: str
    dtype: str
    threshold: PipelineThreshold
    steps: list[StepRow]
    psnr: float
    text: dict[str, float]  # our text encoder's prompt states against the reference's ({} where not compared)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    audio_snr: float | None = None  # the waveform against the reference's, where the pipeline makes sound
    intermediates: dict[str, dict[str, float]] = field(default_factory=dict)  # latents between stages
    quantization: str | None = None  # the denoisers' format, whose thresholds apply

    @property
    def growth(self) -> dict[str, float] | None:
        """How the error grows over the steps: 1 - PCC of the first and the last step's latents
        (each step's input is our previous step's output, so a quantized model's error compounds)."""
        if not self.steps:
            return None
        first, last = self.steps[0].metrics["pcc"], self.steps[-1].metrics["pcc"]
        return {"first_step_pcc": first, "last_step_pcc": last, "first_step_error": 1.0 - first,
                "last_step_error": 1.0 - last, "ratio": _finite((1.0 - last) / (1.0 - first)) if first < 1.0 else None}

    @property
    def worst_step(self) -> StepRow | None:
        return min(self.steps, key=lambda r: r.metrics["pcc"], default=None)

    @property
    def passed(self) -> bool:
        t = self.threshold
        return bool(self.steps and all(r.passed for r in self.steps) and self.psnr >= t.min_psnr
                    and (self.audio_snr is None or self.audio_snr >= t.min_audio_snr)
                    and all(m["pcc"] >= t.min_step_pcc for m in self.intermediates.values()))

    def as_json(self) -> dict[str, Any]:
        worst = self.worst_step
        return {"task": self.task, "dtype": self.dtype, "quantization": self.quantization, "passed": self.passed,
                "threshold": {"min_step_pcc": self.threshold.min_step_pcc, "min_psnr": self.threshold.min_psnr},
                "worst_step_pcc": worst.metrics["pcc"] if worst else None, "growth": self.growth,
                "psnr": _finite(self.psnr),  # None: identical frames
                "audio_snr": _finite(self.audio_snr), "intermediates": self.intermediates,
                "text_encoder": self.text, "settings": self.settings, "seconds": self.seconds,
                "steps": [{"index": r.index, "timestep": r.timestep, "passed": r.passed, **r.metrics}
                          for r in self.steps]}


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _latents_only(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"latents": tensors["latents"].detach().float().numpy().copy()}


@dataclass
class ParityCase:
    """What a model's parity function builds: the reference pipeline and the keyword arguments of
    its call (its step callback is added here), the checked request our pipeline runs on the same
    text states and noise, the text-state metrics, and settings for the report.

    `step_tensors` turns the tensors the reference's step callback hears into our `Step`'s layout,
    by name (`latents`, and `audio_latents` for a pipeline that makes sound). A reference with an
    `intermediates` dict after the call (a chain of pipelines) has those compared with ours."""

    reference: Any
    arguments: dict[str, Any]
    request: Request
    text: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    step_tensors: Callable[[dict[str, Any]], dict[str, np.ndarray]] = _latents_only


def synthetic_image(height: int, width: int) -> np.ndarray:
    """A deterministic RGB uint8 image (height, width, 3) with structure in both directions and all
    three channels: the image-to-video input when none is given."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), 0.5 + 0.5 * np.sin((x + 2 * y) / 3.0)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def text_metrics(reference: tuple[np.ndarray, np.ndarray], ours: tuple[Any, Any]) -> dict[str, float]:
    """Our (prompt, negative) text states against the reference's."""
    import mlx.core as mx

    return compare(np.concatenate(reference), np.concatenate([np.array(m.astype(mx.float32)) for m in ours]))


def _parity_function(folder: Path) -> tuple[Pipeline, Callable[..., ParityCase], str]:
    from vidport.converter.core.manifest import read_manifest
    from vidport.converter.core.named import named_object
    from vidport.converter.pipeline_spec import pipeline_spec

    manifest = read_manifest(folder)
    ours = open_pipeline(folder)
    spec = pipeline_spec(manifest["pipeline"])
    if not spec.parity:
        raise VidportError(f"{folder}: the {spec.name} pipeline has no parity ({spec.path.name} names no `parity:`)")
    return ours, named_object(spec.parity), manifest["dtype"]


def parity_tasks(folder: str | Path) -> tuple[str, ...]:
    """What `vidport verify --pipeline` checks by default: every task the folder runs."""
    return _parity_function(Path(folder))[0].tasks


def _task_request(ours: Pipeline, task: str, request: Request) -> Request:
    """`request` for `task`: a setting only another task of the pipeline takes (an image, i2v's
    strength) is dropped; one no task takes is refused."""
    taken = ours.settings(task)
    anywhere = set().union(*(ours.settings(other) for other in ours.tasks))
    given = [name for name in SETTINGS if getattr(request, name) is not None]
    never = [name for name in given if name not in anywhere]
    if never:
        raise VidportError(f"the {ours.name} pipeline takes no {', '.join(option(name) for name in never)}",
                           hint="drop it")
    return dataclasses.replace(request, task=task, **{name: None for name in given if name not in taken})


def pipeline_parity(folder: str | Path, task: str | None = None, source: str | Path | None = None,
                    progress: Progress | None = None, **settings: Any) -> PipelineReport:
    """Run `task` (default: the folder's first) through the reference and the port; per-step latent
    metrics and final-frame PSNR. `settings` are `Request` fields (None: the model's parity default,
    small sizes and few steps); `source`: what the reference is built from where a model builds it
    from one source (default: the folder's manifest's)."""
    import torch

    folder = Path(folder)
    note = progress or (lambda done, total, item: None)
    clock = time.perf_counter()
    ours, build, dtype = _parity_function(folder)
    task = task or ours.tasks[0]
    if task not in ours.tasks:
        raise VidportError(f"{folder}: the {ours.name} pipeline runs {' or '.join(ours.tasks)}, not {task}",
                           hint=f"verify it with --task {ours.tasks[0]}")
    scheduler = settings.get("scheduler")
    if scheduler and "Ancestral" in scheduler:
        raise VidportError(f"{scheduler} draws new noise at every step inside diffusers' loop; parity needs a "
                           "deterministic sampler", hint="DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, ...")
    request = _task_request(ours, task, Request(**settings))
    note(0, None, "building the reference")
    case = build(ours, request, Path(source) if source else None, note)
    timings = {"load": time.perf_counter() - clock}

    captured: list[tuple[float, dict[str, np.ndarray]]] = []

    def capture(pipe, index, t, tensors):
        captured.append((float(t), case.step_tensors(tensors)))
        note(len(captured), None, f"reference step {index} (t={float(t):g})")
        return {}

    clock = time.perf_counter()
    with torch.no_grad():
        output = case.reference(**case.arguments, callback_on_step_end=capture)
    timings["reference"] = time.perf_counter() - clock

    got: list[Step] = []

    def record(step: Step) -> None:
        got.append(dataclasses.replace(step, latents=np.array(step.latents), audio_latents=None if step.audio_latents is None
                                       else np.array(step.audio_latents)))
        note(len(captured) + len(got), None, f"mlx step {step.index} (t={step.timestep:g})")

    clock = time.perf_counter()
    result = ours.generate(case.request, on_step=record)
    timings["mlx"] = time.perf_counter() - clock

    if len(got) != len(captured):
        raise VidportError(f"the port ran {len(got)} steps, the reference {len(captured)}")
    quantization = pipeline_format(folder)
    threshold = pipeline_threshold_for(quantization or dtype)
    rows = []
    for index, ((t, want), have) in enumerate(zip(captured, got)):
        metrics = compare(want["latents"], have.latents)
        passed = bool(metrics["finite"] and metrics["pcc"] >= threshold.min_step_pcc)
        if "audio_latents" in want and have.audio_latents is not None:
            audio = compare(want["audio_latents"], have.audio_latents)
            metrics["audio_pcc"] = audio["pcc"]
            passed = passed and bool(audio["finite"] and audio["pcc"] >= threshold.min_step_pcc)
        rows.append(StepRow(index, t, metrics, passed))
    run = case.request
    report_settings = {"prompt": run.prompt, "negative_prompt": run.negative_prompt, "frames": run.frames,
                       "steps": run.steps, "guidance": run.guidance, "height": run.height, "width": run.width,
                       "seed": run.seed, "folder": str(folder), "scheduler": result.scheduler,
                       "reference": type(case.reference).__name__,
                       **({"strength": run.strength} if run.strength is not None else {}), **case.settings}
    if any(step.model for step in got):  # a pipeline with several models (Wan 2.2 A14B): which ran each step
        report_settings["experts"] = [step.model for step in got]
    reference_audio = getattr(output, "audio", None)
    audio_snr = None
    if reference_audio is not None and result.audio is not None:
        audio_snr = snr(reference_audio[0].float().numpy().T, result.audio)
    ours_between = result.intermediates
    between = {name: compare(value, ours_between[name])
               for name, value in getattr(case.reference, "intermediates", {}).items() if name in ours_between}
    return PipelineReport(task, dtype, threshold, rows, float(psnr(output.frames[0], result.frames)), case.text,
                          report_settings, timings, audio_snr, between, quantization)
