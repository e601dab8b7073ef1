"""Wan's part of pipeline parity (golden/pipeline_parity.py): the spec's reference for the task
(diffusers' WanPipeline / WanImageToVideoPipeline) built with `from_pretrained` from the Diffusers
folder the MLX pipeline was converted from, running our scheduler config; both sides get the reference's text states, the
same initial noise and the same first frame.

The reference's text states come from its own UMT5 (`WanPipeline._get_t5_prompt_embeds`; the I2V
pipeline's prompt cleaning needs `ftfy`), and are compared with ours on their own. A two-expert
(A14B) model names the expert of each step in the report's `settings["experts"]`."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.golden.pipeline_parity import ParityCase, Progress, synthetic_image, text_metrics
from vidport.runtime.pipelines.protocol import Request

# small and short: the smallest size the models take is the default (see wan_case)
PARITY_DEFAULTS = {"prompt": "a red cat walks slowly on the green mat under the sun",
                   "negative_prompt": "blurry, low quality, static frame", "frames": 5, "steps": 4, "guidance": 5.0,
                   "seed": 0}


def _reference(ours: Any, task: str, source: Path, scheduler: dict[str, Any]) -> Any:
    """The spec's reference pipeline for `task` loaded from the Diffusers folder, running our
    scheduler config (the folder's, or its class swapped)."""
    import diffusers
    import torch

    from vidport.converter.pipeline_spec import pipeline_spec
    from vidport.reference.canonical import canonical_class

    spec = pipeline_spec(ours.folder.pipeline)
    pipe = canonical_class(spec.reference[task]).from_pretrained(str(source), dtype=torch.float32,
                                                                 local_files_only=True)
    pipe.scheduler = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference_states(pipe: Any, prompts: list[str], length: int) -> list[np.ndarray]:
    import torch
    from diffusers import WanPipeline

    with torch.no_grad():  # WanPipeline's own encoding, also for the I2V pipeline (see the module doc)
        return [WanPipeline._get_t5_prompt_embeds(pipe, prompt=p, max_sequence_length=length).float().numpy()
                for p in prompts]


def wan_case(ours: Any, request: Request, source: Path | None, note: Progress) -> ParityCase:
    """The reference and inputs of one Wan parity run: t2v (also a TI2V model without an image),
    i2v (Wan 2.1 I2V), ti2v (a TI2V model with the image). The size defaults to the smallest the
    models take, x2 by x3 (a synthetic first frame is drawn at that size unless an image is given)."""
    import torch

    task = request.task
    with_image = task != "t2v"
    source = Path(source or ours.folder.manifest["inputs"]["wan"]["path"])
    if not (source / "model_index.json").exists():
        raise VidportError(f"{source}: not a Diffusers Wan folder (no model_index.json)",
                           hint="pass the folder this pipeline was converted from (--source)")
    mult_h, mult_w = ours.layout.multiple
    filled = {name: value for name, value in PARITY_DEFAULTS.items() if getattr(request, name) is None}
    request = dataclasses.replace(request, **filled, height=request.height or 2 * mult_h,
                                  width=request.width or 3 * mult_w)
    if with_image and request.image is None:
        request = dataclasses.replace(request, image=synthetic_image(request.height, request.width))
    request = ours.check(request)
    length = request.extra["max_sequence_length"]
    noise = np.random.default_rng(request.seed).standard_normal(
        ours.latent_shape(request.frames, request.height, request.width)).astype(np.float32)
    reference = _reference(ours, task, source, ours.scheduler_for(request))

    positive, negative = _reference_states(reference, [request.prompt, request.negative_prompt], length)
    text = {}
    if ours.has("text_encoder"):
        text = text_metrics((positive, negative), ours.encode_prompt(request.prompt, request.negative_prompt, length))
    arguments = dict(prompt_embeds=torch.from_numpy(positive), negative_prompt_embeds=torch.from_numpy(negative),
                     height=request.height, width=request.width, num_frames=request.frames,
                     num_inference_steps=request.steps, guidance_scale=request.guidance,
                     latents=torch.from_numpy(noise.copy()), output_type="np",
                     **({"image": request.image} if with_image else {}))
    ours_request = dataclasses.replace(request, prompt_embeds=(positive, negative), noise=noise)
    return ParityCase(reference, arguments, ours_request, text,
                      {"source": str(source), "model_task": ours.task})
