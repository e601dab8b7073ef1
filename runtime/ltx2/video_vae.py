"""The LTX-2 video VAE in MLX, mirroring diffusers' `AutoencoderKLLTX2Video` name for name.

Video is channels-last, (B, T, H, W, C), RGB in [-1, 1]. The encoder folds 4x4 pixel patches into
channels, runs causal 3-D convolutions through space/time-to-depth stages and returns the latent
distribution's moments (128 means, then one log-variance repeated 128 times, as diffusers'
encoder does); the decoder unfolds latents through residual depth-to-space stages, optionally
modulated by a timestep, and back to pixels. 32x spatial and 8x temporal compression for the
released configuration: 1 + 8k frames in, 1 + k latent frames out."""
from __future__ import annotations

from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn

from vidport.converter.core.errors import VidportError
from vidport.runtime.layers import SiLU
from vidport.runtime.ltx2.video_vae_blocks import (LTX2VideoCausalConv3d, LTX2VideoDownBlock3D, LTX2VideoMidBlock3d,
                                                   LTX2VideoUpBlock3d, PerChannelRMSNorm,
                                                   PixArtAlphaCombinedTimestepSizeEmbeddings)
from vidport.runtime.ltx2.video_vae_tiling import Tiling, decode_stream, decode_tiled


def _per_block(value: Any, count: int) -> list:
    """A config value given once for every block, or per block (diffusers accepts both)."""
    return [value] * count if isinstance(value, bool) else list(value)


def patchify(x: mx.array, patch: int, patch_t: int) -> mx.array:
    """(B, T, H, W, C) -> (B, T/pt, H/p, W/p, C*pt*p*p), channel = ((c*pt + t)*p + w)*p + h: the
    order of diffusers' encoder (and ltx_core's `b c (f p) (h q) (w r) -> b (c p r q) f h w`)."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // patch_t, patch_t, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 5, 7, 2, 6, 4)
    return x.reshape(b, t // patch_t, h // patch, w // patch, c * patch_t * patch * patch)


def unpatchify(x: mx.array, patch: int, patch_t: int) -> mx.array:
    """The inverse of `patchify` (diffusers' decoder output rearrangement)."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h, w, c // (patch_t * patch * patch), patch_t, patch, patch).transpose(0, 1, 5, 2, 7, 3, 6, 4)
    return x.reshape(b, t * patch_t, h * patch, w * patch, c // (patch_t * patch * patch))


class LTX2VideoEncoder3d(nn.Module):
    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: list[int],
                 spatio_temporal_scaling: list[bool], layers_per_block: list[int], downsample_type: list[str],
                 patch_size: int, patch_size_t: int, resnet_norm_eps: float, is_causal: bool,
                 spatial_padding_mode: str):
        super().__init__()
        self.patch_size, self.patch_size_t, self.is_causal = patch_size, patch_size_t, is_causal
        width = out_channels
        self.conv_in = LTX2VideoCausalConv3d(in_channels * patch_size**2 * patch_size_t, width, 3,
                                             spatial_padding_mode=spatial_padding_mode)
        self.down_blocks = []
        for i, out_width in enumerate(block_out_channels):
            self.down_blocks.append(LTX2VideoDownBlock3D(width, out_width, layers_per_block[i], resnet_norm_eps,
                                                         spatio_temporal_scaling[i], downsample_type[i],
                                                         spatial_padding_mode))
            width = out_width
        self.mid_block = LTX2VideoMidBlock3d(width, layers_per_block[-1], resnet_norm_eps,
                                             spatial_padding_mode=spatial_padding_mode)
        self.norm_out = PerChannelRMSNorm()
        self.conv_act = SiLU()
        self.conv_out = LTX2VideoCausalConv3d(width, out_channels + 1, 3, spatial_padding_mode=spatial_padding_mode)

    def __call__(self, hidden_states: mx.array, causal: bool | None = None) -> mx.array:
        causal = causal or self.is_causal
        x = self.conv_in(patchify(hidden_states, self.patch_size, self.patch_size_t), causal=causal)
        for down_block in self.down_blocks:
            x = down_block(x, causal=causal)
        x = self.mid_block(x, causal=causal)
        x = self.conv_out(self.conv_act(self.norm_out(x)), causal=causal)
        # means, then the one log-variance channel repeated for every mean
        return mx.concatenate([x, mx.repeat(x[..., -1:], x.shape[-1] - 2, axis=-1)], axis=-1)


class LTX2VideoDecoder3d(nn.Module):
    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: list[int],
                 spatio_temporal_scaling: list[bool], layers_per_block: list[int], upsample_type: list[str],
                 patch_size: int, patch_size_t: int, resnet_norm_eps: float, is_causal: bool,
                 inject_noise: list[bool], timestep_conditioning: bool, upsample_residual: list[bool],
                 upsample_factor: list[int], spatial_padding_mode: str):
        super().__init__()
        self.patch_size, self.patch_size_t, self.is_causal = patch_size, patch_size_t, is_causal
        widths, scaling = block_out_channels[::-1], spatio_temporal_scaling[::-1]
        layers, noise = layers_per_block[::-1], inject_noise[::-1]
        residual, factor = upsample_residual[::-1], upsample_factor[::-1]
        width = widths[0]
        self.conv_in = LTX2VideoCausalConv3d(in_channels, width, 3, spatial_padding_mode=spatial_padding_mode)
        self.mid_block = LTX2VideoMidBlock3d(width, layers[0], resnet_norm_eps, noise[0], timestep_conditioning,
                                             spatial_padding_mode)
        self.up_blocks = []
        for i in range(len(widths)):
            block_in, width = width // factor[i], widths[i] // factor[i]
            self.up_blocks.append(LTX2VideoUpBlock3d(block_in, width, layers[i + 1], resnet_norm_eps, scaling[i],
                                                     upsample_type[i], noise[i + 1], timestep_conditioning,
                                                     residual[i], factor[i], spatial_padding_mode))
        self.norm_out = PerChannelRMSNorm()
        self.conv_act = SiLU()
        self.conv_out = LTX2VideoCausalConv3d(width, out_channels * patch_size**2 * patch_size_t, 3,
                                              spatial_padding_mode=spatial_padding_mode)
        if timestep_conditioning:
            self.timestep_scale_multiplier = mx.array(1000.0)
            self.time_embedder = PixArtAlphaCombinedTimestepSizeEmbeddings(width * 2)
            self.scale_shift_table = mx.zeros((2, width))

    def __call__(self, hidden_states: mx.array, temb: mx.array | None = None, causal: bool | None = None) -> mx.array:
        causal = causal or self.is_causal
        x = self.conv_in(hidden_states, causal=causal)
        if "timestep_scale_multiplier" in self:
            temb = temb * self.timestep_scale_multiplier.astype(temb.dtype)
        x = self.mid_block(x, temb, causal=causal)
        for up_block in self.up_blocks:
            x = up_block(x, temb, causal=causal)
        x = self.norm_out(x)
        if "time_embedder" in self:
            batch = x.shape[0]
            table = self.time_embedder(timestep=temb.reshape(-1), batch_size=batch).reshape(batch, 2, -1)
            table = table + self.scale_shift_table.astype(table.dtype)
            shift, scale = (table[:, i, None, None, None, :] for i in range(2))
            x = x * (1 + scale) + shift
        x = self.conv_out(self.conv_act(x), causal=causal)
        return unpatchify(x, self.patch_size, self.patch_size_t)


class AutoencoderKLLTX2Video(nn.Module):
    """diffusers' AutoencoderKLLTX2Video; `from_config` takes its config. `encode` returns the
    latent distribution's moments (its mean is the first `latent_channels`), `decode` the video
    (unclamped, as diffusers returns it). `latents_mean` / `latents_std` are the file's latent
    statistics, for pipelines to normalise with."""

    channels_last = True

    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 128,
                 block_out_channels: list[int] = (256, 512, 1024, 2048),
                 down_block_types: list[str] = ("LTX2VideoDownBlock3D",) * 4,
                 decoder_block_out_channels: list[int] = (256, 512, 1024),
                 layers_per_block: list[int] = (4, 6, 6, 2, 2), decoder_layers_per_block: list[int] = (5, 5, 5, 5),
                 spatio_temporal_scaling: bool | list[bool] = (True, True, True, True),
                 decoder_spatio_temporal_scaling: bool | list[bool] = (True, True, True),
                 decoder_inject_noise: bool | list[bool] = (False, False, False, False),
                 downsample_type: list[str] = ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
                 upsample_type: list[str] = ("spatiotemporal", "spatiotemporal", "spatiotemporal"),
                 upsample_residual: bool | list[bool] = (True, True, True), upsample_factor: list[int] = (2, 2, 2),
                 timestep_conditioning: bool = False, patch_size: int = 4, patch_size_t: int = 1,
                 resnet_norm_eps: float = 1e-6, scaling_factor: float = 1.0, encoder_causal: bool = True,
                 decoder_causal: bool = True, encoder_spatial_padding_mode: str = "zeros",
                 decoder_spatial_padding_mode: str = "reflect", spatial_compression_ratio: int | None = None,
                 temporal_compression_ratio: int | None = None):
        super().__init__()
        if any(kind != "LTX2VideoDownBlock3D" for kind in down_block_types):
            raise ValueError(f"down_block_types {list(down_block_types)}: only LTX2VideoDownBlock3D exists")
        encoder_scaling = _per_block(spatio_temporal_scaling, len(layers_per_block) - 1)
        decoder_blocks = len(decoder_layers_per_block)
        self.latent_channels = latent_channels
        self.rgb_channels = in_channels
        self.spatial_compression_ratio = spatial_compression_ratio or patch_size * 2 ** sum(encoder_scaling)
        self.temporal_compression_ratio = temporal_compression_ratio or patch_size_t * 2 ** sum(encoder_scaling)
        self.encoder = LTX2VideoEncoder3d(in_channels, latent_channels, list(block_out_channels), encoder_scaling,
                                          list(layers_per_block), list(downsample_type), patch_size, patch_size_t,
                                          resnet_norm_eps, encoder_causal, encoder_spatial_padding_mode)
        self.decoder = LTX2VideoDecoder3d(latent_channels, out_channels, list(decoder_block_out_channels),
                                          _per_block(decoder_spatio_temporal_scaling, decoder_blocks - 1),
                                          list(decoder_layers_per_block), list(upsample_type), patch_size,
                                          patch_size_t, resnet_norm_eps, decoder_causal,
                                          _per_block(decoder_inject_noise, decoder_blocks), timestep_conditioning,
                                          _per_block(upsample_residual, decoder_blocks - 1), list(upsample_factor),
                                          decoder_spatial_padding_mode)
        self.latents_mean = mx.zeros((latent_channels,))
        self.latents_std = mx.ones((latent_channels,))
        self.tiling: Tiling | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoencoderKLLTX2Video":
        return cls(**config)

    def check_video(self, video_shape: tuple[int, ...]) -> None:
        """Refuse a video the encoder cannot take, before any work: 1 + kT frames, sides divisible
        by the spatial factor, RGB channels last."""
        if len(video_shape) != 5 or video_shape[-1] != self.rgb_channels:
            raise VidportError(f"video of shape {list(video_shape)}: expected (batch, frames, height, width, "
                               f"{self.rgb_channels}), channels last")
        frames, height, width = video_shape[1:4]
        step, factor = self.temporal_compression_ratio, self.spatial_compression_ratio
        if frames < 1 or (frames - 1) % step:
            raise VidportError(f"{frames} frames: the LTX-2 video VAE encodes 1 + {step}k frames (1, {1 + step}, "
                               f"{1 + 2 * step}, ...)")
        if height % factor or width % factor:
            raise VidportError(f"{height}x{width} pixels: height and width must be multiples of {factor} for this VAE",
                               hint=f"resize or crop to {height // factor * factor}x{width // factor * factor}")

    def encode(self, x: mx.array, causal: bool | None = None) -> mx.array:
        """(B, 1 + 8k, H, W, 3) in [-1, 1] -> moments (B, 1 + k, H/32, W/32, 2 * latent_channels)."""
        self.check_video(tuple(x.shape))
        return self.encoder(x, causal=causal)

    def encode_mean(self, x: mx.array) -> mx.array:
        """The posterior's mode (its mean): the latents of a video."""
        return self.encode(x)[..., : self.latent_channels]

    def enable_tiling(self, tiling: Tiling | None = None) -> None:
        """Decode in overlapping spatial tiles (and, with `Tiling(temporal=True)`, runs of frames)
        as diffusers' `enable_tiling` / `use_framewise_decoding` do; `disable_tiling` turns it off."""
        self.tiling = tiling or Tiling()

    def disable_tiling(self) -> None:
        self.tiling = None

    def _check_decode(self, z: mx.array, temb: mx.array | None) -> None:
        if z.ndim != 5 or z.shape[-1] != self.latent_channels:
            raise VidportError(f"latents of shape {list(z.shape)}: expected (batch, frames, height, width, "
                               f"{self.latent_channels}), channels last")
        if "time_embedder" in self.decoder and temb is None:
            raise VidportError("this decoder is timestep-conditioned: give the decode timestep (temb)")

    def decode(self, z: mx.array, temb: mx.array | None = None, causal: bool | None = None) -> mx.array:
        """(B, T, h, w, latent_channels) -> video (B, 1 + 8(T-1), 32h, 32w, 3); `temb` the decode
        timestep where the decoder is timestep-conditioned; tiled when tiling is on."""
        self._check_decode(z, temb)
        if self.tiling is not None:
            return decode_tiled(self, z, temb, causal, self.tiling)
        return self.decoder(z, temb, causal=causal)

    def decode_stream(self, z: mx.array, temb: mx.array | None = None,
                      causal: bool | None = None) -> Iterator[mx.array]:
        """`decode` as chunks of frames (B, n, H, W, 3), in order, each final when yielded, so a
        writer can take a long clip run by run: the model's tiling, or diffusers' defaults with
        temporal runs on where none is set. Checks its input as `decode` does, at the call."""
        self._check_decode(z, temb)
        return decode_stream(self, z, temb, causal, self.tiling or Tiling(temporal=True))
