"""LTX-2's latent layouts and schedule, as diffusers' LTX2Pipeline has them.

The DiT takes tokens: video latents packed (B, frames x rows x columns, C) (patch size 1: a plain
reshape of channels-last latents), audio latents packed (B, latent frames, C x mel bins),
channel-major. Noise draws and step callbacks use diffusers' unpacked layouts, (B, C, F, h, w)
and (B, C, L, M), so a draw saved from diffusers can be fed as it is."""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# diffusers.pipelines.ltx2.utils: the distilled model's two schedules (stage 1, then stage 2
# after the 2x latent upsampler, re-noised to its first sigma)
DISTILLED_SIGMAS = (1.0, 0.99375, 0.9875, 0.98125, 0.975, 0.909375, 0.725, 0.421875)
STAGE_2_SIGMAS = (0.909375, 0.725, 0.421875)


@dataclass(frozen=True)
class Grid:
    """One stage's latent sizes: video (frames, rows, columns) and audio latent frames."""

    frames: int
    height: int
    width: int
    audio_frames: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width


def pack_video(latents: mx.array) -> mx.array:
    """(B, C, F, h, w) -> tokens (B, F h w, C)."""
    batch, channels = latents.shape[:2]
    return latents.transpose(0, 2, 3, 4, 1).reshape(batch, -1, channels)


def unpack_video(tokens: mx.array, grid: Grid) -> mx.array:
    """tokens (B, F h w, C) -> (B, C, F, h, w)."""
    batch, _, channels = tokens.shape
    return tokens.reshape(batch, grid.frames, grid.height, grid.width, channels).transpose(0, 4, 1, 2, 3)


def pack_audio(latents: mx.array) -> mx.array:
    """(B, C, L, M) -> (B, L, C M), channel-major."""
    batch, channels, length, mel = latents.shape
    return latents.transpose(0, 2, 1, 3).reshape(batch, length, channels * mel)


def unpack_audio(tokens: mx.array, channels: int) -> mx.array:
    """(B, L, C M) -> (B, C, L, M)."""
    batch, length, width = tokens.shape
    return tokens.reshape(batch, length, channels, width // channels).transpose(0, 2, 1, 3)


def calculate_shift(tokens: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """The dynamic shift `mu` for a sequence of `tokens` video tokens (diffusers' calculate_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return tokens * slope + base_shift - slope * base_seq_len


def dev_sigmas(steps: int) -> np.ndarray:
    """The sigmas LTX2Pipeline hands its scheduler before shifting: 1 down to 1/steps."""
    return np.linspace(1.0, 1.0 / steps, steps)


def audio_latent_frames(frames: int, fps: float, sample_rate: int, hop_length: int, compression: int) -> int:
    """Audio latent frames for a clip of `frames` at `fps` (the soundtrack lasts as long as the video)."""
    return round(frames / fps * (sample_rate / hop_length / float(compression)))


def first_frame_mask(grid: Grid) -> mx.array:
    """Image-to-video's conditioning mask per token (1, F h w): 1 on the first latent frame."""
    per_frame = grid.height * grid.width
    mask = np.zeros((1, grid.tokens), np.float32)
    mask[:, :per_frame] = 1.0
    return mx.array(mask)


def keep_masked(mask: mx.array | None, kept: mx.array, new: mx.array) -> mx.array:
    """Tokens (B, S, C) of `kept` where the token mask (B, S) is 1, of `new` elsewhere."""
    if mask is None:
        return new
    return mask[..., None] * kept + (1 - mask[..., None]) * new


def rescale_guidance(guided: mx.array, conditional: mx.array, factor: float) -> mx.array:
    """diffusers' rescale_noise_cfg: pull the guided prediction's spread (unbiased std over all but
    the batch axis, as torch.std) back toward the conditional one by `factor`."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (mx.std(conditional, axis=axes, keepdims=True, ddof=1)
                         / mx.std(guided, axis=axes, keepdims=True, ddof=1))
    return factor * rescaled + (1 - factor) * guided
