"""The LTX-2 latent upsampler on MLX (diffusers `LTX2LatentUpsamplerModel`, name for name).

Channels-last throughout: latents (B, F, H, W, C) in and out, frames folded into the batch
(B * F, H, W, C) where diffusers folds them for its 2-D layers. The pixel shuffles therefore read
the channel axis last: diffusers' channel index is c * p1 * p2 + i * p2 + j (output channel c,
row offset i, column offset j), so the last axis splits as (C, p1, p2), not (p1, p2, C)."""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.converter.core.errors import VidportError
from vidport.runtime.layers import Conv2d, GroupNorm, SiLU
from vidport.runtime.wan_vae_conv import conv3d
from vidport.runtime.wan_vae_layers import Sequential

# diffusers' RATIONAL_RESAMPLER_SCALE_MAPPING: scale -> (up by num with a pixel shuffle, down by den)
RATIONAL_SCALES = {0.75: (3, 4), 1.5: (3, 2), 2.0: (2, 1), 4.0: (4, 1)}
GROUPS = 32


class Conv3d(nn.Conv3d):
    """MLX Conv3d on channels-last (B, T, H, W, C), weights [out, kt, kh, kw, in]; run in bands of
    rows when its unfolded input is large (the real model's 1024 channels over a stage-2 clip would
    unfold to gigabytes), as the Wan VAE's convolutions are."""

    channels_last = True

    def __call__(self, x: mx.array) -> mx.array:
        return conv3d(x, self.weight, self.stride, tuple((p, p) for p in self.padding), self.bias)


def _conv(dims: int, in_channels: int, out_channels: int) -> nn.Module:
    return (Conv2d if dims == 2 else Conv3d)(in_channels, out_channels, kernel_size=3, padding=1)


class ResBlock(nn.Module):
    """conv-norm-SiLU-conv-norm, the input added before the last SiLU (one SiLU module, called twice)."""

    channels_last = True

    def __init__(self, channels: int, dims: int = 3):
        super().__init__()
        self.conv1 = _conv(dims, channels, channels)
        self.norm1 = GroupNorm(GROUPS, channels)
        self.conv2 = _conv(dims, channels, channels)
        self.norm2 = GroupNorm(GROUPS, channels)
        self.activation = SiLU()

    def __call__(self, x: mx.array) -> mx.array:
        h = self.activation(self.norm1(self.conv1(x)))
        return self.activation(self.norm2(self.conv2(h)) + x)


class PixelShuffleND(nn.Module):
    """Channels to space (dims 2: rows, columns), time (dims 1: frames) or both (dims 3), channel
    axis last: (..., C * p1 [* p2 [* p3]]) splits as (C, p1, p2, p3), each factor moved after its axis."""

    channels_last = True

    def __init__(self, dims: int, upscale_factors: tuple[int, ...] = (2, 2, 2)):
        super().__init__()
        if dims not in (1, 2, 3):
            raise VidportError(f"a pixel shuffle over {dims} axes: 1, 2 or 3")
        self.factors = tuple(upscale_factors[:dims])

    def __call__(self, x: mx.array) -> mx.array:
        # (B, *grid, *rest, C * factors): the grid is the shuffled axes (frames; rows and columns;
        # or all three), `rest` the ones left alone (rows and columns of a temporal shuffle)
        axes = len(self.factors)
        grid, rest = x.shape[1:1 + axes], x.shape[1 + axes:-1]
        channels = x.shape[-1] // math.prod(self.factors)
        x = x.reshape(x.shape[0], *grid, *rest, channels, *self.factors)
        c = 1 + axes + len(rest)
        order = [0]
        for k in range(axes):  # each factor right after its axis: (A_k, p_k) -> A_k * p_k
            order += [1 + k, c + 1 + k]
        x = x.transpose([*order, *range(1 + axes, c), c])
        return x.reshape(x.shape[0], *(g * f for g, f in zip(grid, self.factors)), *rest, channels)


class BlurDownsample(nn.Module):
    """Per-channel binomial blur at stride `stride` over (N, H, W, C) (identity at stride 1); the
    kernel is diffusers' buffer [1, 1, k, k], stored as the file gives it."""

    channels_last = True

    def __init__(self, stride: int, kernel_size: int = 5):
        super().__init__()
        self.stride = stride
        self.kernel = mx.zeros((1, 1, kernel_size, kernel_size))

    def __call__(self, x: mx.array) -> mx.array:
        if self.stride == 1:
            return x
        channels, size = x.shape[-1], self.kernel.shape[-1]
        weight = mx.broadcast_to(self.kernel.reshape(1, size, size, 1).astype(x.dtype), (channels, size, size, 1))
        return mx.conv2d(x, weight, stride=self.stride, padding=size // 2, groups=channels)


class SpatialRationalResampler(nn.Module):
    """Scale (N, H, W, C) frames by num / den: a conv to num^2 x the channels, a num x num pixel
    shuffle, a blur at stride den."""

    channels_last = True

    def __init__(self, mid_channels: int, scale: float):
        super().__init__()
        self.num, self.den = RATIONAL_SCALES[float(scale)]
        self.conv = Conv2d(mid_channels, self.num**2 * mid_channels, kernel_size=3, padding=1)
        self.pixel_shuffle = PixelShuffleND(2, (self.num, self.num))
        self.blur_down = BlurDownsample(self.den)

    def __call__(self, x: mx.array) -> mx.array:
        return self.blur_down(self.pixel_shuffle(self.conv(x)))


class LTX2LatentUpsamplerModel(nn.Module):
    """Latents (B, F, H, W, in_channels) -> upsampled latents, as diffusers' forward: frames folded
    into the batch for 2-D layers, the temporal upsampler's first output frame dropped."""

    channels_last = True

    def __init__(self, in_channels: int = 128, mid_channels: int = 1024, num_blocks_per_stage: int = 4,
                 dims: int = 3, spatial_upsample: bool = True, temporal_upsample: bool = False,
                 rational_spatial_scale: float = 2.0, use_rational_resampler: bool = True):
        super().__init__()
        self.in_channels, self.dims, self.temporal_upsample = in_channels, dims, temporal_upsample
        self.initial_conv = _conv(dims, in_channels, mid_channels)
        self.initial_norm = GroupNorm(GROUPS, mid_channels)
        self.initial_activation = SiLU()
        self.res_blocks = [ResBlock(mid_channels, dims) for _ in range(num_blocks_per_stage)]
        if spatial_upsample and temporal_upsample:
            self.upsampler = Sequential(Conv3d(mid_channels, 8 * mid_channels, kernel_size=3, padding=1),
                                        PixelShuffleND(3))
        elif spatial_upsample and use_rational_resampler:
            self.upsampler = SpatialRationalResampler(mid_channels, rational_spatial_scale)
        elif spatial_upsample:
            self.upsampler = Sequential(Conv2d(mid_channels, 4 * mid_channels, kernel_size=3, padding=1),
                                        PixelShuffleND(2))
        else:
            self.upsampler = Sequential(Conv3d(mid_channels, 2 * mid_channels, kernel_size=3, padding=1),
                                        PixelShuffleND(1))
        self.post_upsample_res_blocks = [ResBlock(mid_channels, dims) for _ in range(num_blocks_per_stage)]
        self.final_conv = _conv(dims, mid_channels, in_channels)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LTX2LatentUpsamplerModel:
        """Built from diffusers' config; what diffusers could not run is refused here."""
        known = ("in_channels", "mid_channels", "num_blocks_per_stage", "dims", "spatial_upsample",
                 "temporal_upsample", "rational_spatial_scale", "use_rational_resampler")
        args = {k: config[k] for k in known if config.get(k) is not None}
        dims = args.get("dims", 3)
        spatial, temporal = args.get("spatial_upsample", True), args.get("temporal_upsample", False)
        if dims not in (2, 3):
            raise VidportError(f"latent upsampler: dims = {dims}; 2 or 3")
        if not spatial and not temporal:
            raise VidportError("latent upsampler: neither spatial_upsample nor temporal_upsample is set")
        if temporal and dims != 3:
            raise VidportError("latent upsampler: temporal upsampling needs dims = 3 (diffusers cannot run it at 2)")
        if spatial and not temporal and args.get("use_rational_resampler", True) \
                and float(args.get("rational_spatial_scale", 2.0)) not in RATIONAL_SCALES:
            raise VidportError(f"latent upsampler: rational_spatial_scale = {args['rational_spatial_scale']}; "
                               f"one of {sorted(RATIONAL_SCALES)}")
        return cls(**args)

    def __call__(self, latents: mx.array) -> mx.array:
        if latents.ndim != 5 or latents.shape[-1] != self.in_channels:
            raise VidportError(f"latent upsampler: latents of shape {tuple(latents.shape)}; it takes "
                               f"(batch, frames, height, width, {self.in_channels}), channels last")
        batch, frames = latents.shape[:2]
        x = latents.reshape(batch * frames, *latents.shape[2:]) if self.dims == 2 else latents
        x = self.initial_activation(self.initial_norm(self.initial_conv(x)))
        for block in self.res_blocks:
            x = block(x)
        if self.dims == 3 and self.temporal_upsample:
            x = self.upsampler(x)[:, 1:]
        elif self.dims == 3:
            x = self.upsampler(x.reshape(batch * frames, *x.shape[2:]))
            x = x.reshape(batch, frames, *x.shape[1:])
        else:
            x = self.upsampler(x)
        for block in self.post_upsample_res_blocks:
            x = block(x)
        x = self.final_conv(x)
        return x.reshape(batch, frames, *x.shape[1:]) if self.dims == 2 else x
