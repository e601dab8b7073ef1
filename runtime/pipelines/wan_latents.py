"""Latent-space bookkeeping of the Wan pipelines, channels-last (B, F, H, W, C) like the MLX DiT
and VAE: the VAE's per-channel normalization, the image-to-video conditions (Wan 2.1 I2V's mask +
first-frame latent; Wan 2.2 TI2V's first-frame latent with per-token timesteps), and the decode
to frames with progress per latent frame."""
from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

ChunkProgress = Callable[[int, int], None]  # (done, total) latent frames decoded


class LatentStats:
    """The VAE config's latents_mean / latents_std: the DiT works on (z - mean) / std."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean = mx.array(np.asarray(mean, np.float32))
        self.inv_std = mx.array(1.0 / np.asarray(std, np.float32))  # diffusers multiplies by 1 / std

    def normalize(self, latents: mx.array) -> mx.array:
        return (latents - self.mean) * self.inv_std

    def denormalize(self, latents: mx.array) -> mx.array:
        return latents / self.inv_std + self.mean


def i2v_condition(vae, stats: LatentStats, image: np.ndarray, num_frames: int) -> mx.array:
    """Wan 2.1 I2V: the first frame followed by black (zero) frames, encoded to latents and
    normalized, behind a 4-channel mask marking the first latent frame as given (one channel per
    pixel frame a latent frame stands for). -> (1, F_lat, h, w, 4 + z)."""
    frame = mx.array(image)[None, None]
    video = mx.concatenate([frame, mx.zeros((1, num_frames - 1, *image.shape), mx.float32)], axis=1)
    latents = stats.normalize(vae.encode_mean(video.astype(module_dtype(vae))).astype(mx.float32))
    step = vae.scale_factor_temporal
    mask = np.zeros((1, latents.shape[1], latents.shape[2], latents.shape[3], step), np.float32)
    mask[:, 0] = 1.0
    return mx.concatenate([mx.array(mask), latents], axis=-1)


def first_frame_latent(vae, stats: LatentStats, image: np.ndarray) -> mx.array:
    """Wan 2.2 TI2V: the image alone, encoded and normalized. -> (1, 1, h, w, z)."""
    frame = mx.array(image)[None, None].astype(module_dtype(vae))
    return stats.normalize(vae.encode_mean(frame).astype(mx.float32))


def first_frame_mask(latent_shape: tuple[int, ...]) -> mx.array:
    """1 where the DiT denoises, 0 on the first latent frame (given by the image): (1, F, h, w, 1)."""
    mask = np.ones((1, *latent_shape[1:4], 1), np.float32)
    mask[:, 0] = 0.0
    return mx.array(mask)


def token_timesteps(mask: mx.array, t: float, patch: tuple[int, int, int], batch: int) -> mx.array:
    """One timestep per DiT token (Wan 2.2 `expand_timesteps`): t, or 0 on the given first frame.
    -> (batch, tokens) float32, tokens in (frame, row, column) order."""
    per_token = mask[0, :: patch[0], :: patch[1], :: patch[2], 0] * mx.array(np.float32(t))
    return mx.broadcast_to(per_token.reshape(1, -1), (batch, per_token.size))


def module_dtype(module) -> mx.Dtype:
    """The dtype a converted model computes in: its first float parameter's (a quantized layer's
    packed weight is an integer array)."""
    from mlx.utils import tree_flatten

    return next(value.dtype for _, value in tree_flatten(module.parameters()) if mx.issubdtype(value.dtype, mx.floating))


class FrameDecoder:
    """The Wan VAE's decode, fed latent frames as they become final (Self-Forcing's blocks): one
    causal feature cache lives across calls, so a video decoded piece by piece equals its decode
    in one piece (the VAE decodes one latent frame at a time either way)."""

    def __init__(self, vae):
        from vidport.runtime.wan_vae import _cache_slots

        self.vae = vae
        self.cache = [None] * _cache_slots(vae.decoder)
        self.decoded = 0  # latent frames so far

    def __call__(self, latents: mx.array, progress: Callable[[], None] | None = None) -> np.ndarray:
        """Denormalized latents (B, n, h, w, C), the next n latent frames -> their float32 frames
        (B, frames, H, W, 3) in [0, 1]; `progress` hears each latent frame."""
        from vidport.runtime.wan_vae import _evaluate
        from vidport.runtime.wan_vae_layers import unpatchify

        vae = self.vae
        x = vae.post_quant_conv(latents.astype(module_dtype(vae)))
        chunks = []
        for i in range(x.shape[1]):
            first = {"first_chunk": True} if self.decoded == 0 else {}
            chunks.append(vae.decoder(x[:, i:i + 1], feat_cache=self.cache, feat_idx=[0], **first))
            _evaluate(chunks[-1], self.cache)
            self.decoded += 1
            if progress:
                progress()
        video = mx.concatenate(chunks, axis=1)
        if vae.patch_size:
            video = unpatchify(video, vae.patch_size)
        return to_unit_range(video)


def to_unit_range(video: mx.array) -> np.ndarray:
    """VAE output in [-1, 1] -> float32 frames in [0, 1], as diffusers' postprocess."""
    video = mx.clip(video, -1.0, 1.0)
    return np.array(mx.clip(video.astype(mx.float32) * 0.5 + 0.5, 0.0, 1.0))


def decode_frames(vae, latents: mx.array, progress: ChunkProgress | None = None) -> np.ndarray:
    """Denormalized latents -> float32 frames (B, T, H, W, 3) in [0, 1]. The VAE decodes one latent
    frame at a time through its causal cache; `progress` hears each one. With tiling on, the
    tiled decode runs as one piece."""
    total = latents.shape[1]
    if vae.tiling is not None:
        video = vae.decode(latents.astype(module_dtype(vae)))
        if progress:
            progress(total, total)
        return to_unit_range(video)
    decoder = FrameDecoder(vae)
    return decoder(latents, (lambda: progress(decoder.decoded, total)) if progress else None)
