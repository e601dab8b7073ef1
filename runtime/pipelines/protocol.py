"""One protocol for every generation pipeline (AnimateDiff, Wan; LTX-2 and Self-Forcing next), so
`vidport generate` and `vidport verify --pipeline` drive any of them with no per-model code.

A pipeline class (named by its pipeline spec's `runtime:` entry) opens a converted folder without
loading weights (`from_folder`), says which tasks it runs and each task's defaults and settings,
checks a `Request` against its configs before any weight loads (`check`), and generates with a
step and a decode callback (`generate`). A `Request` field left None means "the pipeline's
default"; a field the pipeline does not take for the task is refused, never silently ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from vidport.converter.core.errors import VidportError

# settings a pipeline may take or refuse (see `Pipeline.settings`); `task`, `decode` and
# `release_weights` apply to every pipeline, `extra` holds model-specific settings by name
SETTINGS = ("prompt", "negative_prompt", "image", "frames", "steps", "guidance", "guidance_2", "height", "width",
            "seed", "noise", "strength", "scheduler", "flow_shift", "decode_slice", "fps", "prompt_embeds")


@dataclass
class Request:
    """One generation. None means the pipeline's default (`Pipeline.defaults`); `check` returns the
    request with every default filled in."""

    task: str | None = None  # t2v, i2v, ti2v, ...: one of the pipeline's `tasks`
    prompt: str | None = None
    negative_prompt: str | None = None
    image: Any = None  # a path, a PIL image or uint8 (H, W, 3)
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None  # classifier-free guidance scale; <= 1: none
    guidance_2: float | None = None  # a second model's scale (Wan 2.2 A14B's low-noise expert)
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    noise: np.ndarray | dict[str, np.ndarray] | None = None  # the initial noise, or named draws (`noise_names`)
    strength: float | None = None  # image-to-video: how far from the image (0, 1]
    scheduler: str | None = None  # swap the folder's scheduler class, keeping its schedule
    flow_shift: float | None = None  # a flow schedule's shift
    decode_slice: int | None = None  # frames the VAE decodes at a time
    fps: int | None = None
    prompt_embeds: tuple[Any, Any] | None = None  # (prompt, negative) text states instead of the prompts
    decode: bool = True  # False: stop at the latents
    release_weights: bool = False  # free each model once this run is done with it (one-shot runs: the CLI)
    # a pipeline that `streams_frames`: opens the output once the soundtrack is known, (audio,
    # sample rate) -> a context manager whose `append(frames)` takes frames as they are decoded, and
    # optionally `abort()`, which removes the partial output when the process must exit unwound
    # (a parallel run's watchdog)
    writer: Callable[[Any, int | None], Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # model-specific settings (`Pipeline.settings` names them)

    def draws(self) -> dict[str, np.ndarray]:
        """`noise` as named draws: an array is the initial noise, {"noise": array}."""
        if self.noise is None:
            return {}
        if isinstance(self.noise, dict):
            return {name: value for name, value in self.noise.items() if value is not None}
        return {"noise": self.noise}


@dataclass
class Step:
    """What a step callback hears: the step, its timestep and the latents after it, in diffusers'
    layout (1, C, frames, h, w), and which model ran it where a pipeline has several."""

    index: int
    total: int
    timestep: float
    latents: Any  # mx.array
    model: str | None = None
    audio_latents: Any = None  # a pipeline that makes sound: (1, C, L, mel bins)


StepCallback = Callable[[Step], None]
DecodeCallback = Callable[[int, int], None]  # (done, total) in the pipeline's `decode_unit`


@dataclass
class Generation:
    """What a run made: frames (frames, H, W, 3) float32 in [0, 1] (None when not decoded) at `fps`,
    the final latents (1, C, frames, h, w), the seed of the noise not supplied, the timesteps and
    timings; `audio` (samples, channels) at `sample_rate` for a pipeline that makes sound."""

    frames: np.ndarray | None
    latents: Any
    seed: int | None
    timesteps: list[float]
    fps: int
    scheduler: str
    step_seconds: list[float] = field(default_factory=list)
    decode_seconds: float = 0.0
    audio: np.ndarray | None = None
    sample_rate: int | None = None
    audio_latents: Any = None
    intermediates: dict[str, np.ndarray] = field(default_factory=dict)  # named latents between stages
    stats: dict[str, float] = field(default_factory=dict)  # a pipeline's own figures (time to first frame, ...)


def option(name: str) -> str:
    """The command-line option of a request setting (`guidance_2` -> `--guidance-2`)."""
    return "--" + name.replace("_", "-")


class Pipeline:
    """The protocol. A subclass implements `from_folder`, `tasks`, `defaults`, `settings`,
    `validate` and `run` (and `resolve` where a default depends on the request, such as a size
    taken from the image); `check` and `generate` are the same for every pipeline."""

    name: ClassVar[str]  # the pipeline spec's name
    decode_unit: ClassVar[str] = "frames"  # what the decode callback counts
    streams_frames: ClassVar[bool] = False  # hands decoded frames to `Request.writer` as they are ready

    @classmethod
    def from_folder(cls, path: str | Path) -> "Pipeline":
        """Open a converted folder: configs, tokenizer, scheduler config; no weights yet."""
        raise NotImplementedError

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this folder's models run."""
        raise NotImplementedError

    def defaults(self, task: str) -> Request:
        """The request `task` runs when a setting is left None."""
        raise NotImplementedError

    def settings(self, task: str) -> set[str]:
        """The `Request` fields (of SETTINGS) and `extra` keys `task` takes; others are refused."""
        raise NotImplementedError

    def validate(self, request: Request) -> None:
        """Refuse a resolved request the models cannot run, from configs alone (no weight read)."""
        raise NotImplementedError

    def run(self, request: Request, on_step: StepCallback | None, on_decode: DecodeCallback | None) -> Generation:
        """Generate a checked, resolved request."""
        raise NotImplementedError

    def resolve(self, request: Request) -> Request:
        """`request` with every None setting the task takes filled from `defaults`."""
        defaults = self.defaults(request.task)
        taken = self.settings(request.task)
        filled = {name: getattr(defaults, name) for name in SETTINGS
                  if name in taken and getattr(request, name) is None}
        extra = {key: value for key, value in defaults.extra.items() if key in taken}
        return dataclasses.replace(request, **filled, extra={**extra, **request.extra})

    # ------------------------------------------------------------------ the same for every pipeline

    def default_task(self, request: Request) -> str:
        """The first task that takes an image if the request has one, else the first that takes none."""
        wants_image = request.image is not None
        return next((task for task in self.tasks if ("image" in self.settings(task)) == wants_image), self.tasks[0])

    def check(self, request: Request) -> Request:
        """Refuse what cannot run, before any weight loads; return the request with its defaults."""
        task = request.task or self.default_task(request)
        if task not in self.tasks:
            raise VidportError(f"this {self.name} pipeline runs {' or '.join(self.tasks)}, not {task}",
                               hint=f"vidport generate {self.tasks[0]} ..."
                                    + (" --image IMG" if "image" in self.settings(self.tasks[0]) else ""))
        taken = self.settings(task)
        unused = [name for name in SETTINGS if getattr(request, name) is not None and name not in taken]
        unused += sorted(set(request.extra) - taken)
        if unused:
            named = ", ".join(f"{name} ({option(name)})" if name in SETTINGS else f"{name} (--set {name}=...)"
                              for name in unused)
            settings = sorted(name for name in taken if name in SETTINGS) + sorted(taken - set(SETTINGS))
            raise VidportError(f"{task} on this {self.name} pipeline takes no {named}",
                               hint=f"drop it; {task} takes: {', '.join(settings)}")
        resolved = self.resolve(dataclasses.replace(request, task=task))
        self.validate(resolved)
        return resolved

    def generate(self, request: Request, on_step: StepCallback | None = None,
                 on_decode: DecodeCallback | None = None) -> Generation:
        """Check `request` (before any weight loads), then run it."""
        return self.run(self.check(request), on_step, on_decode)

    def text_to_video(self, prompt: str | None, on_step: StepCallback | None = None,
                      on_decode: DecodeCallback | None = None, **settings: Any) -> Generation:
        """`generate` for task t2v: `settings` are `Request` fields."""
        return self.generate(Request(task="t2v", prompt=prompt, **settings), on_step, on_decode)

    def image_to_video(self, image: Any, prompt: str | None, on_step: StepCallback | None = None,
                       on_decode: DecodeCallback | None = None, **settings: Any) -> Generation:
        """`generate` for this pipeline's first task that takes an image."""
        task = next((task for task in self.tasks if "image" in self.settings(task)), None)
        if task is None:
            raise VidportError(f"this {self.name} pipeline runs {' or '.join(self.tasks)}: it takes no image",
                               hint="drop --image, or use a pipeline with an image-to-video model")
        return self.generate(Request(task=task, prompt=prompt, image=image, **settings), on_step, on_decode)


def open_pipeline(path: str | Path) -> Pipeline:
    """The pipeline class the folder's pipeline spec names (`runtime:`), opened on the folder."""
    from vidport.converter.core.named import named_object
    from vidport.converter.pipeline_spec import load_pipeline_specs, pipeline_spec
    from vidport.runtime.pipelines.folder import PipelineFolder

    folder = PipelineFolder.open(path)
    spec = pipeline_spec(folder.pipeline)
    if spec.runtime is None:
        runnable = [name for name, other in load_pipeline_specs().items() if other.runtime]
        raise VidportError(f"{folder.path}: the {spec.name} pipeline has no runtime ({spec.path.name} names no "
                           "`runtime:`)", hint=f"pipelines that generate: {', '.join(runnable) or 'none'}")
    cls = named_object(spec.runtime)
    if not (isinstance(cls, type) and issubclass(cls, Pipeline)):
        raise VidportError(f"{spec.path.name}: runtime {spec.runtime} is not a vidport Pipeline class")
    return cls.from_folder(folder.path)
