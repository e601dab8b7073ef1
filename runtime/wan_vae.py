"""The Wan video VAE (2.1 and 2.2) in MLX, mirroring diffusers' `AutoencoderKLWan` name for name.

Encoding runs the causal encoder on 1 + 4k frames chunk by chunk (the first frame, then 4 at a
time) and decoding runs the decoder one latent frame at a time, both through the temporal
feature cache, exactly as diffusers does: memory is bounded by one chunk, not the clip. Video is
channels-last, (B, T, H, W, C), RGB in [-1, 1].
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.converter.core.errors import VidportError
from vidport.runtime.layers import SiLU
from vidport.runtime.wan_vae_blocks import (WanMidBlock, WanResample, WanResidualBlock, WanResidualDownBlock,
                                    WanResidualUpBlock, WanUpBlock)
from vidport.runtime.wan_vae_conv import Cache, WanCausalConv3d, cached_conv
from vidport.runtime.wan_vae_layers import WanRMSNorm, patchify, unpatchify
from vidport.runtime.wan_vae_tiling import Tiling, tiled_decode


class WanEncoder3d(nn.Module):
    channels_last = True

    def __init__(self, in_channels: int, dim: int, z_dim: int, dim_mult: list[int], num_res_blocks: int,
                 temperal_downsample: list[bool], is_residual: bool):
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        last = len(dim_mult) - 1
        self.conv_in = WanCausalConv3d(in_channels, dims[0], 3, padding=1)
        self.down_blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if is_residual:
                self.down_blocks.append(WanResidualDownBlock(in_dim, out_dim, num_res_blocks,
                                                             temperal_downsample[i] if i != last else False, i != last))
                continue
            for _ in range(num_res_blocks):
                self.down_blocks.append(WanResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != last:
                mode = "downsample3d" if temperal_downsample[i] else "downsample2d"
                self.down_blocks.append(WanResample(out_dim, mode))
        self.mid_block = WanMidBlock(dims[-1])
        self.norm_out = WanRMSNorm(dims[-1])
        self.nonlinearity = SiLU()
        self.conv_out = WanCausalConv3d(dims[-1], z_dim, 3, padding=1)

    def __call__(self, x: mx.array, feat_cache: Cache | None = None, feat_idx: list[int] | None = None) -> mx.array:
        x = cached_conv(self.conv_in, x, feat_cache, feat_idx)
        for layer in self.down_blocks:
            x = layer(x, feat_cache=feat_cache, feat_idx=feat_idx)
        x = self.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
        return cached_conv(self.conv_out, self.nonlinearity(self.norm_out(x)), feat_cache, feat_idx)


class WanDecoder3d(nn.Module):
    channels_last = True

    def __init__(self, dim: int, z_dim: int, dim_mult: list[int], num_res_blocks: int,
                 temperal_upsample: list[bool], out_channels: int, is_residual: bool):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        last = len(dim_mult) - 1
        self.conv_in = WanCausalConv3d(z_dim, dims[0], 3, padding=1)
        self.mid_block = WanMidBlock(dims[0])
        self.up_blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != last
            if is_residual:
                self.up_blocks.append(WanResidualUpBlock(in_dim, out_dim, num_res_blocks,
                                                         temperal_upsample[i] if up else False, up))
                continue
            mode = ("upsample3d" if temperal_upsample[i] else "upsample2d") if up else None
            # Wan 2.1 upsamplers halve the width, so every level after the first starts at half
            self.up_blocks.append(WanUpBlock(in_dim // 2 if i > 0 else in_dim, out_dim, num_res_blocks, mode))
        self.norm_out = WanRMSNorm(dims[-1])
        self.nonlinearity = SiLU()
        self.conv_out = WanCausalConv3d(dims[-1], out_channels, 3, padding=1)

    def __call__(self, x: mx.array, feat_cache: Cache | None = None, feat_idx: list[int] | None = None,
                 first_chunk: bool = False) -> mx.array:
        x = cached_conv(self.conv_in, x, feat_cache, feat_idx)
        x = self.mid_block(x, feat_cache=feat_cache, feat_idx=feat_idx)
        for up_block in self.up_blocks:
            x = up_block(x, feat_cache=feat_cache, feat_idx=feat_idx, first_chunk=first_chunk)
        return cached_conv(self.conv_out, self.nonlinearity(self.norm_out(x)), feat_cache, feat_idx)


def _cache_slots(module: nn.Module) -> int:
    """One cache entry per causal convolution (diffusers sizes its list the same way)."""
    return sum(isinstance(m, WanCausalConv3d) for _, m in module.named_modules())


def _evaluate(out: mx.array, cache: Cache) -> None:
    """Materialize a chunk and the cache it leaves, so the lazy graph never spans chunks."""
    mx.eval(out, *[entry for entry in cache if isinstance(entry, mx.array)])


class AutoencoderKLWan(nn.Module):
    """diffusers' AutoencoderKLWan; `from_config` takes its config. `encode` returns the latent
    distribution's moments (mean and log-variance along channels), `decode` the clamped video."""

    channels_last = True

    def __init__(self, base_dim: int = 96, decoder_base_dim: int | None = None, z_dim: int = 16,
                 dim_mult: list[int] = (1, 2, 4, 4), num_res_blocks: int = 2, attn_scales: list[float] = (),
                 temperal_downsample: list[bool] = (False, True, True), dropout: float = 0.0,
                 latents_mean: list[float] | None = None, latents_std: list[float] | None = None,
                 is_residual: bool = False, in_channels: int = 3, out_channels: int = 3,
                 patch_size: int | None = None, scale_factor_temporal: int | None = 4,
                 scale_factor_spatial: int | None = 8):
        super().__init__()
        if list(attn_scales):
            raise ValueError("attention inside the Wan VAE's down/up blocks (attn_scales) is not supported")
        dim_mult, temperal_downsample = list(dim_mult), list(temperal_downsample)
        self.z_dim = z_dim
        self.patch_size = patch_size
        self.scale_factor_temporal = scale_factor_temporal or 4
        self.scale_factor_spatial = scale_factor_spatial or 8
        self.rgb_channels = in_channels // (patch_size or 1) ** 2
        # latents_mean / latents_std are for pipelines, which read them from the config
        self.tiling: Tiling | None = None
        self.encoder = WanEncoder3d(in_channels, base_dim, z_dim * 2, dim_mult, num_res_blocks, temperal_downsample,
                                    is_residual)
        self.quant_conv = WanCausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.post_quant_conv = WanCausalConv3d(z_dim, z_dim, 1)
        self.decoder = WanDecoder3d(decoder_base_dim or base_dim, z_dim, dim_mult, num_res_blocks,
                                    temperal_downsample[::-1], out_channels, is_residual)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoencoderKLWan":
        return cls(**config)

    def check_video(self, video_shape: tuple[int, ...]) -> None:
        """Refuse a video the encoder cannot take, before any work: 1 + 4k frames, sides divisible
        by the spatial factor, RGB channels last."""
        if len(video_shape) != 5 or video_shape[-1] != self.rgb_channels:
            raise VidportError(f"video of shape {list(video_shape)}: expected (batch, frames, height, width, "
                               f"{self.rgb_channels}), channels last")
        frames, height, width = video_shape[1:4]
        step = self.scale_factor_temporal
        if frames < 1 or (frames - 1) % step:
            raise VidportError(f"{frames} frames: the Wan VAE encodes 1 + {step}k frames (1, {1 + step}, "
                               f"{1 + 2 * step}, ..., 81)", hint=f"use {1 + (max(frames, 1) - 1) // step * step} "
                               f"or {1 + ((max(frames, 1) - 1) // step + 1) * step} frames")
        factor = self.scale_factor_spatial
        if height % factor or width % factor:
            fit = f"{height // factor * factor}x{width // factor * factor}"
            raise VidportError(f"{height}x{width} pixels: height and width must be multiples of {factor} for this VAE",
                               hint=f"resize or crop to {fit}")

    def encode(self, video: mx.array) -> mx.array:
        """(B, 1 + 4k, H, W, 3) in [-1, 1] -> moments (B, 1 + k, H/s, W/s, 2 * z_dim)."""
        self.check_video(tuple(video.shape))
        x = patchify(video, self.patch_size) if self.patch_size else video
        cache: Cache = [None] * _cache_slots(self.encoder)
        step = self.scale_factor_temporal
        chunks = [x[:, :1]] + [x[:, 1 + step * i:1 + step * (i + 1)] for i in range((x.shape[1] - 1) // step)]
        outs = []
        for chunk in chunks:
            outs.append(self.encoder(chunk, feat_cache=cache, feat_idx=[0]))
            _evaluate(outs[-1], cache)
        return self.quant_conv(mx.concatenate(outs, axis=1))

    def encode_mean(self, video: mx.array) -> mx.array:
        """The posterior's mode (its mean): what Wan pipelines take as the latents of a video."""
        return self.encode(video)[..., : self.z_dim]

    def enable_tiling(self, tiling: Tiling | None = None) -> None:
        """Decode frames larger than one tile in overlapping spatial tiles (diffusers'
        `enable_tiling`; same defaults); `disable_tiling` turns it off."""
        self.tiling = tiling or Tiling()

    def disable_tiling(self) -> None:
        self.tiling = None

    def decode(self, latents: mx.array) -> mx.array:
        """(B, T, h, w, z_dim) -> video (B, 1 + 4(T-1), H, W, 3) clamped to [-1, 1]; one latent
        frame at a time through the feature cache (per tile, with tiling on)."""
        if latents.ndim != 5 or latents.shape[-1] != self.z_dim:
            raise VidportError(f"latents of shape {list(latents.shape)}: expected (batch, frames, height, width, "
                               f"{self.z_dim}), channels last")
        tiling = self.tiling
        if tiling and (latents.shape[2] > tiling.min_height // self.scale_factor_spatial
                       or latents.shape[3] > tiling.min_width // self.scale_factor_spatial):
            out = tiled_decode(self, latents, tiling)
        else:
            out = self.decode_frames(self.post_quant_conv(latents))
        if self.patch_size:
            out = unpatchify(out, self.patch_size)
        return mx.clip(out, -1.0, 1.0)

    def decode_frames(self, x: mx.array) -> mx.array:
        """The decoder over post-quant latents, one latent frame at a time with a fresh cache."""
        cache: Cache = [None] * _cache_slots(self.decoder)
        outs = []
        for i in range(x.shape[1]):
            outs.append(self.decoder(x[:, i:i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0))
            _evaluate(outs[-1], cache)
        return mx.concatenate(outs, axis=1)
