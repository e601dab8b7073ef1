"""The LTX-2 video VAE's blocks in MLX, mirroring diffusers' autoencoder_kl_ltx2 name for name, on
channels-last video (B, T, H, W, C): the causal 3-D convolution (time padded by repeating the edge
frames, space by zeros or reflection), the per-position RMS norm, the residual block with its
optional timestep modulation, space-to-depth downsamplers and depth-to-space upsamplers with their
parameter-free shortcuts, and the down / mid / up blocks.

Each module takes the arguments diffusers passes it (`temb`, `generator`, `causal`), so the golden
harness can replay any of them on the reference's recorded inputs."""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.layers import Dropout, SiLU
from vidport.runtime.sd15_unet import TimestepEmbedding, Timesteps
from vidport.runtime.wan_vae_conv import conv3d


def _triple(value: int | tuple[int, ...]) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def _reflect(x: mx.array, axis: int, pad: int) -> mx.array:
    """torch's `reflect` padding along one axis (the edge itself not repeated)."""
    size = x.shape[axis]
    before = mx.take(x, mx.arange(pad, 0, -1), axis=axis)
    after = mx.take(x, mx.arange(size - 2, size - 2 - pad, -1), axis=axis)
    return mx.concatenate([before, x, after], axis=axis)


class Conv3d(nn.Module):
    """torch's nn.Conv3d on (B, T, H, W, C), weights [out, kt, kh, kw, in]; its padding in the
    given mode (`zeros` or `reflect`), banded when its unfolded input is large."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0,
                 padding_mode: str = "zeros"):
        super().__init__()
        if padding_mode not in ("zeros", "reflect"):
            raise ValueError(f"spatial padding mode {padding_mode!r}: the port has zeros and reflect")
        self.weight = mx.zeros((out_channels, *_triple(kernel_size), in_channels))
        self.bias = mx.zeros((out_channels,))
        self.stride = _triple(stride)
        self.padding = _triple(padding)
        self.padding_mode = padding_mode

    def __call__(self, x: mx.array) -> mx.array:
        zeros = tuple((p, p) for p in self.padding)
        if self.padding_mode == "reflect":
            for axis, pad in zip((1, 2, 3), self.padding):
                if pad:
                    x = _reflect(x, axis, pad)
            zeros = ((0, 0),) * 3
        return conv3d(x, self.weight, self.stride, zeros, self.bias.astype(x.dtype))


class LTX2VideoCausalConv3d(nn.Module):
    """Time padded with copies of the first frame (causal) or of both edge frames (non-causal),
    then `conv` with the spatial padding."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int] = 3,
                 stride: int | tuple[int, int, int] = 1, spatial_padding_mode: str = "zeros"):
        super().__init__()
        kernel = _triple(kernel_size)
        self.time_kernel = kernel[0]
        self.conv = Conv3d(in_channels, out_channels, kernel, stride, (0, kernel[1] // 2, kernel[2] // 2),
                           spatial_padding_mode)

    def __call__(self, hidden_states: mx.array, causal: bool = True) -> mx.array:
        x, k = hidden_states, self.time_kernel
        if causal:
            parts = [mx.repeat(x[:, :1], k - 1, axis=1), x] if k > 1 else [x]
        else:
            side = (k - 1) // 2
            parts = [mx.repeat(x[:, :1], side, axis=1), x, mx.repeat(x[:, -1:], side, axis=1)] if side else [x]
        return self.conv(mx.concatenate(parts, axis=1) if len(parts) > 1 else x)


class PerChannelRMSNorm(nn.Module):
    """x / sqrt(mean over channels of x^2 + eps) at every position (no weights)."""

    channels_last = True

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array, channel_dim: int | None = None) -> mx.array:
        wide = x.astype(mx.float32)
        return (wide * mx.rsqrt(mx.mean(wide * wide, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)


class LayerNorm(nn.LayerNorm):
    """The resnet's shortcut norm: diffusers moves channels last before calling it, so it takes
    channels-last input on both sides (no `channels_last` flag: the harness moves nothing)."""

    def __init__(self, dims: int, eps: float):
        super().__init__(dims, eps=eps)


class PixArtAlphaCombinedTimestepSizeEmbeddings(nn.Module):
    """Sinusoidal features of the timestep (256 channels, cos first), then linear-SiLU-linear."""

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.time_proj = Timesteps(256, True, 0)
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)

    def __call__(self, timestep: mx.array, resolution: Any = None, aspect_ratio: Any = None,
                 batch_size: int | None = None, hidden_dtype: Any = None) -> mx.array:
        features = self.time_proj(timestep)
        return self.timestep_embedder(features.astype(self.timestep_embedder.linear_1.weight.dtype))


class LTX2VideoResnetBlock3d(nn.Module):
    """norm1 (+ shift/scale 1), SiLU, conv1, norm2 (+ shift/scale 2), SiLU, dropout, conv2, plus
    the input (through norm3 and a 1x1x1 conv where the width changes). `temb` is the mid/up
    block's embedding, (B, 1, 1, 1, 4C) channels-last."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int | None = None, eps: float = 1e-6,
                 inject_noise: bool = False, timestep_conditioning: bool = False, spatial_padding_mode: str = "zeros"):
        super().__init__()
        if inject_noise:
            raise ValueError("decoder_inject_noise (random spatial noise inside the decoder) is not supported")
        out_channels = out_channels or in_channels
        self.nonlinearity = SiLU()
        self.norm1 = PerChannelRMSNorm()
        self.conv1 = LTX2VideoCausalConv3d(in_channels, out_channels, 3, spatial_padding_mode=spatial_padding_mode)
        self.norm2 = PerChannelRMSNorm()
        self.dropout = Dropout(0.0)
        self.conv2 = LTX2VideoCausalConv3d(out_channels, out_channels, 3, spatial_padding_mode=spatial_padding_mode)
        if in_channels != out_channels:
            self.norm3 = LayerNorm(in_channels, eps)
            self.conv_shortcut = Conv3d(in_channels, out_channels, 1)
        if timestep_conditioning:
            self.scale_shift_table = mx.zeros((4, in_channels))

    def __call__(self, inputs: mx.array, temb: mx.array | None = None, generator: Any = None,
                 causal: bool = True) -> mx.array:
        hidden = self.norm1(inputs)
        if "scale_shift_table" in self:
            table = temb.reshape(*temb.shape[:-1], 4, -1) + self.scale_shift_table.astype(temb.dtype)
            shift_1, scale_1, shift_2, scale_2 = (table[..., i, :] for i in range(4))
            hidden = hidden * (1 + scale_1) + shift_1
        hidden = self.conv1(self.nonlinearity(hidden), causal=causal)
        hidden = self.norm2(hidden)
        if "scale_shift_table" in self:
            hidden = hidden * (1 + scale_2) + shift_2
        hidden = self.conv2(self.dropout(self.nonlinearity(hidden)), causal=causal)
        if "norm3" in self:
            inputs = self.conv_shortcut(self.norm3(inputs))
        return hidden + inputs


def space_to_depth(x: mx.array, stride: tuple[int, int, int]) -> mx.array:
    """(B, T, H, W, C) -> (B, T/st, H/sh, W/sw, C*st*sh*sw), channel = c*st*sh*sw + (t*sh + h)*sw + w."""
    b, t, h, w, c = x.shape
    st, sh, sw = stride
    x = x.reshape(b, t // st, st, h // sh, sh, w // sw, sw, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, t // st, h // sh, w // sw, c * st * sh * sw)


def depth_to_space(x: mx.array, stride: tuple[int, int, int]) -> mx.array:
    """The inverse of `space_to_depth`."""
    b, t, h, w, c = x.shape
    st, sh, sw = stride
    x = x.reshape(b, t, h, w, c // (st * sh * sw), st, sh, sw).transpose(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, t * st, h * sh, w * sw, c // (st * sh * sw))


class LTX2VideoDownsampler3d(nn.Module):
    """A convolution to out/(st*sh*sw) channels folded into depth, plus the input folded into
    depth and averaged in groups down to `out_channels`; time first padded with st-1 copies of
    the first frame."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, stride: tuple[int, int, int],
                 spatial_padding_mode: str = "zeros"):
        super().__init__()
        self.stride = tuple(stride)
        volume = math.prod(self.stride)
        self.group_size = in_channels * volume // out_channels
        self.conv = LTX2VideoCausalConv3d(in_channels, out_channels // volume, 3,
                                          spatial_padding_mode=spatial_padding_mode)

    def __call__(self, hidden_states: mx.array, causal: bool = True) -> mx.array:
        x = mx.concatenate([hidden_states[:, : self.stride[0] - 1], hidden_states], axis=1)
        residual = space_to_depth(x, self.stride)
        residual = residual.reshape(*residual.shape[:-1], -1, self.group_size).mean(axis=-1)
        return space_to_depth(self.conv(x, causal=causal), self.stride) + residual


class LTX2VideoUpsampler3d(nn.Module):
    """A convolution to st*sh*sw*C/upscale channels unfolded into space and time (the first st-1
    frames dropped), plus, when residual, the input unfolded the same way and its channels tiled."""

    channels_last = True

    def __init__(self, in_channels: int, stride: tuple[int, int, int], residual: bool = False,
                 upscale_factor: int = 1, spatial_padding_mode: str = "zeros"):
        super().__init__()
        self.stride = tuple(stride)
        self.residual = residual
        self.repeats = math.prod(self.stride) // upscale_factor
        self.conv = LTX2VideoCausalConv3d(in_channels, in_channels * math.prod(self.stride) // upscale_factor, 3,
                                          spatial_padding_mode=spatial_padding_mode)

    def __call__(self, hidden_states: mx.array, causal: bool = True) -> mx.array:
        drop = self.stride[0] - 1
        out = depth_to_space(self.conv(hidden_states, causal=causal), self.stride)[:, drop:]
        if self.residual:
            shortcut = depth_to_space(hidden_states, self.stride)
            out = out + mx.tile(shortcut, (1, 1, 1, 1, self.repeats))[:, drop:]
        return out


class LTX2VideoDownBlock3D(nn.Module):
    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, resnet_eps: float,
                 spatio_temporal_scale: bool, downsample_type: str, spatial_padding_mode: str):
        super().__init__()
        self.resnets = [LTX2VideoResnetBlock3d(in_channels, in_channels, resnet_eps,
                                               spatial_padding_mode=spatial_padding_mode) for _ in range(num_layers)]
        strides = {"spatial": (1, 2, 2), "temporal": (2, 1, 1), "spatiotemporal": (2, 2, 2)}
        if not spatio_temporal_scale:
            return
        if downsample_type == "conv":
            self.downsamplers = [LTX2VideoCausalConv3d(in_channels, in_channels, 3, (2, 2, 2), spatial_padding_mode)]
        elif downsample_type in strides:
            self.downsamplers = [LTX2VideoDownsampler3d(in_channels, out_channels, strides[downsample_type],
                                                        spatial_padding_mode)]
        else:
            raise ValueError(f"downsample_type {downsample_type!r}: expected conv, spatial, temporal or spatiotemporal")

    def __call__(self, hidden_states: mx.array, temb: mx.array | None = None, generator: Any = None,
                 causal: bool = True) -> mx.array:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb, generator, causal=causal)
        for downsampler in self["downsamplers"] if "downsamplers" in self else []:
            hidden_states = downsampler(hidden_states, causal=causal)
        return hidden_states


def _embed(embedder: PixArtAlphaCombinedTimestepSizeEmbeddings, temb: mx.array, batch: int) -> mx.array:
    """The timestep embedding as diffusers' blocks shape it: (B, 1, 1, 1, width) channels-last."""
    return embedder(timestep=temb.reshape(-1), batch_size=batch).reshape(batch, 1, 1, 1, -1)


class LTX2VideoMidBlock3d(nn.Module):
    channels_last = True

    def __init__(self, in_channels: int, num_layers: int, resnet_eps: float, inject_noise: bool = False,
                 timestep_conditioning: bool = False, spatial_padding_mode: str = "zeros"):
        super().__init__()
        if timestep_conditioning:
            self.time_embedder = PixArtAlphaCombinedTimestepSizeEmbeddings(in_channels * 4)
        self.resnets = [LTX2VideoResnetBlock3d(in_channels, in_channels, resnet_eps, inject_noise,
                                               timestep_conditioning, spatial_padding_mode) for _ in range(num_layers)]

    def __call__(self, hidden_states: mx.array, temb: mx.array | None = None, generator: Any = None,
                 causal: bool = True) -> mx.array:
        if "time_embedder" in self:
            temb = _embed(self.time_embedder, temb, hidden_states.shape[0])
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb, generator, causal=causal)
        return hidden_states


class LTX2VideoUpBlock3d(nn.Module):
    """conv_in (a resnet, where the width changes), the upsampler, then the resnets."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, resnet_eps: float,
                 spatio_temporal_scale: bool, upsample_type: str, inject_noise: bool, timestep_conditioning: bool,
                 upsample_residual: bool, upscale_factor: int, spatial_padding_mode: str):
        super().__init__()
        if timestep_conditioning:
            self.time_embedder = PixArtAlphaCombinedTimestepSizeEmbeddings(in_channels * 4)
        if in_channels != out_channels:
            self.conv_in = LTX2VideoResnetBlock3d(in_channels, out_channels, resnet_eps, inject_noise,
                                                  timestep_conditioning, spatial_padding_mode)
        strides = {"spatial": (1, 2, 2), "temporal": (2, 1, 1), "spatiotemporal": (2, 2, 2)}
        if spatio_temporal_scale:
            if upsample_type not in strides:
                raise ValueError(f"upsample_type {upsample_type!r}: expected spatial, temporal or spatiotemporal")
            self.upsamplers = [LTX2VideoUpsampler3d(out_channels * upscale_factor, strides[upsample_type],
                                                    upsample_residual, upscale_factor, spatial_padding_mode)]
        self.resnets = [LTX2VideoResnetBlock3d(out_channels, out_channels, resnet_eps, inject_noise,
                                               timestep_conditioning, spatial_padding_mode) for _ in range(num_layers)]

    def __call__(self, hidden_states: mx.array, temb: mx.array | None = None, generator: Any = None,
                 causal: bool = True) -> mx.array:
        if "conv_in" in self:
            hidden_states = self.conv_in(hidden_states, temb, generator, causal=causal)
        if "time_embedder" in self:
            temb = _embed(self.time_embedder, temb, hidden_states.shape[0])
        for upsampler in self["upsamplers"] if "upsamplers" in self else []:
            hidden_states = upsampler(hidden_states, causal=causal)
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb, generator, causal=causal)
        return hidden_states
