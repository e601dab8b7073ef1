"""The LTX-2 vocoder's layers in MLX, channels-last ((B, L, C) signals): 1-D convolutions, the
transposed convolutions that upsample, LeakyReLU / Snake(Beta) activations and the anti-aliased
(2x up, act, 2x down) activation with its windowed-sinc filters, each matching its diffusers
namesake in diffusers/pipelines/ltx2/vocoder.py.

Weights: torch stores a Conv1d [O, I, K] and a ConvTranspose1d [I, O, K]; MLX stores both
[O, K, I] (the `conv1d` / `conv_transpose1d` roles of mappings/targets/mlx.yaml). The sinc
filters keep torch's [1, 1, K] and are applied to every channel (a depthwise convolution)."""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class Conv1d(nn.Conv1d):
    """nn.Conv1d on (B, L, C) signals."""

    channels_last = True


class ConvTranspose1d(nn.ConvTranspose1d):
    """nn.ConvTranspose1d on (B, L, C) signals: out length (L - 1) * stride - 2 * padding + K, as
    torch's. MLX's transposed convolution equals torch's (stride, output_padding, dilation alike)
    except where stride > 1 and padding > dilation * (K - 1): that is refused (the vocoders'
    padding, (K - stride) // 2, never is)."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, output_padding: int = 0, bias: bool = True):
        if stride > 1 and padding > dilation * (kernel_size - 1):
            raise ValueError(f"a strided transposed convolution with padding {padding} > dilation * (kernel - 1) = "
                             f"{dilation * (kernel_size - 1)}: MLX's differs from torch's there")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, output_padding, bias)


class LeakyReLU(nn.Module):
    channels_last = True

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = negative_slope

    def __call__(self, x: mx.array) -> mx.array:
        return leaky_relu(x, self.negative_slope)


def leaky_relu(x: mx.array, negative_slope: float) -> mx.array:
    return mx.maximum(x, negative_slope * x)  # 0 < slope < 1


class SnakeBeta(nn.Module):
    """x + sin(alpha x)^2 / (beta + eps), alpha and beta per channel stored as logarithms
    (`use_beta=False`: Snake, alpha divides)."""

    channels_last = True

    def __init__(self, channels: int, use_beta: bool = True, eps: float = 1e-9):
        super().__init__()
        self.alpha = mx.zeros((channels,))
        if use_beta:
            self.beta = mx.zeros((channels,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        alpha = mx.exp(self.alpha)
        amplitude = mx.exp(self["beta"]) if "beta" in self else alpha
        return x + (1.0 / (amplitude + self.eps)) * mx.square(mx.sin(x * alpha))


def _depthwise(x: mx.array, taps: mx.array, stride: int, transposed: bool) -> mx.array:
    """One [1, 1, K] filter over every channel of (B, L, C): torch's conv1d / conv_transpose1d
    with the filter expanded to C groups."""
    channels = x.shape[-1]
    weight = mx.broadcast_to(taps.reshape(1, -1, 1).astype(x.dtype), (channels, taps.size, 1))
    if transposed:
        return mx.conv_transpose1d(x, weight, stride=stride, groups=channels)
    return mx.conv1d(x, weight, stride=stride, groups=channels)


def _edge_pad(x: mx.array, left: int, right: int) -> mx.array:
    return mx.pad(x, [(0, 0), (left, right), (0, 0)], mode="edge")


def hann_sinc_filter(ratio: int) -> tuple[np.ndarray, int]:
    """The resampling filter of diffusers' UpSample1d(window_type="hann") (torchaudio's resample
    kernel: rolloff 0.99, 6 zero crossings), computed as torch does in float32; and its width."""
    rolloff, zero_crossings = 0.99, 6
    width = math.ceil(zero_crossings / rolloff)
    size = 2 * width * ratio + 1
    time = (np.arange(size, dtype=np.float32) / np.float32(ratio) - np.float32(width)) * np.float32(rolloff)
    clamped = np.clip(time, -zero_crossings, zero_crossings)
    window = np.cos(clamped * np.float32(math.pi / zero_crossings / 2)) ** 2
    taps = np.sinc(time.astype(np.float64)).astype(np.float32) * window * np.float32(rolloff / ratio)
    return taps.astype(np.float32), width


class UpSample1d(nn.Module):
    """Upsampling by `ratio`: edge padding, a transposed depthwise convolution with the low-pass
    filter (stride `ratio`, gain `ratio`), the transients cut off. The Kaiser filter of the
    anti-aliased activations is a weight (`filter`, from the checkpoint); the Hann filter of the
    BWE's resampler is computed (diffusers does not store it)."""

    channels_last = True

    def __init__(self, ratio: int = 2, kernel_size: int | None = None, window_type: str = "kaiser"):
        super().__init__()
        self.ratio = ratio
        if window_type == "hann":
            taps, width = hann_sinc_filter(ratio)
            self._taps = mx.array(taps)  # underscored: computed, not a parameter
            self.kernel_size = taps.size
            self.pad, self.pad_left, self.pad_right = width, 2 * width * ratio, taps.size - ratio
        else:
            self.kernel_size = int(6 * ratio // 2) * 2 if kernel_size is None else kernel_size
            self.filter = mx.zeros((1, 1, self.kernel_size))
            self.pad = self.kernel_size // ratio - 1
            self.pad_left = self.pad * ratio + (self.kernel_size - ratio) // 2
            self.pad_right = self.pad * ratio + (self.kernel_size - ratio + 1) // 2

    def __call__(self, x: mx.array) -> mx.array:
        taps = self["filter"] if "filter" in self else self._taps
        y = self.ratio * _depthwise(_edge_pad(x, self.pad, self.pad), taps, self.ratio, transposed=True)
        return y[:, self.pad_left:y.shape[1] - self.pad_right]


class DownSample1d(nn.Module):
    """Low-pass filtering and decimation by `ratio`: edge padding, a depthwise convolution with the
    Kaiser filter (`filter`), stride `ratio`."""

    channels_last = True

    def __init__(self, ratio: int = 2, kernel_size: int | None = None):
        super().__init__()
        self.ratio = ratio
        kernel_size = kernel_size or int(6 * ratio // 2) * 2
        self.filter = mx.zeros((1, 1, kernel_size))
        self.pad_left = kernel_size // 2 + kernel_size % 2 - 1
        self.pad_right = kernel_size // 2

    def __call__(self, x: mx.array) -> mx.array:
        return _depthwise(_edge_pad(x, self.pad_left, self.pad_right), self.filter, self.ratio, transposed=False)


class AntiAliasAct1d(nn.Module):
    """An activation at twice the rate: upsample, act, downsample."""

    channels_last = True

    def __init__(self, act: nn.Module, ratio: int = 2, kernel_size: int = 12):
        super().__init__()
        self.upsample = UpSample1d(ratio, kernel_size)
        self.act = act
        self.downsample = DownSample1d(ratio, kernel_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.downsample(self.act(self.upsample(x)))


def activation(act_fn: str, channels: int, negative_slope: float, antialias: bool, ratio: int,
               kernel_size: int) -> nn.Module:
    """A residual block's activation, as diffusers' ResBlock builds it."""
    if act_fn in ("snakebeta", "snake"):
        act: nn.Module = SnakeBeta(channels, use_beta=act_fn == "snakebeta")
    else:
        act = LeakyReLU(negative_slope)
    return AntiAliasAct1d(act, ratio, kernel_size) if antialias else act


class ResBlock(nn.Module):
    """HiFi-GAN residual block: for each dilation, x += conv2(act2(conv1(act1(x)))), the first
    convolution dilated, both 'same'-padded."""

    channels_last = True

    def __init__(self, channels: int, kernel_size: int, dilations: list[int], act_fn: str,
                 negative_slope: float, antialias: bool, ratio: int, antialias_kernel_size: int):
        super().__init__()

        def act() -> nn.Module:
            return activation(act_fn, channels, negative_slope, antialias, ratio, antialias_kernel_size)

        self.convs1 = [Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
                       for d in dilations]
        self.acts1 = [act() for _ in dilations]
        self.convs2 = [Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations]
        self.acts2 = [act() for _ in dilations]

    def __call__(self, x: mx.array) -> mx.array:
        for act1, conv1, act2, conv2 in zip(self.acts1, self.convs1, self.acts2, self.convs2):
            x = x + conv2(act2(conv1(act1(x))))
        return x
