"""Parameter-light layers of the Wan VAE, channels-last: RMS norm, the resample pieces (nearest
upsampling, right/bottom zero padding, an index-named Sequential), the Wan 2.2 space/time
shortcuts (AvgDown3D, DupUp3D) and 2x2 patchify. Each matches its diffusers namesake exactly,
with the channel axis last: (B, T, H, W, C) video, (N, H, W, C) frames."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime import native


class WanRMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (diffusers `WanRMS_norm`, no bias). Normalized in
    float32, as diffusers does for half-precision inputs."""

    channels_last = True

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = mx.ones((dim,))
        self.scale = dim**0.5

    def __call__(self, x: mx.array) -> mx.array:
        y = native.rms_norm(x, (self.gamma * self.scale).reshape(-1))
        if y is not None:  # float32 on the CPU: on every core (runtime.native)
            return y
        wide = x.astype(mx.float32)
        norm = mx.sqrt(mx.sum(wide * wide, axis=-1, keepdims=True))
        return (wide / mx.maximum(norm, 1e-12)).astype(x.dtype) * self.scale * self.gamma


class Identity(nn.Module):
    """A module that returns its input (diffusers calls an nn.Identity shortcut, so the port has one)."""

    channels_last = True

    def __call__(self, x: mx.array) -> mx.array:
        return x


class Sequential(nn.Module):
    """An nn.Sequential whose children are named 0, 1, ... as in PyTorch (`resample.1.weight`),
    so the port's names equal diffusers' with no renaming. MLX loads such names as a list; item
    access by integer makes that work."""

    channels_last = True

    def __init__(self, *layers: nn.Module):
        super().__init__()
        for index, layer in enumerate(layers):
            setattr(self, str(index), layer)

    def __getitem__(self, key):
        return super().__getitem__(str(key) if isinstance(key, int) else key)

    def __call__(self, x: mx.array) -> mx.array:
        for index in range(len(self)):
            x = self[index](x)
        return x


class WanUpsample(nn.Module):
    """Nearest upsampling of (N, H, W, C) frames by 2 (nearest-exact at an integer factor)."""

    channels_last = True

    def __call__(self, x: mx.array) -> mx.array:
        return mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2)


class ZeroPad2d(nn.Module):
    """One zero row at the bottom and one zero column at the right, before a stride-2 conv."""

    channels_last = True

    def __call__(self, x: mx.array) -> mx.array:
        return mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])


class AvgDown3D(nn.Module):
    """Wan 2.2 encoder shortcut: fold each factor_t x factor_s x factor_s block into channels
    (channel = c * factor + (t, h, w) offset), then average groups of them down to out_channels."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        self.out_channels = out_channels
        self.group_size = in_channels * factor_t * factor_s * factor_s // out_channels

    def __call__(self, x: mx.array) -> mx.array:
        ft, fs = self.factor_t, self.factor_s
        pad_t = (ft - x.shape[1] % ft) % ft
        if pad_t:
            x = mx.pad(x, [(0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)])
        b, t, h, w, c = x.shape
        x = x.reshape(b, t // ft, ft, h // fs, fs, w // fs, fs, c)
        x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # b, t', h', w', c, ft, fs, fs
        x = x.reshape(b, t // ft, h // fs, w // fs, self.out_channels, self.group_size)
        return x.mean(axis=-1)


class DupUp3D(nn.Module):
    """Wan 2.2 decoder shortcut, the inverse layout of AvgDown3D: repeat channels, then unfold
    them into factor_t x factor_s x factor_s blocks; the first chunk keeps only its last frame."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.factor_t, self.factor_s = factor_t, factor_s
        self.out_channels = out_channels
        self.repeats = out_channels * factor_t * factor_s * factor_s // in_channels

    def __call__(self, x: mx.array, first_chunk: bool = False) -> mx.array:
        ft, fs = self.factor_t, self.factor_s
        b, t, h, w, _ = x.shape
        x = mx.repeat(x, self.repeats, axis=-1)
        x = x.reshape(b, t, h, w, self.out_channels, ft, fs, fs)
        x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # b, t, ft, h, fs, w, fs, c
        x = x.reshape(b, t * ft, h * fs, w * fs, self.out_channels)
        return x[:, ft - 1:] if first_chunk else x


def patchify(x: mx.array, patch: int) -> mx.array:
    """(B, T, H, W, C) -> (B, T, H/p, W/p, C*p*p), channel = c*p*p + column offset*p + row offset
    (diffusers' and the official `b c f (h q) (w r) -> b (c r q) f h w`)."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 2, 4, 6, 5, 3).reshape(b, t, h // patch, w // patch, c * patch * patch)


def unpatchify(x: mx.array, patch: int) -> mx.array:
    """The inverse of `patchify`."""
    b, t, h, w, cpp = x.shape
    x = x.reshape(b, t, h, w, cpp // (patch * patch), patch, patch)  # ..., c, column offset, row offset
    return x.transpose(0, 1, 2, 6, 3, 5, 4).reshape(b, t, h * patch, w * patch, cpp // (patch * patch))
