"""The LTX-2 vocoders in MLX, mirroring diffusers' LTX2Vocoder (LTX-2.0: a HiFi-GAN turning the
audio VAE's stereo mel spectrogram into a 24 kHz waveform) and LTX2VocoderWithBWE (LTX-2.3: a
BigVGAN-style vocoder at 16 kHz, then a bandwidth extender that predicts a 48 kHz residual from
the mel spectrogram of that waveform, added to its resampled copy).

Like diffusers, the models take mel spectrograms (B, 2, frames, mel_bins) and return waveforms
(B, channels, samples); inside they run channels-last (layers in vocoder_layers.py)."""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.ltx2.vocoder_layers import (AntiAliasAct1d, Conv1d, ConvTranspose1d, LeakyReLU, ResBlock,
                                                  SnakeBeta, UpSample1d, leaky_relu)

ACTIVATIONS = ("snakebeta", "snake", "leaky_relu")
FINAL_ACTIVATIONS = ("tanh", "clamp", None)


class LTX2Vocoder(nn.Module):
    """conv_in, then per upsampler: (LeakyReLU), the transposed convolution, the mean of its
    residual blocks; then act_out, conv_out and the final tanh / clamp."""

    def __init__(self, in_channels: int = 128, hidden_channels: int = 1024, out_channels: int = 2,
                 upsample_kernel_sizes: list[int] = (16, 15, 8, 4, 4), upsample_factors: list[int] = (6, 5, 2, 2, 2),
                 resnet_kernel_sizes: list[int] = (3, 7, 11),
                 resnet_dilations: list[list[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
                 act_fn: str = "leaky_relu", leaky_relu_negative_slope: float = 0.1, antialias: bool = False,
                 antialias_ratio: int = 2, antialias_kernel_size: int = 12, final_act_fn: str | None = "tanh",
                 final_bias: bool = True, output_sampling_rate: int = 24000):
        super().__init__()
        if len(upsample_kernel_sizes) != len(upsample_factors):
            raise ValueError(f"{len(upsample_kernel_sizes)} upsample_kernel_sizes for {len(upsample_factors)} "
                             "upsample_factors")
        if len(resnet_kernel_sizes) != len(resnet_dilations):
            raise ValueError(f"{len(resnet_kernel_sizes)} resnet_kernel_sizes for {len(resnet_dilations)} "
                             "resnet_dilations")
        if act_fn not in ACTIVATIONS or final_act_fn not in FINAL_ACTIVATIONS:
            raise ValueError(f"act_fn {act_fn!r} / final_act_fn {final_act_fn!r}: supported {ACTIVATIONS} / "
                             f"{FINAL_ACTIVATIONS}")
        self.act_fn, self.final_act_fn = act_fn, final_act_fn
        self.negative_slope = leaky_relu_negative_slope
        self.resnets_per_upsample = len(resnet_kernel_sizes)
        self.output_sampling_rate = output_sampling_rate
        self.conv_in = Conv1d(in_channels, hidden_channels, 7, padding=3)
        self.upsamplers, self.resnets = [], []
        channels = hidden_channels
        for stride, kernel_size in zip(upsample_factors, upsample_kernel_sizes):
            self.upsamplers.append(ConvTranspose1d(channels, channels // 2, kernel_size, stride=stride,
                                                   padding=(kernel_size - stride) // 2))
            channels //= 2
            for resnet_kernel, dilations in zip(resnet_kernel_sizes, resnet_dilations):
                self.resnets.append(ResBlock(channels, resnet_kernel, list(dilations), act_fn,
                                             leaky_relu_negative_slope, antialias, antialias_ratio,
                                             antialias_kernel_size))
        if act_fn == "leaky_relu":
            self.act_out: nn.Module = LeakyReLU()  # torch's default slope, as the original code has it
        else:
            self.act_out = AntiAliasAct1d(SnakeBeta(channels, use_beta=True), antialias_ratio, antialias_kernel_size)
        self.conv_out = Conv1d(channels, out_channels, 7, padding=3, bias=final_bias)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LTX2Vocoder":
        return cls(**config)

    def __call__(self, hidden_states: mx.array, time_last: bool = False) -> mx.array:
        """(B, 2, frames, mel_bins) mel spectrogram ((B, 2, mel_bins, frames) with `time_last`)
        -> (B, out_channels, frames * prod(upsample_factors)) waveform."""
        if time_last:
            hidden_states = hidden_states.swapaxes(2, 3)
        batch, stereo, frames, bins = hidden_states.shape
        # diffusers flattens (channel, mel bin) into the conv's input channels: channel-major
        x = hidden_states.transpose(0, 2, 1, 3).reshape(batch, frames, stereo * bins)
        x = self.conv_in(x)
        for i, upsampler in enumerate(self.upsamplers):
            if self.act_fn == "leaky_relu":
                x = leaky_relu(x, self.negative_slope)
            x = upsampler(x)
            group = self.resnets[i * self.resnets_per_upsample:(i + 1) * self.resnets_per_upsample]
            outputs = [resnet(x) for resnet in group]  # every block on the same input, then their mean
            x = sum(outputs[1:], outputs[0]) / len(group)
        x = self.conv_out(self.act_out(x))
        if self.final_act_fn == "tanh":
            x = mx.tanh(x)
        elif self.final_act_fn == "clamp":
            x = mx.clip(x, -1, 1)
        return x.swapaxes(1, 2)


class CausalSTFT(nn.Module):
    """STFT as a strided convolution with the stored (Hann-windowed DFT) bases, left-padded so
    that each frame sees only the past: waveform (N, samples) -> magnitude, phase (N, freqs, frames)."""

    def __init__(self, filter_length: int = 512, hop_length: int = 80, window_length: int = 512):
        super().__init__()
        self.hop_length, self.window_length = hop_length, window_length
        self.forward_basis = mx.zeros(((filter_length // 2 + 1) * 2, 1, filter_length))

    def __call__(self, waveform: mx.array) -> tuple[mx.array, mx.array]:
        if waveform.ndim == 3:
            waveform = waveform[:, 0]
        x = mx.pad(waveform, [(0, 0), (max(0, self.window_length - self.hop_length), 0)])[..., None]
        spec = mx.conv1d(x, self.forward_basis.swapaxes(1, 2).astype(x.dtype), stride=self.hop_length)
        freqs = spec.shape[-1] // 2
        real, imag = spec[..., :freqs], spec[..., freqs:]
        magnitude = mx.sqrt(real * real + imag * imag)
        phase = mx.arctan2(imag.astype(mx.float32), real.astype(mx.float32)).astype(real.dtype)
        return magnitude.swapaxes(1, 2), phase.swapaxes(1, 2)


class MelSTFT(nn.Module):
    """Causal log-mel spectrogram with the stored filterbank: waveform (N, samples) -> log mel
    (N, mel_bins, frames), magnitude, phase, energy."""

    def __init__(self, filter_length: int = 512, hop_length: int = 80, window_length: int = 512,
                 num_mel_channels: int = 64):
        super().__init__()
        self.stft_fn = CausalSTFT(filter_length, hop_length, window_length)
        self.mel_basis = mx.zeros((num_mel_channels, filter_length // 2 + 1))

    def __call__(self, waveform: mx.array) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        magnitude, phase = self.stft_fn(waveform)
        energy = mx.sqrt(mx.sum(magnitude * magnitude, axis=1))
        mel = self.mel_basis.astype(magnitude.dtype) @ magnitude
        return mx.log(mx.maximum(mel, 1e-5)), magnitude, phase, energy


class LTX2VocoderWithBWE(nn.Module):
    """The LTX-2.3 vocoder: `vocoder` at the input rate, then `bwe_generator` on the log mel
    spectrogram of its waveform (padded to whole hops) predicts a residual at the output rate,
    added to the waveform upsampled by `resampler`; clamped to [-1, 1]."""

    def __init__(self, in_channels: int = 128, hidden_channels: int = 1536, out_channels: int = 2,
                 upsample_kernel_sizes: list[int] = (11, 4, 4, 4, 4, 4), upsample_factors: list[int] = (5, 2, 2, 2, 2, 2),
                 resnet_kernel_sizes: list[int] = (3, 7, 11),
                 resnet_dilations: list[list[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)), act_fn: str = "snakebeta",
                 leaky_relu_negative_slope: float = 0.1, antialias: bool = True, antialias_ratio: int = 2,
                 antialias_kernel_size: int = 12, final_act_fn: str | None = None, final_bias: bool = False,
                 bwe_in_channels: int = 128, bwe_hidden_channels: int = 512, bwe_out_channels: int = 2,
                 bwe_upsample_kernel_sizes: list[int] = (12, 11, 4, 4, 4),
                 bwe_upsample_factors: list[int] = (6, 5, 2, 2, 2), bwe_resnet_kernel_sizes: list[int] = (3, 7, 11),
                 bwe_resnet_dilations: list[list[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
                 bwe_act_fn: str = "snakebeta", bwe_leaky_relu_negative_slope: float = 0.1,
                 bwe_antialias: bool = True, bwe_antialias_ratio: int = 2, bwe_antialias_kernel_size: int = 12,
                 bwe_final_act_fn: str | None = None, bwe_final_bias: bool = False, filter_length: int = 512,
                 hop_length: int = 80, window_length: int = 512, num_mel_channels: int = 64,
                 input_sampling_rate: int = 16000, output_sampling_rate: int = 48000):
        super().__init__()
        ratio, rest = divmod(output_sampling_rate, input_sampling_rate)
        if rest or ratio < 1:
            raise ValueError(f"output_sampling_rate {output_sampling_rate} is not a multiple of "
                             f"input_sampling_rate {input_sampling_rate}")
        if math.prod(bwe_upsample_factors) != ratio * hop_length:
            raise ValueError(f"the bandwidth extender upsamples its mel frames by {math.prod(bwe_upsample_factors)}, "
                             f"not {ratio} x hop_length {hop_length}: its residual would not fit the resampled waveform")
        self.vocoder = LTX2Vocoder(in_channels, hidden_channels, out_channels, upsample_kernel_sizes, upsample_factors,
                                   resnet_kernel_sizes, resnet_dilations, act_fn, leaky_relu_negative_slope, antialias,
                                   antialias_ratio, antialias_kernel_size, final_act_fn, final_bias,
                                   input_sampling_rate)
        self.bwe_generator = LTX2Vocoder(bwe_in_channels, bwe_hidden_channels, bwe_out_channels,
                                         bwe_upsample_kernel_sizes, bwe_upsample_factors, bwe_resnet_kernel_sizes,
                                         bwe_resnet_dilations, bwe_act_fn, bwe_leaky_relu_negative_slope,
                                         bwe_antialias, bwe_antialias_ratio, bwe_antialias_kernel_size,
                                         bwe_final_act_fn, bwe_final_bias, output_sampling_rate)
        self.mel_stft = MelSTFT(filter_length, hop_length, window_length, num_mel_channels)
        self.resampler = UpSample1d(ratio, window_type="hann")
        self.hop_length = hop_length
        self.input_sampling_rate, self.output_sampling_rate = input_sampling_rate, output_sampling_rate

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LTX2VocoderWithBWE":
        return cls(**config)

    def __call__(self, mel_spec: mx.array) -> mx.array:
        """(B, 2, frames, mel_bins) -> (B, channels, samples at the output rate) in [-1, 1]."""
        x = self.vocoder(mel_spec)
        batch, channels, samples = x.shape
        if samples % self.hop_length:  # the official code pads to whole hops (diffusers' own branch would fail)
            x = mx.pad(x, [(0, 0), (0, 0), (0, self.hop_length - samples % self.hop_length)])
        mel = self.mel_stft(x.reshape(batch * channels, -1))[0]
        mel = mel.reshape(batch, channels, *mel.shape[1:]).swapaxes(2, 3)
        residual = self.bwe_generator(mel)
        skip = self.resampler(x.swapaxes(1, 2)).swapaxes(1, 2)
        waveform = mx.clip(residual + skip, -1, 1)
        return waveform[..., :samples * self.output_sampling_rate // self.input_sampling_rate]
