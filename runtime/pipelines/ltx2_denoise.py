"""One LTX-2 denoising stage, step for step as diffusers' LTX2Pipeline (and, with a first-frame
mask, LTX2ImageToVideoPipeline) runs it: video and audio tokens denoised jointly by the one DiT,
each with its own scheduler over the same sigmas.

Guidance is LTX-2's, in x0 space: the conditional prediction plus
- classifier-free guidance, (scale - 1) x (conditional - unconditional), the unconditional pass
  batched with the conditional one on the negative prompt;
- spatio-temporal guidance (STG), scale x (conditional - perturbed), the perturbed pass skipping
  self-attention in the listed blocks;
- modality isolation, (scale - 1) x (conditional - isolated), the isolated pass without the
  audio-to-video and video-to-audio attention;
then rescaled toward the conditional prediction's spread, and turned back into a velocity.

The passes of a step are named (`pass_names`) and run by the run's parallel plan
(runtime.parallel_ltx2): in one process as diffusers batches them (the CFG pair as one batch of 2,
`run_passes`), under `parallel=cfg` shared among the ranks."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from vidport.runtime.pipelines.ltx2_latents import Grid, keep_masked, rescale_guidance


@dataclass(frozen=True)
class Guidance:
    """Video and audio scales of each guidance term. An audio scale left unset (None, or 0 as
    diffusers reads it: `audio or video`) takes the video one."""

    cfg: float = 1.0
    stg: float = 0.0
    modality: float = 1.0
    rescale: float = 0.0
    audio_cfg: float = 0.0
    audio_stg: float = 0.0
    audio_modality: float = 0.0
    audio_rescale: float = 0.0
    stg_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("cfg", "stg", "modality", "rescale"):
            object.__setattr__(self, f"audio_{name}", getattr(self, f"audio_{name}") or getattr(self, name))

    @property
    def uses_cfg(self) -> bool:
        return self.cfg > 1.0 or self.audio_cfg > 1.0

    @property
    def uses_stg(self) -> bool:
        return self.stg > 0.0 or self.audio_stg > 0.0

    @property
    def uses_modality(self) -> bool:
        return self.modality > 1.0 or self.audio_modality > 1.0

    @property
    def passes(self) -> int:
        """DiT passes per step (the CFG pair counts two)."""
        return 1 + self.uses_cfg + self.uses_stg + self.uses_modality


@dataclass
class Text:
    """The connectors' output for the prompt and, under CFG, the negative prompt: video and audio
    context (B, S, D) and the binary mask (B, S)."""

    video: mx.array
    audio: mx.array
    mask: mx.array
    negative: "Text | None" = None


@dataclass
class StageResult:
    video: mx.array  # packed, normalized
    audio: mx.array
    timesteps: list[float]
    seconds: list[float]


StepHook = Callable[[int, int, float, mx.array, mx.array], None]  # index, total, t, video, audio (packed)
Prediction = tuple[mx.array, mx.array]  # the DiT's video and audio velocity, batch 1


def pass_names(guidance: Guidance, perturbable: bool) -> list[str]:
    """The DiT passes of one step: the conditional one, and one per guidance term in use. STG
    perturbs self-attention only in a DiT built with the perturbed processor (LTX-2.3,
    `perturbed_attn`); on LTX-2.0 the perturbed pass equals the conditional one and its term is
    zero, so it is not run."""
    names = ["conditional"]
    if guidance.uses_cfg:
        names.append("unconditional")
    if guidance.uses_stg and perturbable:
        names.append("perturbed")
    if guidance.uses_modality:
        names.append("isolated")
    return names


def run_passes(names: list[str], one: Callable[[str], Prediction],
               pair: Callable[[], dict[str, Prediction]]) -> dict[str, Prediction]:
    """One process: the CFG pair batched (as diffusers runs it), the other passes one by one."""
    done = pair() if "unconditional" in names else {}
    return {name: done[name] if name in done else one(name) for name in names}


def _x0(sample: mx.array, velocity: mx.array, sigma: float) -> mx.array:
    return sample - velocity.astype(mx.float32) * sigma


def denoise(model: Any, video: mx.array, audio: mx.array, grid: Grid, text: Text, guidance: Guidance,
            schedulers: tuple[Any, Any], fps: float, mask: mx.array | None = None,
            on_step: StepHook | None = None, use_cross_timestep: bool = True, plan: Any = None) -> StageResult:
    """Denoise packed float32 `video` (B, F h w, C) and `audio` (B, L, C M) over the schedulers'
    timesteps (video's, audio's: same sigmas). `mask` (B, F h w), image-to-video: tokens where it is
    1 keep their values and get timestep 0. `use_cross_timestep`: the cross-modal attention's
    modulation follows the other stream's sigma (LTX-2.3; diffusers' pipelines pass True for every
    version, the official LTX-2.0 code runs it off). `plan` (runtime.parallel_ltx2) runs each
    step's passes and evaluates the step; None: one process."""
    video_scheduler, audio_scheduler = schedulers
    dtype = model.proj_in.weight.dtype
    shape = {"num_frames": grid.frames, "height": grid.height, "width": grid.width, "fps": fps,
             "audio_num_frames": grid.audio_frames}
    timesteps, seconds = [float(t) for t in video_scheduler.timesteps], []
    names = pass_names(guidance, any(block.perturbed_attn for block in model.transformer_blocks))
    passes = plan.passes if plan is not None else run_passes

    def run(x: mx.array, a: mx.array, context: Text, t: mx.array, kept: mx.array | None = mask,
            **switches: Any) -> tuple[mx.array, mx.array]:
        video_t = t[:, None] * (1 - kept) if kept is not None else t
        return model(x.astype(dtype), a.astype(dtype), context.video.astype(dtype), context.audio.astype(dtype),
                     video_t, audio_timestep=t, sigma=t, encoder_attention_mask=context.mask,
                     audio_encoder_attention_mask=context.mask, use_cross_timestep=use_cross_timestep, **shape,
                     **switches)

    for index, t in enumerate(video_scheduler.timesteps):
        began = time.perf_counter()
        sigma = float(video_scheduler.sigmas[index])
        t_one = mx.full((video.shape[0],), np.float32(t))

        def one(name: str) -> Prediction:
            switches = {"perturbed": {"spatio_temporal_guidance_blocks": list(guidance.stg_blocks)},
                        "isolated": {"isolate_modalities": True}}.get(name, {})
            return run(video, audio, text.negative if name == "unconditional" else text, t_one, **switches)

        def pair() -> dict[str, Prediction]:
            both = Text(mx.concatenate([text.negative.video, text.video]),
                        mx.concatenate([text.negative.audio, text.audio]), mx.concatenate([text.negative.mask, text.mask]))
            v, a = run(mx.concatenate([video, video]), mx.concatenate([audio, audio]), both,
                       mx.concatenate([t_one, t_one]), None if mask is None else mx.concatenate([mask, mask]))
            return {"unconditional": (v[:1], a[:1]), "conditional": (v[1:], a[1:])}

        out = passes(names, one, pair)
        v, a = out["conditional"]
        video_x0, audio_x0 = _x0(video, v, sigma), _x0(audio, a, sigma)
        video_guided, audio_guided = video_x0, audio_x0
        if "unconditional" in out:
            v, a = out["unconditional"]
            video_guided = video_x0 + (guidance.cfg - 1) * (video_x0 - _x0(video, v, sigma))
            audio_guided = audio_x0 + (guidance.audio_cfg - 1) * (audio_x0 - _x0(audio, a, sigma))
        if "perturbed" in out:
            v, a = out["perturbed"]
            video_guided = video_guided + guidance.stg * (video_x0 - _x0(video, v, sigma))
            audio_guided = audio_guided + guidance.audio_stg * (audio_x0 - _x0(audio, a, sigma))
        if "isolated" in out:
            v, a = out["isolated"]
            video_guided = video_guided + (guidance.modality - 1) * (video_x0 - _x0(video, v, sigma))
            audio_guided = audio_guided + (guidance.audio_modality - 1) * (audio_x0 - _x0(audio, a, sigma))
        if guidance.rescale > 0:
            video_guided = rescale_guidance(video_guided, video_x0, guidance.rescale)
        if guidance.audio_rescale > 0:
            audio_guided = rescale_guidance(audio_guided, audio_x0, guidance.audio_rescale)

        stepped = video_scheduler.step((video - video_guided) / sigma, t, video)
        video = keep_masked(mask, video, stepped)
        audio = audio_scheduler.step((audio - audio_guided) / sigma, t, audio)
        if plan is not None:
            plan.evaluate(video, audio, what=f"step {index + 1}")
        else:
            mx.eval(video, audio)
        seconds.append(time.perf_counter() - began)
        if on_step:
            on_step(index, len(timesteps), float(t), video, audio)
    return StageResult(video, audio, timesteps, seconds)
