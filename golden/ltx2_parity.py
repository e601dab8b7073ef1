"""LTX-2's part of pipeline parity (golden/pipeline_parity.py): diffusers' LTX2Pipeline (t2v) or
LTX2ImageToVideoPipeline (i2v) built from the Diffusers folder the MLX pipeline was converted
from, with our scheduler config; for the distilled recipe, the chain diffusers documents:
the pipeline at half size over the distilled sigmas, LTX2LatentUpsamplePipeline, the pipeline again
over the stage-2 sigmas (both stages with shifting off, as ours).

Both sides get the reference's own Gemma states (compared with ours on their own) and the same
noise: the reference draws from a seeded torch generator, and the same draws, replayed in its
order and layouts, are our named noise draws. The video and audio latents are compared after
every step of every stage, the upsampler's output on its own, the frames and the waveform."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.golden.pipeline_parity import ParityCase, Progress, synthetic_image, text_metrics
from vidport.runtime.pipelines.ltx2_latents import DISTILLED_SIGMAS, STAGE_2_SIGMAS, Grid
from vidport.runtime.pipelines.protocol import Request

PARITY_DEFAULTS = {"prompt": "a red fox jumps over the lazy dog", "negative_prompt": "blurry, low quality",
                   "frames": 9, "steps": 3, "guidance": 4.0, "seed": 0}
# the Gemma sequence is short in parity runs (the release's 1024 costs time, tests nothing more)
PARITY_EXTRA = {"max_sequence_length": 32}


def _load(source: Path, task: str, scheduler: dict[str, Any]) -> dict[str, Any]:
    """The reference pipelines from the Diffusers folder: the stage pipeline and, where the folder
    has one, the upsample pipeline."""
    import diffusers
    import torch
    from diffusers.pipelines.ltx2 import LTX2ImageToVideoPipeline, LTX2LatentUpsamplePipeline, LTX2Pipeline
    from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel

    cls = LTX2ImageToVideoPipeline if task == "i2v" else LTX2Pipeline
    pipe = cls.from_pretrained(str(source), dtype=torch.float32, local_files_only=True)
    pipe.scheduler = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    pipe.set_progress_bar_config(disable=True)
    # let the step callback hear the audio latents too (the loop has them as a local)
    pipe._callback_tensor_inputs = [*pipe._callback_tensor_inputs, "audio_latents"]
    pipes = {"stage": pipe}
    if (source / "latent_upsampler").is_dir():
        upsampler = LTX2LatentUpsamplerModel.from_pretrained(str(source / "latent_upsampler"), dtype=torch.float32)
        pipes["upsample"] = LTX2LatentUpsamplePipeline(vae=pipe.vae, latent_upsampler=upsampler)
        pipes["upsample"].set_progress_bar_config(disable=True)
    return pipes


class TwoStageReference:
    """diffusers' documented distilled recipe as one callable: stage 1 (latents out), the
    upsampler, stage 2 (frames and audio out); one generator through all of it. Keeps the
    upsampled latents (`intermediates`)."""

    def __init__(self, stage: Any, upsample: Any, first: dict[str, Any], second: dict[str, Any]):
        self.stage, self.upsample, self.first, self.second = stage, upsample, first, second
        self.intermediates: dict[str, np.ndarray] = {}

    def __call__(self, callback_on_step_end: Any = None, **shared: Any) -> Any:
        video, audio = self.stage(**shared, **self.first, output_type="latent", return_dict=False,
                                  callback_on_step_end=callback_on_step_end)
        upsampled = self.upsample(latents=video, output_type="latent", return_dict=False)[0]
        self.intermediates["upsampled"] = upsampled.float().numpy().copy()
        return self.stage(**shared, **self.second, latents=upsampled, audio_latents=audio,
                          callback_on_step_end=callback_on_step_end)


def _replay_draws(ours: Any, request: Request, grids: list[Grid], i2v: bool, timestep_decode: bool
                  ) -> dict[str, np.ndarray]:
    """The reference's draws from torch.Generator(seed), in its order and layouts, as our named
    draws (diffusers' unpacked layouts): stage 1's video (unpacked) and audio (unpacked); stage 2's
    re-noising, drawn packed for t2v (unpacked for i2v); the decode noise."""
    import torch

    generator = torch.Generator().manual_seed(int(request.seed))
    shapes = ours.draw_shapes(request)
    channels, audio_channels = shapes["noise"][1], shapes["audio_noise"][1]

    def randn(shape: tuple[int, ...]) -> np.ndarray:
        return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()

    draws = {"noise": randn(shapes["noise"]), "audio_noise": randn(shapes["audio_noise"])}
    if len(grids) > 1:
        grid, mel = grids[1], shapes["stage2_audio_noise"][3]
        if i2v:
            draws["stage2_noise"] = randn(shapes["stage2_noise"])
        else:
            packed = randn((1, grid.tokens, channels))
            draws["stage2_noise"] = packed.reshape(1, grid.frames, grid.height, grid.width, channels).transpose(
                0, 4, 1, 2, 3)
        packed_audio = randn((1, grid.audio_frames, audio_channels * mel))
        draws["stage2_audio_noise"] = packed_audio.reshape(1, grid.audio_frames, audio_channels, mel).transpose(
            0, 2, 1, 3)
    if timestep_decode:
        draws["decode_noise"] = randn(shapes["decode_noise"])
    return draws


def _step_tensors(grids: list[Grid], audio_channels: int):
    """The reference's packed step tensors in our Step layouts; the stage is known by its token count."""
    by_tokens = {grid.tokens: grid for grid in grids}

    def convert(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
        video = tensors["latents"].detach().float().numpy()
        audio = tensors["audio_latents"].detach().float().numpy()
        grid = by_tokens[video.shape[1]]
        return {"latents": video.reshape(1, grid.frames, grid.height, grid.width, -1).transpose(0, 4, 1, 2, 3),
                "audio_latents": audio.reshape(1, audio.shape[1], audio_channels, -1).transpose(0, 2, 1, 3)}

    return convert


def ltx2_case(ours: Any, request: Request, source: Path | None, note: Progress) -> ParityCase:
    """The reference and inputs of one LTX-2 parity run, dev or distilled (the request's recipe),
    t2v or i2v (a synthetic first frame unless an image is given). Sizes default to the smallest
    the recipe takes: 64x96 (dev) or 128x192 (distilled, stage 1 at 64x96)."""
    import torch

    source = Path(source or ours.folder.manifest["inputs"]["ltx2"]["path"])
    if not (source / "model_index.json").exists():
        raise VidportError(f"{source}: not a Diffusers LTX-2 folder (no model_index.json); diffusers' pipelines load "
                           "only that layout", hint="pass a Diffusers LTX-2 folder with the same weights (--source)")
    filled = {name: value for name, value in PARITY_DEFAULTS.items() if getattr(request, name) is None}
    extra = {**PARITY_EXTRA, **request.extra}
    distilled = extra.get("recipe", ours.default_recipe()) == "distilled"
    scale = 2 if distilled else 1
    if distilled:  # the recipe's own steps and guidance
        filled.pop("steps"), filled.pop("guidance")
    request = dataclasses.replace(request, **filled, extra=extra, height=request.height or 64 * scale,
                                  width=request.width or 96 * scale)
    if request.task == "i2v" and request.image is None:
        request = dataclasses.replace(request, image=synthetic_image(request.height, request.width))
    request = ours.check(request)
    x = request.extra
    grids = ours.stage_grids(request)
    scheduler = dict(ours.folder.scheduler_config)
    if distilled:
        scheduler.update(use_dynamic_shifting=False, shift_terminal=None)
    note(0, None, "loading diffusers' pipelines")
    pipes = _load(source, request.task, scheduler)
    stage = pipes["stage"]
    if distilled and "upsample" not in pipes:
        raise VidportError(f"{source}: no latent_upsampler/ for the distilled recipe's reference")

    with torch.no_grad():
        positive, positive_mask, negative, negative_mask = stage.encode_prompt(
            request.prompt, request.negative_prompt, max_sequence_length=x["max_sequence_length"], device="cpu")
    text = {}
    if ours.layout.has_text_encoder:
        states, _ = ours.encode_prompt([request.prompt, request.negative_prompt], x["max_sequence_length"])
        text = text_metrics((positive.numpy(), negative.numpy()), (states[0:1], states[1:2]))
    timestep_decode = bool(stage.vae.config.timestep_conditioning)
    draws = _replay_draws(ours, request, grids, request.task == "i2v", timestep_decode)

    shared = dict(prompt_embeds=positive, prompt_attention_mask=positive_mask, negative_prompt_embeds=negative,
                  negative_prompt_attention_mask=negative_mask, num_frames=request.frames, frame_rate=request.fps,
                  guidance_scale=request.guidance, stg_scale=x["stg_scale"], modality_scale=x["modality_scale"],
                  guidance_rescale=x["guidance_rescale"], audio_guidance_scale=x["audio_guidance"],
                  audio_stg_scale=x["audio_stg_scale"], audio_modality_scale=x["audio_modality_scale"],
                  audio_guidance_rescale=x["audio_guidance_rescale"], spatio_temporal_guidance_blocks=x["stg_blocks"],
                  decode_timestep=x["decode_timestep"], use_cross_timestep=x["use_cross_timestep"], max_sequence_length=x["max_sequence_length"],
                  generator=torch.Generator().manual_seed(int(request.seed)),
                  callback_on_step_end_tensor_inputs=["latents", "audio_latents"])
    if request.task == "i2v":
        import PIL.Image

        from vidport.runtime.pipelines.inputs import image_array

        shared.update(image=PIL.Image.fromarray(image_array(request.image)), image_crf=x["image_crf"])
    if distilled:
        half = {"height": request.height // 2, "width": request.width // 2}  # stage 1 resizes the image
        reference = TwoStageReference(stage, pipes["upsample"],
                                      {**half, "num_inference_steps": len(DISTILLED_SIGMAS),
                                       "sigmas": list(DISTILLED_SIGMAS)},
                                      {"height": request.height, "width": request.width, "output_type": "np",
                                       "num_inference_steps": len(STAGE_2_SIGMAS), "sigmas": list(STAGE_2_SIGMAS),
                                       "noise_scale": STAGE_2_SIGMAS[0]})
        arguments = shared
    else:
        reference, arguments = stage, {**shared, "height": request.height, "width": request.width,
                                       "num_inference_steps": request.steps, "output_type": "np"}
    ours_request = dataclasses.replace(request, prompt_embeds=((positive.numpy(), positive_mask.numpy()),
                                                               (negative.numpy(), negative_mask.numpy())),
                                       noise=draws)
    return ParityCase(reference, arguments, ours_request, text,
                      {"source": str(source), "recipe": x["recipe"]},
                      step_tensors=_step_tensors(grids, ours.layout.audio_channels))
