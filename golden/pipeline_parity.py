"""Pipeline parity: one generation through diffusers' AnimateDiff pipeline and through the MLX
port, with the same prompt embeddings and the same noise, the latents compared after every
scheduler step and the decoded frames by PSNR.

The diffusers pipeline is built from the sources the pipeline folder's manifests name (each
component with the loader its source spec names, as `vidport verify` does per model), the
folder's tokenizer and scheduler config. Text-to-video: the initial latents are drawn once with
torch and handed to both. Image-to-video: diffusers draws the VAE's latent sample and the noise
added at the first timestep from a seeded torch generator; the same draws are replayed here, in
the same order and chunking, and handed to the port.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.golden.metrics import PipelineThreshold, compare, pipeline_threshold_for, psnr

Progress = Callable[[int, int | None, str], None]
TASKS = ("t2v", "i2v")


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
    text: dict[str, float]  # our text encoder's prompt embeddings against diffusers'
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def worst_step(self) -> StepRow | None:
        return min(self.steps, key=lambda r: r.metrics["pcc"], default=None)

    @property
    def passed(self) -> bool:
        return bool(self.steps and all(r.passed for r in self.steps) and self.psnr >= self.threshold.min_psnr)

    def as_json(self) -> dict[str, Any]:
        worst = self.worst_step
        return {"task": self.task, "dtype": self.dtype, "passed": self.passed,
                "threshold": {"min_step_pcc": self.threshold.min_step_pcc, "min_psnr": self.threshold.min_psnr},
                "worst_step_pcc": worst.metrics["pcc"] if worst else None,
                "psnr": float(self.psnr) if math.isfinite(self.psnr) else None,  # None: identical frames
                "text_encoder": self.text, "settings": self.settings, "seconds": self.seconds,
                "steps": [{"index": r.index, "timestep": r.timestep, "passed": r.passed, **r.metrics}
                          for r in self.steps]}


def build_reference(folder: Path, task: str, scheduler: str | None = None) -> Any:
    """diffusers' pipeline for `task` from the sources the folder's manifests name, in float32;
    `scheduler` swaps the scheduler class, keeping the folder's schedule."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from vidport.converter.pipeline_spec import pipeline_spec
    from vidport.golden.verify import reference_model
    from vidport.reference.canonical import canonical_class
    from vidport.runtime.pipelines.folder import PipelineFolder

    pipeline = PipelineFolder.open(folder)
    spec = pipeline_spec(pipeline.pipeline)
    if task not in spec.reference:
        raise VidportError(f"the {spec.name} pipeline has no reference for {task}",
                           hint=f"tasks with a reference: {', '.join(spec.reference) or 'none'}")
    models = {}
    for name, manifest in pipeline.components.items():
        source = Path(manifest["source"])
        if not source.exists():
            raise VidportError(f"{source}: the {name} source is gone; the reference is built from it")
        models[name] = reference_model(manifest, source).to(torch.float32)
    config = dict(pipeline.scheduler_config)
    sampler = getattr(diffusers, scheduler or config["_class_name"]).from_config(config)
    tokenizer = CLIPTokenizer.from_pretrained(str(pipeline.tokenizer), local_files_only=True)
    pipe = canonical_class(spec.reference[task])(tokenizer=tokenizer, scheduler=sampler, **models)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(image: np.ndarray | str | Path | None, height: int, width: int, seed: int) -> np.ndarray:
    from fixtures.pipelines import sample_image
    from vidport.runtime.pipelines.inputs import read_image

    if image is None:
        return sample_image(height, width, seed)
    return read_image(image) if isinstance(image, (str, Path)) else np.asarray(image, dtype=np.uint8)


def replay_v2v_noise(seed: int, frames: int, latent: tuple[int, int, int], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The two draws diffusers' AnimateDiffVideoToVideoPipeline makes from `Generator().manual_seed(seed)`:
    the VAE's latent sample per chunk of frames (chunk, C, h, w), then the added noise
    (1, frames, C, h, w); both returned in the latent layout (1, C, frames, h, w)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    channels, h, w = latent
    samples = [torch.randn((min(chunk, frames - start), channels, h, w), generator=generator, dtype=torch.float32)
               for start in range(0, frames, chunk)]
    noise = torch.randn((1, frames, channels, h, w), generator=generator, dtype=torch.float32)
    encode = torch.cat(samples).permute(1, 0, 2, 3)[None]
    return encode.numpy().copy(), noise.permute(0, 2, 1, 3, 4).numpy().copy()


def pipeline_parity(folder: str | Path, task: str = "t2v", prompt: str = "a cat and a dog",
                    negative_prompt: str = "", frames: int = 8, steps: int = 5, guidance: float = 7.5,
                    height: int | None = None, width: int | None = None, strength: float = 0.6, seed: int = 0,
                    image: np.ndarray | str | Path | None = None, decode_slice: int = 8,
                    scheduler: str | None = None, progress: Progress | None = None) -> PipelineReport:
    """Run `task` through both pipelines; per-step latent metrics and final-frame PSNR. The size
    defaults to an image's (image-to-video), else 64 x 64: parity needs no large frames.
    `scheduler` swaps the folder's scheduler class on both sides; ancestral samplers draw fresh
    noise inside diffusers' loop at every step, which no replay here reproduces: refused."""
    import mlx.core as mx
    import torch

    from vidport.runtime.pipelines.animatediff import AnimateDiffPipeline

    if task not in TASKS:
        raise VidportError(f"unknown task '{task}'", hint=f"one of {', '.join(TASKS)}")
    folder = Path(folder)
    note = progress or (lambda done, total, item: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    if scheduler and "Ancestral" in scheduler:
        raise VidportError(f"{scheduler} draws new noise at every step inside diffusers' loop; parity needs a "
                           "deterministic sampler", hint="DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, ...")
    ours = AnimateDiffPipeline.from_folder(folder, scheduler)
    if task == "i2v" and image is not None:
        picture = _image(image, 0, 0, seed)
        height, width = height or picture.shape[0], width or picture.shape[1]
    height, width = height or 64, width or 64
    if task == "i2v" and image is None:
        picture = _image(None, height, width, seed)
    elif task == "t2v":
        picture = None
    ours.check_request(frames, height, width, steps, strength if task == "i2v" else None, picture)
    note(0, None, "building the diffusers reference")
    reference = build_reference(folder, task, scheduler)
    timings["load"] = time.perf_counter() - clock

    with torch.no_grad():
        positive, negative = reference.encode_prompt(prompt, "cpu", 1, guidance > 1.0, negative_prompt)
    negative = negative if negative is not None else positive
    embeds = (positive.numpy(), negative.numpy())
    mine = ours.encode_prompt(prompt, negative_prompt)
    text = compare(np.concatenate(embeds), np.concatenate([np.array(m.astype(mx.float32)) for m in mine]))

    shape = ours.latent_shape(frames, height, width)
    captured: list[np.ndarray] = []
    timesteps: list[float] = []

    def capture(pipe, index, t, tensors):
        captured.append(tensors["latents"].detach().numpy().copy())
        timesteps.append(float(t))
        note(len(captured), None, f"diffusers step {index} (t={float(t):g})")
        return {}

    common = {"num_frames": frames, "height": height, "width": width, "num_inference_steps": steps,
              "guidance_scale": guidance, "output_type": "np", "decode_chunk_size": decode_slice,
              "callback_on_step_end": capture, "prompt_embeds": positive, "negative_prompt_embeds": negative}
    clock = time.perf_counter()
    if task == "t2v":
        start = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        noise = {"noise": start.numpy().copy()}
        with torch.no_grad():
            expected = reference(latents=start.clone(), **common).frames[0]
    else:
        from PIL import Image

        encode, added = replay_v2v_noise(seed, frames, shape[1:2] + shape[3:], decode_slice)
        noise = {"noise": added, "encode_noise": encode}
        del common["num_frames"]
        with torch.no_grad():
            expected = reference(video=[Image.fromarray(picture)] * frames, strength=strength,
                                 generator=torch.Generator().manual_seed(seed), **common).frames[0]
    timings["diffusers"] = time.perf_counter() - clock

    got: list[np.ndarray] = []

    def record(index, total, t, latents):
        got.append(np.array(latents))
        note(len(captured) + len(got), None, f"mlx step {index} (t={float(t.item()):g})")

    clock = time.perf_counter()
    arguments = {"negative_prompt": negative_prompt, "frames": frames, "steps": steps, "guidance": guidance,
                 "height": height, "width": width, "prompt_embeds": embeds, "decode_slice": decode_slice,
                 "on_step": record, **noise}
    if task == "t2v":
        result = ours.text_to_video(prompt, **arguments)
    else:
        result = ours.video_to_video(picture, prompt, strength=strength, **arguments)
    timings["mlx"] = time.perf_counter() - clock

    threshold = pipeline_threshold_for(ours.folder.manifest["dtype"])
    if len(got) != len(captured):
        raise VidportError(f"the port ran {len(got)} steps, diffusers {len(captured)}")
    rows = []
    for index, (want, have) in enumerate(zip(captured, got)):
        metrics = compare(want, have)
        rows.append(StepRow(index, timesteps[index], metrics,
                            bool(metrics["finite"] and metrics["pcc"] >= threshold.min_step_pcc)))
    settings = {"prompt": prompt, "negative_prompt": negative_prompt, "frames": frames, "steps": steps,
                "guidance": guidance, "height": height, "width": width, "seed": seed, "folder": str(folder),
                "scheduler": ours.scheduler_config["_class_name"], **({"strength": strength} if task == "i2v" else {})}
    return PipelineReport(task, ours.folder.manifest["dtype"], threshold, rows, float(psnr(expected, result.frames)),
                          text, settings, timings)
