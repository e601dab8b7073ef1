"""AnimateDiff motion modules in MLX, mirroring diffusers' `MotionAdapter` tree name for name.

Each motion module is a temporal transformer: it treats every pixel of a (batch*frames, C, H, W)
feature map as a sequence over frames, attends along time twice, and adds the result back.
"""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vidport.runtime.layers import GroupNorm, attend_heads, geglu
from vidport.runtime.motion_config import MotionConfig


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds the fixed sin/cos table over frames; nothing to load (diffusers keeps it as a buffer)."""

    def __init__(self, dim: int, max_seq_length: int):
        super().__init__()
        position = np.arange(max_seq_length, dtype=np.float32)[:, None]
        frequency = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
        table = np.zeros((1, max_seq_length, dim), dtype=np.float32)
        table[0, :, 0::2] = np.sin(position * frequency)
        table[0, :, 1::2] = np.cos(position * frequency)
        self.table = table  # numpy: stays out of the parameter tree
        self.max_seq_length = max_seq_length

    def __call__(self, x: mx.array) -> mx.array:
        length = x.shape[1]
        if length > self.max_seq_length:
            raise ValueError(f"{length} frames exceed the motion module's {self.max_seq_length} positions")
        return x + mx.array(self.table[:, :length]).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over frames (diffusers `Attention` with no bias on q/k/v)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = [nn.Linear(dim, dim), nn.Dropout(0.0)]

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array | None = None) -> mx.array:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = attend_heads(self.to_q(hidden_states), self.to_k(context), self.to_v(context), self.heads, self.scale)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """hidden * gelu(gate), both halves of one projection (diffusers' `GEGLU`, same weights).

    The halves are computed as two products with the two contiguous halves of the weight rather
    than one product split afterwards: the split halves are strided, and MLX's CPU kernels run
    30% slower on them (16384 tokens, 320 -> 2 x 1280: 173 ms against 121 ms)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def __call__(self, x: mx.array) -> mx.array:
        if isinstance(self.proj, nn.QuantizedLinear):  # one quantized product, halves split after
            hidden, gate = mx.split(self.proj(x), 2, axis=-1)
            return geglu(hidden, gate)
        inner = self.proj.weight.shape[0] // 2
        weight, bias = self.proj.weight, self.proj.bias
        hidden = mx.addmm(bias[:inner], x, weight[:inner].T)
        gate = mx.addmm(bias[inner:], x, weight[inner:].T)
        return geglu(hidden, gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = [GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.net:
            x = layer(x)
        return x


class TemporalTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` as AnimateDiff configures it: two self-attentions, each
    after a LayerNorm and the sinusoidal positions, then a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, max_seq_length: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.pos_embed = SinusoidalPositionalEmbedding(dim, max_seq_length)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        hidden_states = self.attn1(self.pos_embed(self.norm1(hidden_states))) + hidden_states
        hidden_states = self.attn2(self.pos_embed(self.norm2(hidden_states))) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class TemporalTransformer(nn.Module):
    """diffusers `AnimateDiffTransformer3D`: same inputs, (batch*frames, C, H, W) and num_frames."""

    def __init__(self, channels: int, heads: int, layers: int, groups: int, max_seq_length: int):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = [TemporalTransformerBlock(channels, heads, max_seq_length) for _ in range(layers)]
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: None = None, timestep: None = None,
                 class_labels: None = None, num_frames: int = 1, cross_attention_kwargs: None = None) -> mx.array:
        """diffusers' argument order (its motion mid block passes num_frames fifth); the unused
        conditioning arguments must be None."""
        batch_frames, channels, height, width = hidden_states.shape
        batch = batch_frames // num_frames
        residual = hidden_states
        x = hidden_states.reshape(batch, num_frames, channels, height, width).transpose(0, 1, 3, 4, 2)
        x = self.norm(x)  # channels-last: groups over C, statistics over frames and pixels
        x = x.transpose(0, 2, 3, 1, 4).reshape(batch * height * width, num_frames, channels)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)
        x = self.proj_out(x)
        x = x.reshape(batch, height, width, num_frames, channels).transpose(0, 3, 4, 1, 2)
        return x.reshape(batch_frames, channels, height, width) + residual


class MotionModules(nn.Module):
    def __init__(self, channels: int, layers: int, transformer_layers: int | list[int], heads: int, groups: int,
                 max_seq_length: int):
        super().__init__()
        per_layer = [transformer_layers] * layers if isinstance(transformer_layers, int) else list(transformer_layers)
        self.motion_modules = [TemporalTransformer(channels, heads, n, groups, max_seq_length) for n in per_layer]


class MotionAdapter(nn.Module):
    """The container diffusers loads motion modules into; its config is diffusers' MotionAdapter config."""

    def __init__(self, config: MotionConfig):
        super().__init__()
        if config.conv_in_channels:
            raise ValueError("motion adapters with conv_in (SparseCtrl) are not supported")
        common = (config.groups, config.max_seq_length)
        self.max_seq_length = config.max_seq_length
        self.down_blocks = [MotionModules(*block[1:], *common) for block in config.down_blocks()]
        mid = config.mid_block()
        self.mid_block = MotionModules(*mid[1:], *common) if mid else None
        self.up_blocks = [MotionModules(*block[1:], *common) for block in config.up_blocks()]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MotionAdapter":
        return cls(MotionConfig.read(config))
