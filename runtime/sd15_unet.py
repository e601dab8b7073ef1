"""The Stable Diffusion 1.x UNet in MLX, mirroring diffusers' `UNet2DConditionModel` name for name.

Takes and returns (batch, channels, height, width) like diffusers; inside, feature maps are
channels-last as MLX convolutions want them. The timestep embedding is computed in float32 and
cast to the weights' dtype, as diffusers does.
"""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.layers import Conv2d, GroupNorm, SiLU
from vidport.runtime.unet_blocks import BlockArgs, DownBlock, MidBlock, Motion, UpBlock
from vidport.runtime.unet_config import UNetConfig, read_unet_config


class Timesteps(nn.Module):
    """Sinusoidal timestep features (diffusers' `get_timestep_embedding`), always in float32."""

    def __init__(self, channels: int, flip_sin_to_cos: bool, shift: float):
        super().__init__()
        self.channels, self.flip, self.shift = channels, flip_sin_to_cos, shift

    def __call__(self, timesteps: mx.array) -> mx.array:
        half = self.channels // 2
        exponent = -math.log(10000) * mx.arange(half, dtype=mx.float32) / (half - self.shift)
        angles = timesteps.astype(mx.float32)[:, None] * mx.exp(exponent)[None]
        sin, cos = mx.sin(angles), mx.cos(angles)
        emb = mx.concatenate([cos, sin] if self.flip else [sin, cos], axis=-1)
        return mx.pad(emb, [(0, 0), (0, 1)]) if self.channels % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, channels)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(channels, channels)

    def __call__(self, sample: mx.array, condition: mx.array | None = None) -> mx.array:
        return self.linear_2(self.act(self.linear_1(sample)))


def broadcast_timesteps(timestep: Any, batch: int) -> mx.array:
    """A Python number, a 0-d or a (batch,) array -> (batch,) float32 timesteps."""
    t = timestep if isinstance(timestep, mx.array) else mx.array(timestep)
    return mx.broadcast_to(t.reshape(-1).astype(mx.float32), (batch,))


class UNet2DConditionModel(nn.Module):
    """conv_in -> down blocks (skip connections kept) -> mid block -> up blocks -> norm, SiLU, conv_out."""

    def __init__(self, config: UNetConfig, motion: list[Motion] | None = None, mid_motion: Motion | None = None):
        """`motion` / `mid_motion`: motion modules per block, for UNetMotionModel."""
        super().__init__()
        channels = config.block_out_channels
        count = len(channels)
        args = BlockArgs(config.time_embed_dim, config.groups, config.eps, config.cross_attention_dim,
                         config.linear_projection)
        motion = motion or [None] * count
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim)
        self.down_blocks = [
            DownBlock(channels[max(i - 1, 0)], channels[i], config.layers_per_block[i], args, config.down_attention[i],
                      i < count - 1, config.heads[i], config.transformer_layers[i], motion[i])
            for i in range(count)
        ]
        self.mid_block = MidBlock(channels[-1], args, config.heads[-1], config.transformer_layers[-1],
                                  motion=mid_motion)
        rev = list(reversed(range(count)))  # up block i works at the resolution of down block rev[i]
        self.up_blocks = [
            UpBlock(channels[rev[min(i + 1, count - 1)]], channels[rev[max(i - 1, 0)]], channels[rev[i]],
                    config.layers_per_block[rev[i]] + 1, args, config.up_attention[i], i < count - 1,
                    config.heads[rev[i]], config.transformer_layers[rev[i]], motion[rev[i]])
            for i in range(count)
        ]
        self.conv_norm_out = GroupNorm(config.groups, channels[0], eps=config.eps)
        self.conv_act = SiLU()
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1)
        self.config = config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "UNet2DConditionModel":
        return cls(read_unet_config(config))

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_in.weight.dtype

    def time_embed(self, timestep: Any, batch: int) -> mx.array:
        return self.time_embedding(self.time_proj(broadcast_timesteps(timestep, batch)).astype(self.dtype))

    def denoise(self, sample: mx.array, emb: mx.array, encoder_hidden_states: mx.array, num_frames: int = 1) -> mx.array:
        """The network on a channels-last batch of images, given the time embedding per image."""
        context = {"encoder_hidden_states": encoder_hidden_states, "num_frames": num_frames}
        up_factor = 2 ** sum(1 for block in self.up_blocks if "upsamplers" in block)
        exact = sample.shape[1] % up_factor == 0 and sample.shape[2] % up_factor == 0
        sample = self.conv_in(sample)
        skips = [sample]
        for block in self.down_blocks:
            sample, states = block(sample, emb, **context)
            skips.extend(states)
        sample = self.mid_block(sample, emb, **context)
        for i, block in enumerate(self.up_blocks):
            mine, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            size = None if exact or i == len(self.up_blocks) - 1 else tuple(skips[-1].shape[1:3])
            sample = block(sample, tuple(mine), emb, upsample_size=size, **context)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))

    def __call__(self, sample: mx.array, timestep: Any, encoder_hidden_states: mx.array) -> mx.array:
        """sample (batch, C, H, W), timestep (scalar or (batch,)), encoder_hidden_states (batch, tokens, dim)."""
        emb = self.time_embed(timestep, sample.shape[0])
        out = self.denoise(sample.transpose(0, 2, 3, 1).astype(self.dtype), emb, encoder_hidden_states.astype(self.dtype))
        return out.transpose(0, 3, 1, 2)
