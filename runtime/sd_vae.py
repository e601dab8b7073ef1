"""Stable Diffusion's VAE in MLX, mirroring diffusers' `AutoencoderKL` tree name for name.

Images and latents are channels-last, (batch, height, width, channels), as MLX convolutions
want them. The encoder halves the resolution at every level but the last (SD: x8 in all), the
decoder mirrors it; both run on a batch of frames, and `decode` can take the frames in slices
so a 16-frame 512x512 video fits in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.cpu_threads import map_parts
from vidport.runtime.layers import Conv2d, GroupNorm, SiLU, attention
from vidport.runtime.unet_blocks import ResnetBlock2D, Upsample2D

EPS = 1e-6  # every norm of the SD VAE


class Downsample2D(nn.Module):
    """A stride-2 3x3 convolution after one zero row and column at the bottom and right: the LDM
    VAE's asymmetric padding (diffusers `Downsample2D(padding=0)`)."""

    channels_last = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        return self.conv(mx.pad(hidden_states, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Attention(nn.Module):
    """One-head self-attention over all pixels, after a group norm, added back to its input
    (diffusers `Attention` as the VAE's mid-block builds it)."""

    channels_last = True

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels), nn.Dropout(0.0)]

    def __call__(self, hidden_states: mx.array, temb: mx.array | None = None) -> mx.array:
        batch, height, width, channels = hidden_states.shape
        x = self.group_norm(hidden_states.reshape(batch, height * width, channels))
        q, k, v = (proj(x)[:, None] for proj in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v, channels**-0.5)[:, 0]
        out = self.to_out[1](self.to_out[0](out))
        return out.reshape(batch, height, width, channels) + hidden_states


class UNetMidBlock2D(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    channels_last = True

    def __init__(self, channels: int, groups: int, add_attention: bool = True):
        super().__init__()
        self.attentions = [Attention(channels, groups)] if add_attention else []
        self.resnets = [ResnetBlock2D(channels, channels, None, groups, EPS) for _ in range(2)]

    def __call__(self, hidden_states: mx.array, temb: mx.array | None = None) -> mx.array:
        hidden_states = self.resnets[0](hidden_states)
        for attention in self.attentions:
            hidden_states = attention(hidden_states)
        return self.resnets[1](hidden_states)


class DownEncoderBlock2D(nn.Module):
    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS)
                        for i in range(layers)]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels)]

    def __call__(self, hidden_states: mx.array) -> mx.array:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        for downsampler in self.get("downsamplers", []):
            hidden_states = downsampler(hidden_states)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, EPS)
                        for i in range(layers)]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, hidden_states: mx.array, temb: mx.array | None = None) -> mx.array:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        for upsampler in self.get("upsamplers", []):
            hidden_states = upsampler(hidden_states)
        return hidden_states


class Encoder(nn.Module):
    """Image (B, H, W, in) -> latent moments (B, H/8, W/8, 2 * latent): mean and log-variance."""

    channels_last = True

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: list[int], layers: int,
                 groups: int, mid_attention: bool):
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = [DownEncoderBlock2D(widths[max(i - 1, 0)], width, layers, groups, i < len(widths) - 1)
                            for i, width in enumerate(widths)]
        self.mid_block = UNetMidBlock2D(widths[-1], groups, mid_attention)
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_act = SiLU()
        self.conv_out = Conv2d(widths[-1], 2 * latent_channels, 3, padding=1)

    def __call__(self, sample: mx.array) -> mx.array:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """Latents (B, h, w, latent) -> image (B, 8h, 8w, out)."""

    channels_last = True

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: list[int], layers: int,
                 groups: int, mid_attention: bool):
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = Conv2d(latent_channels, widths[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(widths[0], groups, mid_attention)
        self.up_blocks = [UpDecoderBlock2D(widths[max(i - 1, 0)], width, layers + 1, groups, i < len(widths) - 1)
                          for i, width in enumerate(widths)]
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=EPS)
        self.conv_act = SiLU()
        self.conv_out = Conv2d(widths[-1], out_channels, 3, padding=1)

    def __call__(self, sample: mx.array, latent_embeds: mx.array | None = None) -> mx.array:
        if latent_embeds is not None:
            raise ValueError("spatially normalized decoders (latent_embeds) are not supported")
        sample = self.mid_block(self.conv_in(sample))
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


@dataclass
class LatentDistribution:
    """The encoder's diagonal Gaussian over latents (diffusers `DiagonalGaussianDistribution`)."""

    mean: mx.array
    logvar: mx.array  # clipped to [-30, 20], as diffusers does

    @property
    def std(self) -> mx.array:
        return mx.exp(0.5 * self.logvar)

    def mode(self) -> mx.array:
        return self.mean

    def sample(self, key: mx.array | None = None) -> mx.array:
        return self.mean + self.std * mx.random.normal(self.mean.shape, dtype=self.mean.dtype, key=key)


# AutoencoderKL config entries that do not change the network (pipelines read some of them)
_NOT_ARCHITECTURE = ("sample_size", "force_upcast", "latents_mean", "latents_std")
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


class AutoencoderKL(nn.Module):
    """The VAE: `encode` frames to a latent distribution, `decode` latents to frames. Latents are
    the raw ones: a pipeline multiplies by `scaling_factor` after encoding and divides before decoding."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 4,
                 block_out_channels: list[int] = (64,), layers_per_block: int = 1, norm_num_groups: int = 32,
                 mid_block_add_attention: bool = True, use_quant_conv: bool = True,
                 use_post_quant_conv: bool = True, scaling_factor: float = 0.18215,
                 shift_factor: float | None = None):
        super().__init__()
        common = {"block_out_channels": block_out_channels, "layers": layers_per_block, "groups": norm_num_groups,
                  "mid_attention": mid_block_add_attention}
        self.encoder = Encoder(in_channels, latent_channels, **common)
        self.decoder = Decoder(latent_channels, out_channels, **common)
        if use_quant_conv:
            self.quant_conv = Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        if use_post_quant_conv:
            self.post_quant_conv = Conv2d(latent_channels, latent_channels, 1)
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoencoderKL":
        """From a diffusers AutoencoderKL config; refuses settings this port does not implement."""
        config = {k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE}
        levels = len(config.get("block_out_channels", [64]))
        for key, allowed in _BLOCK_TYPES.items():
            kinds = list(config.pop(key, [allowed] * levels))
            if set(kinds) != {allowed} or len(kinds) != levels:
                raise ValueError(f"{key} {kinds}: this port builds {levels} x {allowed} (one per block_out_channels)")
        if config.pop("act_fn", "silu") != "silu":
            raise ValueError("only act_fn 'silu' is supported")
        return cls(**config)

    def _sliced(self, fn, x: mx.array, slice_size: int | None) -> mx.array:
        """fn on `slice_size` frames at a time, each slice evaluated before the next starts (bounded
        memory); on the CPU two slices at a time, on two threads (runtime.cpu_threads)."""
        if not slice_size or x.shape[0] <= slice_size:
            return fn(x)
        starts = range(0, x.shape[0], slice_size)
        return mx.concatenate(map_parts(lambda start: fn(x[start:start + slice_size]), starts, (x, self.parameters())),
                              axis=0)

    def _moments(self, x: mx.array) -> mx.array:
        moments = self.encoder(x)
        return self.quant_conv(moments) if "quant_conv" in self else moments

    def _decode(self, z: mx.array) -> mx.array:
        return self.decoder(self.post_quant_conv(z) if "post_quant_conv" in self else z)

    def encode(self, x: mx.array, slice_size: int | None = None) -> LatentDistribution:
        """Frames (B, H, W, C) in [-1, 1] -> the latent distribution, `slice_size` frames at a time."""
        moments = self._sliced(self._moments, x, slice_size)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return LatentDistribution(mean, mx.clip(logvar, -30.0, 20.0))

    def decode(self, z: mx.array, slice_size: int | None = None) -> mx.array:
        """Raw latents (B, h, w, latent) -> frames (B, 8h, 8w, C), `slice_size` frames at a time."""
        return self._sliced(self._decode, z, slice_size)

    def __call__(self, sample: mx.array) -> mx.array:
        """Reconstruct: encode, take the distribution's mode, decode (diffusers' forward)."""
        return self.decode(self.encode(sample).mode())
