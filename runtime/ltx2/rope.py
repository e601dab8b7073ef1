"""LTX-2's rotary position embedding, exactly as diffusers' `LTX2AudioVideoRotaryPosEmbed` computes it.

Positions are not token indices but patch midpoints in real units: a video patch's (time in seconds,
pixel row, pixel column), an audio patch's time in seconds, each divided by a base extent (20 s,
2048 px). Every position axis gets the same frequency ladder theta^linspace(0, 1) * pi/2, computed
in float64 (`rope_double_precision`) and rounded once to float32; angles = (2 * fraction - 1) *
frequency in float32, with the axes interleaved per frequency. SPLIT layout (the releases): each
head's channels are two halves rotated against each other (x1 cos - x2 sin, x2 cos + x1 sin),
the tables padded at the front with cos 1 / sin 0 to half a head per head. INTERLEAVED (the
library default): pairs (x[2i], x[2i+1]), tables repeated per pair.

The tables are built in numpy (float32 arithmetic where diffusers' torch code is float32, so each
rounding step is the same) and handed to MLX once per call.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

F32 = np.float32


def video_coords(batch: int, num_frames: int, height: int, width: int, fps: float,
                 patch: tuple[int, int, int], scale_factors: Sequence[int], causal_offset: int) -> np.ndarray:
    """[batch, 3, tokens, 2]: each patch's [start, end) in (seconds, pixel rows, pixel columns);
    the first latent frame stands for one pixel frame (the causal VAE), hence the offset."""
    axes = [np.arange(0, n, p, dtype=F32) for n, p in zip((num_frames, height, width), patch)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=0)  # [3, F, H, W]
    ends = grid + np.asarray(patch, dtype=F32).reshape(3, 1, 1, 1)
    latent = np.stack([grid, ends], axis=-1).reshape(3, -1, 2)
    pixel = latent * np.asarray(scale_factors, dtype=F32).reshape(3, 1, 1)
    pixel[0] = np.maximum(pixel[0] + F32(causal_offset) - F32(scale_factors[0]), F32(0))
    pixel[0] = pixel[0] / F32(fps)
    return np.broadcast_to(pixel[None], (batch, *pixel.shape)).copy()


def audio_coords(batch: int, num_frames: int, patch_t: int, scale_factor: int, causal_offset: int,
                 hop_length: int, sampling_rate: int, shift: int = 0) -> np.ndarray:
    """[batch, 1, tokens, 2]: each audio latent frame's [start, end) in seconds of the spectrogram."""
    frames = np.arange(shift, num_frames + shift, patch_t, dtype=F32)

    def seconds(mel_frame: np.ndarray) -> np.ndarray:
        mel = np.maximum(mel_frame * F32(scale_factor) + F32(causal_offset) - F32(scale_factor), F32(0))
        return mel * F32(hop_length) / F32(sampling_rate)

    coords = np.stack([seconds(frames), seconds(frames + F32(patch_t))], axis=-1)  # [tokens, 2]
    return np.broadcast_to(coords[None, None], (batch, 1, *coords.shape)).copy()


def frequencies(theta: float, count: int, double_precision: bool) -> np.ndarray:
    """theta^linspace(0, 1, count) * pi / 2, computed in float64 (or float32) and rounded to float32."""
    dtype = np.float64 if double_precision else F32
    powers = np.power(dtype(theta), np.linspace(0.0, 1.0, count, dtype=dtype))
    return (powers * dtype(math.pi) / dtype(2.0)).astype(F32)


def rope_tables(coords: np.ndarray, max_positions: Sequence[float], dim: int, heads: int, theta: float,
                double_precision: bool, rope_type: str) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for coordinates [batch, axes, tokens(, 2)]: SPLIT [batch, heads, tokens, dim / heads / 2],
    INTERLEAVED [batch, tokens, dim]."""
    coords = np.asarray(coords, dtype=F32)
    if coords.ndim == 4:  # [start, end) bounds: the patch's midpoint
        coords = (coords[..., 0] + coords[..., 1]) / F32(2.0)
    axes = coords.shape[1]
    fraction = np.stack([coords[:, i] / F32(max_positions[i]) for i in range(axes)], axis=-1)  # [B, T, axes]
    freqs = frequencies(theta, dim // (2 * axes), double_precision)
    angles = (fraction[..., None] * F32(2) - F32(1)) * freqs  # [B, T, axes, F]
    angles = np.swapaxes(angles, -1, -2).reshape(*angles.shape[:2], -1)  # axes interleaved per frequency
    cos, sin = np.cos(angles.astype(np.float64)).astype(F32), np.sin(angles.astype(np.float64)).astype(F32)
    batch, tokens = angles.shape[:2]
    if rope_type == "interleaved":
        cos, sin = np.repeat(cos, 2, axis=-1), np.repeat(sin, 2, axis=-1)
        pad = dim % (2 * axes)
    elif rope_type == "split":
        pad = dim // 2 - cos.shape[-1]
    else:
        raise ValueError(f"rope_type {rope_type!r}: LTX-2 has 'split' and 'interleaved'")
    if pad:
        cos = np.concatenate([np.ones((batch, tokens, pad), F32), cos], axis=-1)
        sin = np.concatenate([np.zeros((batch, tokens, pad), F32), sin], axis=-1)
    if rope_type == "split":
        cos = cos.reshape(batch, tokens, heads, -1).swapaxes(1, 2)
        sin = sin.reshape(batch, tokens, heads, -1).swapaxes(1, 2)
    return np.ascontiguousarray(cos), np.ascontiguousarray(sin)


class LTX2AudioVideoRotaryPosEmbed(nn.Module):
    """diffusers' module of the same name: coordinates in, (cos, sin) out; holds no parameters.
    Coordinates stay float32 whatever the weights' dtype (verify feeds them so)."""

    float32_inputs = True

    def __init__(self, dim: int, patch_size: int = 1, patch_size_t: int = 1, base_num_frames: int = 20,
                 base_height: int = 2048, base_width: int = 2048, sampling_rate: int = 16000, hop_length: int = 160,
                 scale_factors: Sequence[int] = (8, 32, 32), theta: float = 10000.0, causal_offset: int = 1,
                 modality: str = "video", double_precision: bool = True, rope_type: str = "interleaved",
                 num_attention_heads: int = 32):
        super().__init__()
        if modality not in ("video", "audio"):
            raise ValueError(f"modality {modality!r}: 'video' or 'audio'")
        self.dim, self.modality, self.rope_type = dim, modality, rope_type
        self.heads, self.theta, self.double_precision = num_attention_heads, theta, double_precision
        self.patch = (patch_size_t, patch_size, patch_size)
        self.scale_factors = tuple(scale_factors)
        self.causal_offset, self.sampling_rate, self.hop_length = causal_offset, sampling_rate, hop_length
        self.max_positions = ((base_num_frames, base_height, base_width) if modality == "video"
                              else (base_num_frames,))

    def prepare_video_coords(self, batch: int, num_frames: int, height: int, width: int,
                             fps: float = 24.0) -> np.ndarray:
        return video_coords(batch, num_frames, height, width, fps, self.patch, self.scale_factors, self.causal_offset)

    def prepare_audio_coords(self, batch: int, num_frames: int, shift: int = 0) -> np.ndarray:
        return audio_coords(batch, num_frames, self.patch[0], self.scale_factors[0], self.causal_offset,
                            self.hop_length, self.sampling_rate, shift)

    def __call__(self, coords: Any, device: Any = None) -> tuple[mx.array, mx.array]:
        """`device` is diffusers' (ignored)."""
        coords = np.array(coords.astype(mx.float32)) if isinstance(coords, mx.array) else np.asarray(coords)
        cos, sin = rope_tables(coords, self.max_positions, self.dim, self.heads, self.theta,
                               self.double_precision, self.rope_type)
        return mx.array(cos), mx.array(sin)


def apply_split_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, T, heads * head_dim] rotated by SPLIT tables [B, heads, T, head_dim / 2] (heads as the
    tables count them), in float32; the result in x's dtype."""
    batch, heads, tokens, half = cos.shape
    parts = x.astype(mx.float32).reshape(batch, tokens, heads, 2, half).transpose(0, 2, 1, 3, 4)
    first, second = parts[..., 0, :], parts[..., 1, :]
    cos, sin = cos.astype(mx.float32), sin.astype(mx.float32)
    out = mx.stack([first * cos - second * sin, second * cos + first * sin], axis=-2)
    return out.transpose(0, 2, 1, 3, 4).reshape(x.shape).astype(x.dtype)


def apply_interleaved_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, T, C] rotated pairwise by INTERLEAVED tables [B, T, C], in float32."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x.astype(mx.float32) * cos.astype(mx.float32)
            + rotated.astype(mx.float32) * sin.astype(mx.float32)).astype(x.dtype)
