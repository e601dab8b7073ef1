"""The Wan VAE's causal 3-D convolution (channels-last) and the temporal feature cache around it.

Causal: time is padded on the past side only, so frame t never sees frame t+1. Video is encoded
and decoded a few frames at a time; each cached convolution keeps the last CACHE_T frames of its
input so the next chunk's convolution sees the same past it would have seen in one long pass.
The cache is diffusers' (`feat_cache` list + `feat_idx` cursor) so the golden harness can feed a
recorded cache into any block of the port.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime import native
from vidport.runtime.layers import Conv2d

CACHE_T = 2

# mx.conv3d unfolds its input (kernel volume x input size); above this many bytes of unfolded
# input a convolution runs in bands of output rows, each evaluated before the next, so a 480p
# decode does not need tens of gigabytes for one convolution.
UNFOLD_BUDGET_BYTES = 256 * 1024**2

# MLX's scheduler allocates each operation's output when it queues the operation, running ahead of
# the computation; over a chunk of full-resolution frames that held 5.8 GB at once (against 4.1 GB
# with MLX's banded convolutions, which evaluate as they go). A native convolution with a larger
# output is evaluated on the spot, which bounds how far the queue runs ahead.
EVALUATE_BYTES = 64 * 1024**2

Cache = list  # one entry per cached convolution: None (not yet run), an mx.array, or "Rep"


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


class WanCausalConv3d(nn.Module):
    """A Conv3d on (B, T, H, W, C) with `padding` applied twice on the past side of time (and
    symmetrically in space); `cache_x`, the previous chunk's last frames, replaces that much of
    the time padding. Weights are [out, kt, kh, kw, in]."""

    channels_last = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0):
        super().__init__()
        kernel = _triple(kernel_size)
        self.weight = mx.zeros((out_channels, *kernel, in_channels))
        self.bias = mx.zeros((out_channels,))
        self.stride = _triple(stride)
        pad_t, pad_h, pad_w = _triple(padding)
        self.time_padding = 2 * pad_t
        self.space_padding = (pad_h, pad_w)

    def __call__(self, x: mx.array, cache_x: mx.array | None = None) -> mx.array:
        past = self.time_padding
        if cache_x is not None and past > 0:
            x = mx.concatenate([cache_x.astype(x.dtype), x], axis=1)
            past -= cache_x.shape[1]
        pad_h, pad_w = self.space_padding
        return conv3d(x, self.weight, self.stride, ((past, 0), (pad_h, pad_h), (pad_w, pad_w)), self.bias)


class BandedConv2d(Conv2d):
    """The resample's per-frame Conv2d (an nn.Conv2d: same weights and names), run as a banded
    convolution: at 480p its unfolded input alone would be gigabytes."""

    def __call__(self, x: mx.array) -> mx.array:
        pad_h, pad_w = self.padding
        bias = self.bias if "bias" in self else None
        return conv3d(x[None], self.weight[:, None], (1, *self.stride), ((0, 0), (pad_h, pad_h), (pad_w, pad_w)), bias)[0]


Padding = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (before, after) of T, H, W


def conv3d(x: mx.array, weight: mx.array, stride: tuple[int, int, int], padding: Padding,
           bias: mx.array | None = None) -> mx.array:
    """conv3d(zero-padded x, weight) + bias, channels-last: vidport's native convolution
    (vidport.runtime.native) where it applies (stride 1, float32, on the CPU), else mx.pad and
    `_conv3d_banded`."""
    if stride == (1, 1, 1):
        y = native.conv(x, weight, bias, padding)
        if y is not None:
            if y.nbytes > EVALUATE_BYTES:
                mx.eval(y)
            return y
    if any(before or after for before, after in padding):
        x = mx.pad(x, [(0, 0), *padding, (0, 0)])
    y = _conv3d_banded(x, weight, stride)
    return y if bias is None else y + bias


def _conv3d_banded(x: mx.array, weight: mx.array, stride: tuple[int, int, int]) -> mx.array:
    """mx.conv3d without padding; in bands of output rows when its unfolded input is large."""
    _, frames, height, width, channels = x.shape
    kt, kh, kw = weight.shape[1:4]
    out_t = (frames - kt) // stride[0] + 1
    out_h = (height - kh) // stride[1] + 1
    out_w = (width - kw) // stride[2] + 1
    row_bytes = out_t * out_w * kt * kh * kw * channels * x.itemsize
    if row_bytes * out_h <= UNFOLD_BUDGET_BYTES or out_h == 1:
        return mx.conv3d(x, weight, stride=stride)
    rows = max(1, UNFOLD_BUDGET_BYTES // row_bytes)
    bands = []
    for first in range(0, out_h, rows):
        last = min(out_h, first + rows)
        band = mx.conv3d(x[:, :, first * stride[1]:(last - 1) * stride[1] + kh], weight, stride=stride)
        mx.eval(band)
        bands.append(band)
    return mx.concatenate(bands, axis=2)


def own_copy(frames: mx.array) -> mx.array:
    """The cached frames in a buffer of their own: a slice would keep its whole chunk alive."""
    return mx.contiguous(frames)


def cached_conv(conv: WanCausalConv3d, x: mx.array, feat_cache: Cache | None, feat_idx: list[int] | None) -> mx.array:
    """Run `conv` with the cache entry at the cursor as its past, then store this chunk's last
    CACHE_T input frames there (a one-frame chunk borrows the previous entry's last frame) and
    advance the cursor. Without a cache, the convolution pads its past with zeros."""
    if feat_cache is None:
        return conv(x)
    idx = feat_idx[0]
    previous = feat_cache[idx]
    keep = x[:, -CACHE_T:]
    if keep.shape[1] < CACHE_T and previous is not None:
        keep = mx.concatenate([previous[:, -1:].astype(keep.dtype), keep], axis=1)
    out = conv(x, previous)
    feat_cache[idx] = own_copy(keep)
    feat_idx[0] += 1
    return out
