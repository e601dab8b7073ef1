"""Wan pipeline parity: the same text embeddings, the same initial noise and the same first frame
through diffusers' WanPipeline / WanImageToVideoPipeline (built with `from_pretrained` from the
Diffusers folder the MLX pipeline was converted from) and through runtime.pipelines.wan; the
latents after every scheduler step compared (PCC, max abs), and the decoded frames (PSNR).

The reference's text states come from its own UMT5 (`WanPipeline._get_t5_prompt_embeds`; the I2V
pipeline's prompt cleaning needs `ftfy`), and are compared with ours on their own. The report is
golden/pipeline_parity.py's; a two-expert (A14B) model names the expert of each step in
`settings["experts"]`."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.golden.metrics import compare, pipeline_threshold_for, psnr
from vidport.golden.pipeline_parity import PipelineReport, Progress, StepRow

WAN_TASKS = ("t2v", "i2v", "ti2v")
PROMPT = "a red cat walks slowly on the green mat under the sun"
NEGATIVE = "blurry, low quality, static frame"


def sample_frame(height: int, width: int):
    """A deterministic first frame with structure in both directions and all three channels."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / max(width - 1, 1), y / max(height - 1, 1),
                    0.5 + 0.5 * np.sin((x + 2 * y) / 3.0)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def model_tasks(folder: str | Path) -> list[str]:
    """What `vidport verify --pipeline` checks by default: the model's own task (a TI2V model:
    with and without the image)."""
    from vidport.runtime.pipelines.wan import WanPipeline

    task = WanPipeline.open(folder).task
    return ["t2v", "ti2v"] if task == "ti2v" else [task]


def _reference(source: Path, with_image: bool, scheduler: dict):
    """diffusers' own pipeline loaded from the Diffusers folder, running our scheduler config (the
    folder's, or its class swapped)."""
    import diffusers
    import torch
    from diffusers import WanImageToVideoPipeline, WanPipeline

    cls = WanImageToVideoPipeline if with_image else WanPipeline
    pipe = cls.from_pretrained(str(source), dtype=torch.float32, local_files_only=True)
    pipe.scheduler = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_states(pipe, prompts: list[str], length: int) -> list[np.ndarray]:
    import torch
    from diffusers import WanPipeline

    with torch.no_grad():  # WanPipeline's own encoding, also for the I2V pipeline (see the module doc)
        return [WanPipeline._get_t5_prompt_embeds(pipe, prompt=p, max_sequence_length=length).float().numpy()
                for p in prompts]


def wan_parity(folder: str | Path, task: str | None = None, source: str | Path | None = None,
               prompt: str = PROMPT, negative_prompt: str = NEGATIVE, frames: int = 5, steps: int = 4,
               guidance: float = 5.0, height: int | None = None, width: int | None = None, seed: int = 0,
               image=None, max_sequence_length: int = 512, scheduler: str | None = None,
               progress: Progress | None = None) -> PipelineReport:
    """Run `task` through both pipelines: t2v (also a TI2V model without an image), i2v (Wan 2.1
    I2V, or a TI2V model with the image), ti2v (= i2v on a TI2V model); default: the model's own
    task, with an image where it takes one. The size defaults to the smallest the models take,
    x2 by x3 (the test image is drawn at that size unless `image` is given). `scheduler` swaps
    the scheduler class on both sides, keeping the folder's schedule."""
    import mlx.core as mx
    import torch

    from vidport.runtime.pipelines.wan import WanPipeline
    from vidport.runtime.pipelines.wan_image import load_image

    note = progress or (lambda done, total, item: None)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    ours = WanPipeline.open(folder, scheduler)
    task = task or ours.task
    if task not in WAN_TASKS:
        raise VidportError(f"unknown task '{task}'", hint="one of t2v, i2v, ti2v")
    with_image = task != "t2v"
    if with_image and ours.task == "t2v":
        raise VidportError(f"{folder}: a text-to-video model; it takes no image", hint="verify it with task t2v")
    if not with_image and ours.task == "i2v":
        raise VidportError(f"{folder}: an image-to-video model (Wan 2.1 I2V); it needs an image",
                           hint="verify it with task i2v")
    if task == "ti2v" and ours.task != "ti2v":
        raise VidportError(f"{folder}: a Wan {ours.task} model, not TI2V", hint=f"verify it with task {ours.task}")
    source = Path(source or ours.folder.manifest["inputs"]["wan"]["path"])
    if not (source / "model_index.json").exists():
        raise VidportError(f"{source}: not a Diffusers Wan folder (no model_index.json)",
                           hint="pass the folder this pipeline was converted from")
    mult_h, mult_w = ours.layout.multiple
    height, width = height or 2 * mult_h, width or 3 * mult_w
    picture = (sample_frame(height, width) if image is None else load_image(image)) if with_image else None
    noise = np.random.default_rng(seed).standard_normal(ours.latent_shape(frames, height, width)).astype(np.float32)
    ours.check_request(ours.request(picture, prompt, negative_prompt, frames, steps, guidance, height=height,
                                    width=width, noise=noise, max_sequence_length=max_sequence_length))
    note(0, None, "building the diffusers reference")
    reference = _reference(source, with_image, ours.scheduler_config)
    timings["load"] = time.perf_counter() - clock

    positive, negative = _reference_states(reference, [prompt, negative_prompt], max_sequence_length)
    text = {}
    if ours.has("text_encoder"):
        mine = ours.encode_prompt(prompt, negative_prompt, max_sequence_length)
        text = compare(np.concatenate([positive, negative]),
                       np.concatenate([np.array(m.astype(mx.float32)) for m in mine]))

    captured: list[tuple[float, np.ndarray]] = []

    def capture(pipe, index, t, tensors):
        captured.append((float(t), tensors["latents"].detach().float().numpy().copy()))
        note(len(captured), None, f"diffusers step {index} (t={float(t):g})")
        return {}

    arguments = dict(prompt_embeds=torch.from_numpy(positive), negative_prompt_embeds=torch.from_numpy(negative),
                     height=height, width=width, num_frames=frames, num_inference_steps=steps,
                     guidance_scale=guidance, latents=torch.from_numpy(noise.copy()), output_type="np",
                     callback_on_step_end=capture)
    clock = time.perf_counter()
    with torch.no_grad():
        expected = reference(**arguments, **({"image": picture} if with_image else {})).frames[0]
    timings["diffusers"] = time.perf_counter() - clock

    got: list[np.ndarray] = []

    def record(index, total, t, latents):
        got.append(np.array(latents))
        note(len(captured) + len(got), None, f"mlx step {index} (t={float(t):g})")

    clock = time.perf_counter()
    common = dict(prompt=None, frames=frames, steps=steps, guidance=guidance, height=height, width=width,
                  noise=noise, prompt_embeds=(positive, negative), on_step=record,
                  max_sequence_length=max_sequence_length)
    result = ours.image_to_video(picture, **common) if with_image else ours.text_to_video(**common)
    timings["mlx"] = time.perf_counter() - clock

    if len(got) != len(captured):
        raise VidportError(f"the port ran {len(got)} steps, diffusers {len(captured)}")
    threshold = pipeline_threshold_for(ours.folder.manifest["dtype"])
    boundary = ours.layout.boundary_ratio
    rows, experts = [], []
    for index, ((t, want), have) in enumerate(zip(captured, got)):
        metrics = compare(want, have)
        rows.append(StepRow(index, t, metrics, bool(metrics["finite"] and metrics["pcc"] >= threshold.min_step_pcc)))
        experts.append(ours.expert_at(t))
    settings = {"prompt": prompt, "negative_prompt": negative_prompt, "frames": frames, "steps": steps,
                "guidance": guidance, "height": height, "width": width, "seed": seed, "folder": str(folder),
                "source": str(source), "reference": type(reference).__name__, "model_task": ours.task,
                "scheduler": ours.scheduler_config["_class_name"],
                **({"boundary_ratio": boundary, "experts": experts} if boundary is not None else {})}
    return PipelineReport(task, ours.folder.manifest["dtype"], threshold, rows, psnr(expected, result.frames),
                          text, settings, timings)
