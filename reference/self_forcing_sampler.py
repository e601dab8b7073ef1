"""The reference of Self-Forcing inference: the official `CausalInferencePipeline`'s loop, written
small, around diffusers' own models (the DiT run under a block-causal mask, reference/causal_wan.py;
diffusers' AutoencoderKLWan).

The loop is the official one, step for step:
- the schedule is the official `FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)` at
  1000 training timesteps, computed as it computes it (torch float32 linspace and shift), and the
  denoising list [1000, 750, 500, 250] warped through it (`timesteps[1000 - k]`);
- x0 = x_t - sigma_t * flow in float64, sigma_t found by the official nearest-timestep lookup;
- re-noising is the official `add_noise`: (1 - sigma) * x0 + sigma * noise, with the given draws;
- the blocks before the current one are in the model's view as their clean latents at timestep 0
  (`context_noise`), which is what the official clean pass writes to its KV cache.

Where the official code keeps a KV cache, this reference recomputes the whole sequence of blocks
for every pass (`cached_pass`): a test (tests/test_causal_wan.py) shows the two equal.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import torch

from vidport.reference.causal_wan import cached_pass

TRAIN_TIMESTEPS = 1000


def official_schedule(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of the official FlowMatchScheduler(shift, sigma_min=0.0,
    extra_one_step=True).set_timesteps(1000): 1000 each, float32."""
    sigmas = torch.linspace(1.0, 0.0, TRAIN_TIMESTEPS + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas, sigmas * TRAIN_TIMESTEPS


def warped_timesteps(denoising_list: list[int], shift: float) -> torch.Tensor:
    """The official `warp_denoising_step`: entry k becomes timesteps[1000 - k] (0 past the end)."""
    _, timesteps = official_schedule(shift)
    timesteps = torch.cat([timesteps, torch.tensor([0.0])])
    return timesteps[TRAIN_TIMESTEPS - torch.tensor(denoising_list, dtype=torch.long)]


def sigma_at(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The official lookup: the sigma of the training timestep nearest to t."""
    sigmas, timesteps = official_schedule(shift)
    return sigmas[torch.argmin((timesteps - t).abs())]


def flow_to_x0(flow: torch.Tensor, x: torch.Tensor, t: torch.Tensor, shift: float) -> torch.Tensor:
    """The official `_convert_flow_pred_to_x0`: x0 = x_t - sigma_t * flow, in float64."""
    sigma = sigma_at(t, shift).double()
    return (x.double() - sigma * flow.double()).to(flow.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, shift: float) -> torch.Tensor:
    """The official `FlowMatchScheduler.add_noise`."""
    sigma = sigma_at(t, shift)
    return ((1 - sigma) * x0 + sigma * noise).type_as(noise)


class SelfForcingReference:
    """Called like a diffusers pipeline by golden/pipeline_parity.py: `callback_on_step_end` hears
    each denoising step's x0 of the current block, and the output's `frames` are the video."""

    def __init__(self, transformer: Any, vae: Any, block_frames: int, denoising_list: list[int], shift: float,
                 local_attn_size: int | None = None, sink_size: int = 0):
        self.transformer, self.vae = transformer, vae
        self.block_frames, self.shift = block_frames, shift
        self.timesteps = warped_timesteps(denoising_list, shift)
        self.window = {"local_attn_size": local_attn_size, "sink_size": sink_size}

    def _normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        return torch.tensor(config.latents_mean).view(shape), torch.tensor(config.latents_std).view(shape)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(1, 3, 1, H, W) in [-1, 1] -> the normalized latent mode, as diffusers' Wan I2V pipeline."""
        mean, std = self._normalization()
        return (self.vae.encode(pixels).latent_dist.mode() - mean) * (1.0 / std)

    def __call__(self, prompt_embeds: torch.Tensor, latents: torch.Tensor, renoise: torch.Tensor,
                 image: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                 callback_on_step_end: Callable[..., Any] | None = None, output_type: str = "np") -> SimpleNamespace:
        clean = self.encode_image(image) if image is not None else None
        blocks = [1] if image is not None else []
        count = 0
        for start in range(0, latents.shape[2], self.block_frames):  # `latents`: the generated frames' noise
            frames = slice(start, start + self.block_frames)
            x = latents[:, :, frames]
            for index, t in enumerate(self.timesteps):
                timesteps = torch.full((x.shape[0], self.block_frames), float(t))
                flow = cached_pass(self.transformer, clean, x, timesteps, prompt_embeds, blocks + [self.block_frames],
                                   image_context=image_embeds, **self.window)
                x0 = flow_to_x0(flow, x, t, self.shift)
                if callback_on_step_end is not None:
                    callback_on_step_end(self, count, t, {"latents": x0})
                count += 1
                if index + 1 < len(self.timesteps):
                    x = add_noise(x0, renoise[index][:, :, frames], self.timesteps[index + 1], self.shift)
            clean = x0 if clean is None else torch.cat([clean, x0], dim=2)
            blocks.append(self.block_frames)
        mean, std = self._normalization()
        video = self.vae.decode(clean * std + mean, return_dict=False)[0]  # (1, 3, T, H, W) in [-1, 1]
        frames = (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).float().numpy()
        return SimpleNamespace(frames=frames, latents=clean)
