"""AnimateDiff's part of pipeline parity (golden/pipeline_parity.py): diffusers' AnimateDiffPipeline /
AnimateDiffVideoToVideoPipeline built from the sources the folder's component manifests name (each
with the loader its source spec names, as `vidport verify` does per model), the folder's tokenizer
and scheduler config; both sides get diffusers' `encode_prompt` states and the same noise.

Text-to-video: the initial latents are drawn once with torch and handed to both. Image-to-video:
diffusers draws the VAE's latent sample and the noise added at the first timestep from a seeded
torch generator; the same draws are replayed here, in the same order and chunking, and handed to
the port.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.golden.pipeline_parity import ParityCase, Progress, synthetic_image, text_metrics
from vidport.runtime.pipelines.protocol import Request

# small and short: parity needs no large frames
PARITY_DEFAULTS = {"prompt": "a cat and a dog", "negative_prompt": "", "frames": 8, "steps": 5, "guidance": 7.5,
                   "seed": 0, "strength": 0.6, "decode_slice": 8}
SIDE = 64


def build_reference(ours: Any, task: str, scheduler: dict[str, Any]) -> Any:
    """diffusers' pipeline for `task` from the sources the folder's manifests name, in float32,
    running `scheduler` (the folder's config, or its class swapped)."""
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from vidport.converter.pipeline_spec import pipeline_spec
    from vidport.golden.verify import reference_model
    from vidport.reference.canonical import canonical_class

    folder = ours.folder
    spec = pipeline_spec(folder.pipeline)
    if task not in spec.reference:
        raise VidportError(f"the {spec.name} pipeline has no reference for {task}",
                           hint=f"tasks with a reference: {', '.join(spec.reference) or 'none'}")
    models = {}
    for name, manifest in folder.components.items():
        source = Path(manifest["source"])
        if not source.exists():
            raise VidportError(f"{source}: the {name} source is gone; the reference is built from it")
        models[name] = reference_model(manifest, source).to(torch.float32)
    sampler = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder.tokenizer), local_files_only=True)
    pipe = canonical_class(spec.reference[task])(tokenizer=tokenizer, scheduler=sampler, **models)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def animatediff_case(ours: Any, request: Request, source: Path | None, note: Progress) -> ParityCase:
    """The reference and inputs of one AnimateDiff parity run. Sizes default to the image's
    (image-to-video), else 64 x 64; without an image, i2v runs on a synthetic one."""
    import torch
    from PIL import Image

    if source is not None:
        raise VidportError("--source: an AnimateDiff reference is built from each component's own source",
                           hint="drop --source; the component manifests name the sources")
    task = request.task
    filled = {name: value for name, value in PARITY_DEFAULTS.items()
              if name in ours.settings(task) and getattr(request, name) is None}
    request = dataclasses.replace(request, **filled)
    if task == "i2v" and request.image is None:
        request = dataclasses.replace(request, image=synthetic_image(request.height or SIDE, request.width or SIDE))
    if request.image is None:
        request = dataclasses.replace(request, height=request.height or SIDE, width=request.width or SIDE)
    request = ours.check(request)
    reference = build_reference(ours, task, ours.folder.scheduler(request.scheduler))

    with torch.no_grad():
        positive, negative = reference.encode_prompt(request.prompt, "cpu", 1, request.guidance > 1.0,
                                                     request.negative_prompt)
    negative = negative if negative is not None else positive
    embeds = (positive.numpy(), negative.numpy())
    text = text_metrics(embeds, ours.encode_prompt(request.prompt, request.negative_prompt))

    shape = ours.latent_shape(request.frames, request.height, request.width)
    arguments = {"height": request.height, "width": request.width, "num_inference_steps": request.steps,
                 "guidance_scale": request.guidance, "output_type": "np", "decode_chunk_size": request.decode_slice,
                 "prompt_embeds": positive, "negative_prompt_embeds": negative}
    if task == "t2v":
        start = torch.randn(shape, generator=torch.Generator().manual_seed(request.seed), dtype=torch.float32)
        noise = {"noise": start.numpy().copy()}
        arguments.update(num_frames=request.frames, latents=start.clone())
    else:
        encode, added = replay_v2v_noise(request.seed, request.frames, shape[1:2] + shape[3:], request.decode_slice)
        noise = {"noise": added, "encode_noise": encode}
        arguments.update(video=[Image.fromarray(request.image)] * request.frames, strength=request.strength,
                         generator=torch.Generator().manual_seed(request.seed))
    ours_request = dataclasses.replace(request, prompt_embeds=embeds, noise=noise)
    return ParityCase(reference, arguments, ours_request, text)
