"""Wan's 3D rotary position embedding, exactly as diffusers' `WanRotaryPosEmbed` computes it.

Each head's channels are split three ways: the first `t_dim` rotate with the latent frame index,
the next `h_dim` with the patch row, the last `w_dim` with the patch column, where
h_dim = w_dim = 2 * (head_dim // 6) and t_dim = head_dim - h_dim - w_dim. Every part has its own
frequency ladder theta^(-2i/part_dim), and the rotation acts on interleaved pairs (x[2i], x[2i+1]),
i.e. x viewed as complex numbers times exp(i * position * frequency).
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to (frames, height, width)."""
    h_dim = w_dim = 2 * (head_dim // 6)
    return head_dim - h_dim - w_dim, h_dim, w_dim


def rotary_table(dim: int, positions: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * frequency, each frequency repeated for its pair: [positions, dim].

    Computed in float64 and rounded once to float32, as diffusers does on CPU and CUDA."""
    if dim % 2:
        raise ValueError(f"a rotary part needs an even number of channels, got {dim}")
    frequency = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = np.outer(np.arange(positions, dtype=np.float64), frequency)
    return (np.repeat(np.cos(angles), 2, axis=1).astype(np.float32),
            np.repeat(np.sin(angles), 2, axis=1).astype(np.float32))


class WanRotaryPosEmbed(nn.Module):
    """The (cos, sin) tables for a latent video, one row per patch token in (frame, row, column)
    order: [tokens, head_dim] each. Takes the channels-last latents (batch, frames, height, width,
    channels) only for their shape; holds no parameters."""

    channels_last = True  # its input is the latent video; its 2-d outputs are not moved

    def __init__(self, attention_head_dim: int, patch_size: tuple[int, int, int], max_seq_len: int,
                 theta: float = 10000.0):
        super().__init__()
        # containers under `_` names stay out of MLX's parameter tree
        self._patch_size = tuple(patch_size)
        self._split = rope_split(attention_head_dim)
        tables = [rotary_table(dim, max_seq_len, theta) for dim in self._split]
        self._cos_parts = [cos for cos, _ in tables]
        self._sin_parts = [sin for _, sin in tables]
        self.max_seq_len = max_seq_len

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        p_t, p_h, p_w = self._patch_size
        return frames // p_t, height // p_h, width // p_w

    def tables(self, frames: int, height: int, width: int, start_frame: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The float32 tables for a post-patch grid of frames x height x width tokens whose first
        frame sits at position `start_frame` (a causal model's block later in the video)."""
        if max(start_frame + frames, height, width) > self.max_seq_len:
            raise ValueError(f"a {frames}x{height}x{width} token grid from frame {start_frame} exceeds the "
                             f"{self.max_seq_len} rotary positions")
        return (_grid_table(self._cos_parts, frames, height, width, start_frame),
                _grid_table(self._sin_parts, frames, height, width, start_frame))

    def __call__(self, hidden_states: mx.array) -> tuple[mx.array, mx.array]:
        _, frames, height, width, _ = hidden_states.shape
        cos, sin = self.tables(*self.grid(frames, height, width))
        return mx.array(cos), mx.array(sin)


def _grid_table(parts: list[np.ndarray], frames: int, height: int, width: int, start_frame: int = 0) -> np.ndarray:
    f_part, h_part, w_part = parts
    shape = (frames, height, width)
    table = np.concatenate([
        np.broadcast_to(f_part[start_frame:start_frame + frames, None, None], shape + f_part.shape[1:]),
        np.broadcast_to(h_part[None, :height, None], shape + h_part.shape[1:]),
        np.broadcast_to(w_part[None, None, :width], shape + w_part.shape[1:]),
    ], axis=-1)
    return table.reshape(frames * height * width, -1)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved channel pairs of x [batch, tokens, heads, head_dim] by the tables.

    The tables may come as [tokens, head_dim] (ours) or [1, tokens, 1, head_dim] (diffusers')."""
    batch, tokens, heads, head_dim = x.shape
    cos = cos.reshape(tokens, head_dim)[None, :, None, 0::2]
    sin = sin.reshape(tokens, head_dim)[None, :, None, 1::2]
    pairs = x.reshape(batch, tokens, heads, head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = mx.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(batch, tokens, heads, head_dim).astype(x.dtype)
