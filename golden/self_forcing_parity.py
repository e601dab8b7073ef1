"""Self-Forcing's part of pipeline parity (golden/pipeline_parity.py): the reference sampler
(reference/self_forcing_sampler.py, the official loop) around diffusers' models built by their own
loaders from the sources the folder was converted from: the DiT from the Self-Forcing checkpoint
(diffusers' `from_single_file` on the generator's weights), the VAE and UMT5 from the Wan base.

Both sides get the reference's text states, the same starting noise and the same re-noising draws
(and for i2v the same image, and CLIP's tokens of it where the DiT cross-attends to them); every denoising step's x0 of every block is compared, then the frames.
The reference recomputes the whole sequence for every pass where ours reads its KV cache."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from vidport.golden.metrics import compare
from vidport.golden.pipeline_parity import ParityCase, Progress, synthetic_image
from vidport.runtime.pipelines.protocol import Request

PARITY_DEFAULTS = {"prompt": "a red cat walks slowly on the green mat under the sun", "steps": 4, "seed": 0}
BLOCKS = 2  # the second block attends to the first through the cache


def _component(ours: Any, name: str, source: Path | None = None) -> Any:
    """The diffusers / transformers model of a component, built by the library's loader from the
    component's own source (or `source`)."""
    from vidport.golden.verify import reference_model

    manifest = ours.folder.components[name]
    return reference_model(manifest, Path(source or manifest["source"])).float().eval()


def _prompt_states(ours: Any, prompt: str, length: int) -> np.ndarray:
    """The prompt's UMT5 states by diffusers' WanPipeline encoding, on transformers' UMT5 from the base."""
    import torch
    from diffusers import WanPipeline
    from transformers import AutoTokenizer

    holder = WanPipeline.__new__(WanPipeline)  # only its text encoding is used: no DiT, VAE or scheduler
    holder.tokenizer = AutoTokenizer.from_pretrained(str(ours.folder.tokenizer))
    holder.text_encoder = _component(ours, "text_encoder")
    with torch.no_grad():
        return WanPipeline._get_t5_prompt_embeds(holder, prompt=prompt, max_sequence_length=length,
                                                 device=torch.device("cpu")).float().numpy()


def _image_pixels(image: Any, height: int, width: int):
    """(1, 3, 1, H, W) in [-1, 1] by diffusers' VideoProcessor, as its Wan I2V pipeline prepares an image."""
    from diffusers.video_processor import VideoProcessor

    from vidport.runtime.pipelines.wan_image import load_image

    return VideoProcessor(vae_scale_factor=8).preprocess(load_image(image), height=height, width=width)[:, :, None]


def _image_tokens(ours: Any, image: Any):
    """CLIP's penultimate states of the image by diffusers' WanImageToVideoPipeline.encode_image, on
    transformers' CLIP from the base and the base's image processor settings (transformers' defaults
    where the base has none, as ours)."""
    import torch
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor

    from vidport.runtime.pipelines.wan_image import load_image

    settings = ours.folder.path / "image_processor"
    holder = WanImageToVideoPipeline.__new__(WanImageToVideoPipeline)  # only its image encoding is used
    holder.image_processor = (CLIPImageProcessor.from_pretrained(str(settings)) if settings.exists()
                              else CLIPImageProcessor())
    holder.image_encoder = _component(ours, "image_encoder")
    with torch.no_grad():
        return WanImageToVideoPipeline.encode_image(holder, load_image(image), device=torch.device("cpu"))


def self_forcing_case(ours: Any, request: Request, source: Path | None, note: Progress) -> ParityCase:
    """The reference and inputs of one Self-Forcing parity run: two blocks at the smallest size the
    models take (a synthetic image for i2v unless one is given); `source` is the Self-Forcing
    checkpoint (default: the one the folder's transformer was converted from)."""
    import mlx.core as mx
    import torch

    from vidport.reference.self_forcing_sampler import SelfForcingReference
    from vidport.runtime.self_forcing_schedule import denoising_list

    task = request.task
    mult_h, mult_w = ours.layout.multiple
    filled = {name: value for name, value in PARITY_DEFAULTS.items() if getattr(request, name) is None}
    request = dataclasses.replace(request, **filled, frames=request.frames or ours.frames_for(BLOCKS, task),
                                  height=request.height or 2 * mult_h, width=request.width or 3 * mult_w)
    if task == "i2v" and request.image is None:
        request = dataclasses.replace(request, image=synthetic_image(request.height, request.width))
    request = ours.check(request)
    shape = ours.latent_shape(request.frames, request.height, request.width)
    rng = np.random.default_rng(request.seed)
    noise = rng.standard_normal(shape).astype(np.float32)
    renoise = rng.standard_normal((request.steps - 1, *shape)).astype(np.float32)

    note(0, None, "building the reference models")
    length = request.extra["max_sequence_length"]
    positive = _prompt_states(ours, request.prompt, length)
    text = compare(positive, np.array(ours.encode_prompt(request.prompt, "", length)[0].astype(mx.float32)))
    window = request.extra["local_attn_size"]
    reference = SelfForcingReference(_component(ours, "transformer", source), _component(ours, "vae"),
                                     ours.block_frames, denoising_list(request.steps),
                                     float(request.extra["timestep_shift"]),
                                     None if window in (None, -1) else int(window), int(request.extra["sink_size"]))
    given = 1 if task == "i2v" else 0  # the image's latent frame: no noise of its own
    arguments = dict(prompt_embeds=torch.from_numpy(positive), latents=torch.from_numpy(noise[:, :, given:].copy()),
                     renoise=torch.from_numpy(renoise[:, :, :, given:].copy()),
                     image=_image_pixels(request.image, request.height, request.width) if task == "i2v" else None,
                     image_embeds=_image_tokens(ours, request.image) if ours.layout.image_tokens else None)
    ours_request = dataclasses.replace(request, prompt_embeds=(positive, None),
                                       noise={"noise": noise, "renoise": renoise})
    settings = {"blocks": ours.blocks(request), "block_frames": ours.block_frames,
                "timestep_shift": request.extra["timestep_shift"], "local_attn_size": window,
                "sink_size": request.extra["sink_size"], "transformer_source": str(source or
                                                                                  ours.folder.components["transformer"]["source"])}
    return ParityCase(reference, arguments, ours_request, text, settings)
