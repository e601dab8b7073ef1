"""The LTX-2 audio VAE in MLX, mirroring diffusers' `AutoencoderKLLTX2Audio` tree name for name.

Spectrograms and latents are channels-last, (batch, time, mel, channels): the MLX convolutions'
layout, time where diffusers' (batch, channels, time, mel) has its height. Every convolution is
causal along time (all its padding before the first frame), the upsampler drops its first output
frame, so frame t of any output depends only on frames <= t of the input: decoding a prefix of the
latents gives a prefix of the spectrogram. Mel spectrograms of 1 + 4k frames encode to 1 + k
latent frames (four mel bins to one), which decode back to 1 + 4k.

`latents_mean` / `latents_std` are the latents' statistics over (channel, mel bin) pairs: the
pipeline normalizes latents packed to (batch, time, channels * mel) with them
(`normalize_latents` / `denormalize_latents`); encode and decode leave latents raw, as diffusers'.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.converter.core.errors import VidportError
from vidport.runtime.layers import Conv2d, Dropout, SiLU, attention
from vidport.runtime.sd_vae import LatentDistribution

EPS = 1e-6  # every pixel norm of the audio VAE
LATENT_DOWNSAMPLE_FACTOR = 4  # time frames per latent frame (diffusers' constant)


class LTX2AudioPixelNorm(nn.Module):
    """x / sqrt(mean over channels of x^2 + eps), at every (time, mel) position; no weights.
    Computed in float32."""

    channels_last = True

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(mx.float32)
        return (x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + EPS)).astype(x.dtype)


class Identity(nn.Module):
    """The mid-block attention's place when the config has none (diffusers `nn.Identity`)."""

    channels_last = True

    def __call__(self, x: mx.array) -> mx.array:
        return x


class LTX2AudioCausalConv2d(nn.Module):
    """A convolution padded (k - 1) * dilation frames before the first frame and none after it;
    along mel, symmetrically (diffusers `LTX2AudioCausalConv2d`, causality_axis "height")."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        reach = kernel_size - 1
        self.padding = ((0, 0), (reach, 0), (reach // 2, reach - reach // 2), (0, 0))

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, self.padding) if self.padding[1][0] else x)


class LTX2AudioAttnBlock(nn.Module):
    """One-head self-attention over every (time, mel) position after a pixel norm, 1x1
    convolutions for q, k, v and the output projection, added back to its input."""

    channels_last = True

    def __init__(self, channels: int):
        super().__init__()
        self.norm = LTX2AudioPixelNorm()
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        batch, time, mel, channels = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(batch, 1, time * mel, channels) for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, channels**-0.5).reshape(batch, time, mel, channels)
        return x + self.proj_out(out)


class LTX2AudioResnetBlock(nn.Module):
    """norm, SiLU, causal 3x3 conv, twice; a causal 1x1 conv on the shortcut where widths change."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = LTX2AudioPixelNorm()
        self.non_linearity = SiLU()
        self.conv1 = LTX2AudioCausalConv2d(in_channels, out_channels, 3)
        self.norm2 = LTX2AudioPixelNorm()
        self.dropout = Dropout(0.0)
        self.conv2 = LTX2AudioCausalConv2d(out_channels, out_channels, 3)
        if in_channels != out_channels:
            self.nin_shortcut = LTX2AudioCausalConv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        """`temb`: diffusers' encoder and decoder pass None (the audio VAE has no timestep input)."""
        if temb is not None:
            raise ValueError("the LTX-2 audio VAE's residual blocks take no timestep embedding")
        h = self.conv1(self.non_linearity(self.norm1(x)))
        h = self.conv2(self.dropout(self.non_linearity(self.norm2(h))))
        return (self.nin_shortcut(x) if "nin_shortcut" in self else x) + h


class LTX2AudioDownsample(nn.Module):
    """A stride-2 3x3 convolution after two zero frames before the first and one zero mel bin
    after the last: 1 + 2k frames -> 1 + k, causal."""

    channels_last = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (2, 0), (0, 1), (0, 0)]))


class LTX2AudioUpsample(nn.Module):
    """Nearest 2x along time and mel, a causal 3x3 convolution, then the first frame dropped:
    k frames -> 2k - 1 (its first two outputs would both see only the first input frame)."""

    channels_last = True

    def __init__(self, channels: int):
        super().__init__()
        self.conv = LTX2AudioCausalConv2d(channels, channels, 3)

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)[:, 1:]


class Stage(nn.Module):
    """One resolution level: residual blocks (`block`), an attention after each where the level's
    resolution is listed in attn_resolutions (`attn`), and the resampler (diffusers' bare
    nn.Module holding them; the encoder and decoder run their parts)."""

    def __init__(self, blocks: list[LTX2AudioResnetBlock], width: int, attention_after: bool):
        super().__init__()
        self.block = blocks
        self.attn = [LTX2AudioAttnBlock(width) for _ in blocks] if attention_after else []


class Mid(nn.Module):
    """Residual block, attention (or identity), residual block, at the lowest resolution
    (diffusers' bare nn.Module: `run` is no module call, as there)."""

    def __init__(self, channels: int, add_attention: bool):
        super().__init__()
        self.block_1 = LTX2AudioResnetBlock(channels, channels)
        self.attn_1 = LTX2AudioAttnBlock(channels) if add_attention else Identity()
        self.block_2 = LTX2AudioResnetBlock(channels, channels)

    def run(self, x: mx.array) -> mx.array:
        return self.block_2(self.attn_1(self.block_1(x)))


def _run_stage(stage: Stage, x: mx.array) -> mx.array:
    for i, block in enumerate(stage.block):
        x = block(x)
        if stage.attn:
            x = stage.attn[i](x)
    return x


class LTX2AudioEncoder(nn.Module):
    """Mel spectrogram (B, T, mel, in) -> moments (B, 1 + (T - 1) // 4, mel / 4, 2 * latent)."""

    channels_last = True

    def __init__(self, base_channels: int, in_channels: int, latent_channels: int, ch_mult: list[int],
                 num_res_blocks: int, attn_resolutions: set[int], resolution: int, mid_attention: bool,
                 double_z: bool):
        super().__init__()
        self.conv_in = LTX2AudioCausalConv2d(in_channels, base_channels, 3)
        self.down = []
        width, size = base_channels, resolution
        for level, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(LTX2AudioResnetBlock(width, base_channels * mult))
                width = base_channels * mult
            stage = Stage(blocks, width, size in attn_resolutions)
            if level != len(ch_mult) - 1:
                stage.downsample = LTX2AudioDownsample(width)
                size //= 2
            self.down.append(stage)
        self.mid = Mid(width, mid_attention)
        self.norm_out = LTX2AudioPixelNorm()
        self.non_linearity = SiLU()
        self.conv_out = LTX2AudioCausalConv2d(width, 2 * latent_channels if double_z else latent_channels, 3)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        x = self.conv_in(hidden_states)
        for stage in self.down:
            x = _run_stage(stage, x)
            if "downsample" in stage:
                x = stage.downsample(x)
        x = self.mid.run(x)
        return self.conv_out(self.non_linearity(self.norm_out(x)))


class LTX2AudioDecoder(nn.Module):
    """Latents (B, t, m, latent) -> spectrogram (B, 4t - 3, mel_bins, out): the decoded frames
    cropped (or zero-padded) to that size, as diffusers does."""

    channels_last = True

    def __init__(self, base_channels: int, output_channels: int, latent_channels: int, ch_mult: list[int],
                 num_res_blocks: int, attn_resolutions: set[int], resolution: int, mid_attention: bool,
                 mel_bins: int | None):
        super().__init__()
        self.output_channels, self.mel_bins = output_channels, mel_bins
        width = base_channels * ch_mult[-1]
        self.conv_in = LTX2AudioCausalConv2d(latent_channels, width, 3)
        self.mid = Mid(width, mid_attention)
        size = resolution // 2 ** (len(ch_mult) - 1)
        stages = []
        for level in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(LTX2AudioResnetBlock(width, base_channels * ch_mult[level]))
                width = base_channels * ch_mult[level]
            stage = Stage(blocks, width, size in attn_resolutions)
            if level != 0:
                stage.upsample = LTX2AudioUpsample(width)
                size *= 2
            stages.insert(0, stage)
        self.up = stages  # up[level]: level 0 is the finest; the decoder runs the coarsest first
        self.norm_out = LTX2AudioPixelNorm()
        self.non_linearity = SiLU()
        self.conv_out = LTX2AudioCausalConv2d(width, output_channels, 3)

    def __call__(self, sample: mx.array) -> mx.array:
        frames, mel = sample.shape[1], sample.shape[2]
        target_time = max(frames * LATENT_DOWNSAMPLE_FACTOR - (LATENT_DOWNSAMPLE_FACTOR - 1), 1)
        target_mel = self.mel_bins if self.mel_bins is not None else mel
        x = self.mid.run(self.conv_in(sample))
        for stage in reversed(self.up):
            x = _run_stage(stage, x)
            if "upsample" in stage:
                x = stage.upsample(x)
        x = self.conv_out(self.non_linearity(self.norm_out(x)))[:, :target_time, :target_mel]
        short_time, short_mel = target_time - x.shape[1], target_mel - x.shape[2]
        if short_time > 0 or short_mel > 0:
            x = mx.pad(x, [(0, 0), (0, max(short_time, 0)), (0, max(short_mel, 0)), (0, 0)])
        return x


# config entries that do not change the network (the pipeline and the mel front end read them)
_NOT_ARCHITECTURE = ("sample_rate", "mel_hop_length", "is_causal", "dropout")


class AutoencoderKLLTX2Audio(nn.Module):
    """The audio VAE: `encode` mel spectrograms to a latent distribution, `decode` latents to mel
    spectrograms; `normalize_latents` / `denormalize_latents` apply the latents' statistics."""

    channels_last = True

    def __init__(self, base_channels: int = 128, output_channels: int = 2, ch_mult: list[int] = (1, 2, 4),
                 num_res_blocks: int = 2, attn_resolutions: list[int] | None = None, in_channels: int = 2,
                 resolution: int = 256, latent_channels: int = 8, norm_type: str = "pixel",
                 causality_axis: str = "height", mid_block_add_attention: bool = False, mel_bins: int | None = 64,
                 double_z: bool = True):
        super().__init__()
        if norm_type != "pixel":
            raise ValueError(f"norm_type {norm_type!r}: this port implements 'pixel' (every LTX-2 release)")
        if causality_axis != "height":
            raise ValueError(f"causality_axis {causality_axis!r}: this port implements 'height' (causal in time, "
                             "every LTX-2 release)")
        common = {"base_channels": base_channels, "latent_channels": latent_channels, "ch_mult": list(ch_mult),
                  "num_res_blocks": num_res_blocks, "attn_resolutions": set(attn_resolutions or ()),
                  "resolution": resolution, "mid_attention": mid_block_add_attention}
        self.encoder = LTX2AudioEncoder(in_channels=in_channels, double_z=double_z, **common)
        self.decoder = LTX2AudioDecoder(output_channels=output_channels, mel_bins=mel_bins, **common)
        self.latents_mean = mx.zeros((base_channels,))
        self.latents_std = mx.ones((base_channels,))
        self.latent_channels, self.in_channels = latent_channels, in_channels

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AutoencoderKLLTX2Audio":
        """From a diffusers AutoencoderKLLTX2Audio config; refuses settings this port does not implement."""
        return cls(**{k: v for k, v in config.items() if k not in _NOT_ARCHITECTURE})

    def encode(self, mel: mx.array) -> LatentDistribution:
        """(B, 1 + 4k, mel_bins, in) log-mel frames -> the latents' distribution over
        (B, 1 + k, mel_bins / 4, latent): raw, not normalized."""
        if mel.ndim != 4 or mel.shape[-1] != self.in_channels:
            raise VidportError(f"mel spectrogram of shape {list(mel.shape)}: expected (batch, frames, mel bins, "
                               f"{self.in_channels}), channels last")
        mean, logvar = mx.split(self.encoder(mel), 2, axis=-1)
        return LatentDistribution(mean, mx.clip(logvar, -30.0, 20.0))

    def decode(self, latents: mx.array) -> mx.array:
        """Raw latents (B, t, m, latent) -> log-mel frames (B, 4t - 3, mel_bins, out)."""
        if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
            raise VidportError(f"latents of shape {list(latents.shape)}: expected (batch, frames, mel, "
                             f"{self.latent_channels}), channels last")
        return self.decoder(latents)

    def normalize_latents(self, latents: mx.array) -> mx.array:
        """Raw latents (B, t, m, C) -> normalized, packed (B, t, C * m) as the DiT takes them: each
        frame's channels one after another (channel-major), then (x - mean) / std per entry."""
        batch, frames, mel, channels = latents.shape
        packed = latents.transpose(0, 1, 3, 2).reshape(batch, frames, channels * mel)
        return (packed - self.latents_mean.astype(packed.dtype)) / self.latents_std.astype(packed.dtype)

    def denormalize_latents(self, packed: mx.array) -> mx.array:
        """Normalized packed latents (B, t, C * m) -> raw latents (B, t, m, C) for `decode`."""
        batch, frames, features = packed.shape
        raw = packed * self.latents_std.astype(packed.dtype) + self.latents_mean.astype(packed.dtype)
        return raw.reshape(batch, frames, self.latent_channels, features // self.latent_channels).transpose(0, 1, 3, 2)

    def __call__(self, mel: mx.array) -> mx.array:
        """Reconstruct: encode, take the distribution's mode, decode (diffusers' forward)."""
        return self.decode(self.encode(mel).mode())
