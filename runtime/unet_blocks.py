"""The UNet's blocks in MLX, mirroring diffusers' `unet_2d_blocks` name for name: ResnetBlock2D,
Downsample2D, Upsample2D and the down / mid / up blocks built from them.

Feature maps are channels-last (batch, height, width, channels). Given a `Motion` config a block
also holds `motion_modules` (AnimateDiff temporal transformers) and runs one after each
resnet (+ attention) pair, as diffusers' `*Motion` blocks do; the same class serves both UNets.
"""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vidport.runtime.animatediff_motion import TemporalTransformer
from vidport.runtime.layers import Conv2d, Dropout, GroupNorm, SiLU, upsample2x_conv3x3
from vidport.runtime.unet_attention import Transformer2DModel


class ResnetBlock2D(nn.Module):
    """norm -> SiLU -> conv, plus the projected time embedding, norm -> SiLU -> conv, residual."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.dropout = Dropout(0.0)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nonlinearity = SiLU()
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, input_tensor: mx.array, temb: mx.array | None = None) -> mx.array:
        hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))
        if temb is not None:
            hidden = hidden + self.time_emb_proj(self.nonlinearity(temb))[:, None, None, :]
        hidden = self.conv2(self.dropout(self.nonlinearity(self.norm2(hidden))))
        shortcut = self.conv_shortcut(input_tensor) if "conv_shortcut" in self else input_tensor
        return shortcut + hidden


class Downsample2D(nn.Module):
    """A 3x3 convolution with stride 2 (padding 1, as SD configures it)."""

    channels_last = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        return self.conv(hidden_states)


def nearest_resize(x: mx.array, size: tuple[int, int]) -> mx.array:
    """Nearest-neighbour resizing of a channels-last map to `size`, picking pixels as torch does."""
    _, height, width, _ = x.shape
    rows = np.minimum(np.floor(np.arange(size[0]) * (height / size[0])).astype(np.int32), height - 1)
    cols = np.minimum(np.floor(np.arange(size[1]) * (width / size[1])).astype(np.int32), width - 1)
    return mx.take(mx.take(x, mx.array(rows), axis=1), mx.array(cols), axis=2)


class Upsample2D(nn.Module):
    """Nearest x2 (or to the skip connection's size), then a 3x3 convolution; at x2 computed on the
    low-resolution map (layers.upsample2x_conv3x3)."""

    channels_last = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, hidden_states: mx.array, output_size: tuple[int, int] | None = None) -> mx.array:
        _, height, width, _ = hidden_states.shape
        if output_size is None or tuple(output_size) == (2 * height, 2 * width):
            return upsample2x_conv3x3(hidden_states, self.conv.weight, self.conv.get("bias"))
        return self.conv(nearest_resize(hidden_states, tuple(output_size)))


@dataclass(frozen=True)
class Motion:
    """How the motion modules of one block are built (diffusers' UNetMotionModel arguments)."""

    heads: int
    transformer_layers: int | tuple[int, ...]  # per block, or per motion module of the block
    groups: int
    max_seq_length: int

    def modules(self, channels: int, count: int) -> list[TemporalTransformer]:
        layers = self.transformer_layers
        layers = [layers] * count if isinstance(layers, int) else list(layers)
        return [TemporalTransformer(channels, self.heads, n, self.groups, self.max_seq_length) for n in layers]


@dataclass(frozen=True)
class BlockArgs:
    """What every block of one UNet shares."""

    temb_channels: int
    groups: int
    eps: float
    cross_attention_dim: int
    linear_projection: bool = False


class _Block(nn.Module):
    """Shared plumbing: the optional motion module after each resnet (+ attention) pair."""

    def _motion(self, index: int, hidden_states: mx.array, num_frames: int) -> mx.array:
        if "motion_modules" not in self:
            return hidden_states
        # the temporal transformer takes (batch*frames, C, H, W), as diffusers' does
        out = self.motion_modules[index](hidden_states.transpose(0, 3, 1, 2), num_frames=num_frames)
        return out.transpose(0, 2, 3, 1)

    def _attend(self, index: int, hidden_states: mx.array, encoder_hidden_states: mx.array | None) -> mx.array:
        if "attentions" not in self:
            return hidden_states
        return self.attentions[index](hidden_states, encoder_hidden_states=encoder_hidden_states)


def _attentions(args: BlockArgs, channels: int, count: int, heads: int, layers: int) -> list[Transformer2DModel]:
    return [Transformer2DModel(heads, channels // heads, channels, layers, args.cross_attention_dim, args.groups,
                               args.linear_projection) for _ in range(count)]


class DownBlock(_Block):
    """diffusers' DownBlock2D (`cross_attention=False`) and CrossAttnDownBlock2D, with or without motion."""

    channels_last = ("hidden_states",)

    def __init__(self, in_channels: int, out_channels: int, layers: int, args: BlockArgs, cross_attention: bool,
                 add_downsample: bool, heads: int, transformer_layers: int, motion: Motion | None = None):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, args.temb_channels,
                                      args.groups, args.eps) for i in range(layers)]
        if cross_attention:
            self.attentions = _attentions(args, out_channels, layers, heads, transformer_layers)
        if motion is not None:
            self.motion_modules = motion.modules(out_channels, layers)
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels)]

    def __call__(self, hidden_states: mx.array, temb: mx.array | None = None,
                 encoder_hidden_states: mx.array | None = None, num_frames: int = 1) -> tuple[mx.array, tuple]:
        output_states = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = resnet(hidden_states, temb)
            hidden_states = self._attend(i, hidden_states, encoder_hidden_states)
            hidden_states = self._motion(i, hidden_states, num_frames)
            output_states.append(hidden_states)
        for downsampler in self.get("downsamplers", []):
            hidden_states = downsampler(hidden_states)
            output_states.append(hidden_states)
        return hidden_states, tuple(output_states)


class MidBlock(_Block):
    """diffusers' UNetMidBlock2DCrossAttn: resnet, then (attention, [motion,] resnet) pairs."""

    channels_last = ("hidden_states",)

    def __init__(self, channels: int, args: BlockArgs, heads: int, transformer_layers: int, layers: int = 1,
                 motion: Motion | None = None):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, args.temb_channels, args.groups, args.eps)
                        for _ in range(layers + 1)]
        self.attentions = _attentions(args, channels, layers, heads, transformer_layers)
        if motion is not None:
            self.motion_modules = motion.modules(channels, layers)

    def __call__(self, hidden_states: mx.array, temb: mx.array | None = None,
                 encoder_hidden_states: mx.array | None = None, num_frames: int = 1) -> mx.array:
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            hidden_states = self._attend(i, hidden_states, encoder_hidden_states)
            hidden_states = self._motion(i, hidden_states, num_frames)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class UpBlock(_Block):
    """diffusers' UpBlock2D (`cross_attention=False`) and CrossAttnUpBlock2D, with or without motion:
    each resnet first takes the matching skip connection, concatenated on channels."""

    channels_last = ("hidden_states", "res_hidden_states_tuple")

    def __init__(self, in_channels: int, prev_output_channels: int, out_channels: int, layers: int,
                 args: BlockArgs, cross_attention: bool, add_upsample: bool, heads: int, transformer_layers: int,
                 motion: Motion | None = None):
        super().__init__()
        self.resnets = []
        for i in range(layers):
            skip = in_channels if i == layers - 1 else out_channels
            first = prev_output_channels if i == 0 else out_channels
            self.resnets.append(ResnetBlock2D(first + skip, out_channels, args.temb_channels, args.groups, args.eps))
        if cross_attention:
            self.attentions = _attentions(args, out_channels, layers, heads, transformer_layers)
        if motion is not None:
            self.motion_modules = motion.modules(out_channels, layers)
        if add_upsample:
            self.upsamplers = [Upsample2D(out_channels)]

    def __call__(self, hidden_states: mx.array, res_hidden_states_tuple: tuple, temb: mx.array | None = None,
                 encoder_hidden_states: mx.array | None = None, upsample_size: tuple[int, int] | None = None,
                 num_frames: int = 1) -> mx.array:
        skips = list(res_hidden_states_tuple)
        for i, resnet in enumerate(self.resnets):
            hidden_states = mx.concatenate([hidden_states, skips.pop()], axis=-1)
            hidden_states = resnet(hidden_states, temb)
            hidden_states = self._attend(i, hidden_states, encoder_hidden_states)
            hidden_states = self._motion(i, hidden_states, num_frames)
        for upsampler in self.get("upsamplers", []):
            hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states
