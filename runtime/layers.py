"""Layers shared by the MLX models, the fast elementwise functions they use, and the one attention
function every model calls.

Why the fast functions: on x86 Linux MLX's CPU backend evaluates exp, erf, tanh and sigmoid one
element at a time (about 10-25 ns an element here, against 0.2-0.3 ns for torch's vectorised
kernels), so a SiLU over one UNet feature map cost more than the convolution next to it. The
functions below are written as plain arithmetic under mx.compile, which MLX's CPU JIT turns into
one fused, vectorisable loop: SiLU, GELU and the softmax exponential run 10-20x faster, and they
are as accurate as MLX's own (exp: MLX's own polynomial, max relative error 3.8e-6 like mx.exp;
GELU: max abs error 4.7e-7 like mx.nn.gelu). Two things keep them fast: MLX fuses at most 11
levels of operations into one kernel (deeper graphs are cut into kernels with intermediates in
memory), and mx.where runs about 10x slower than arithmetic in those kernels, so branches are
blended arithmetically.
Half-precision inputs are computed in float32 and rounded once at the end.
"""
from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime import native

F32 = mx.float32

# MLX's exp (mlx/backend/cpu/simd/math.h): 2^t = 2^k * p(f), t = k + f, |f| <= 1/2, degree-6 p.
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1, 1.0)
_ROUND = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds a float32 to the nearest integer
_LOG2E = 1.4426950408889634


def _exp(x: mx.array) -> mx.array:
    """exp of a float32 array in plain arithmetic (to be traced inside mx.compile). Below about
    -88 it gives 0, above about 88.7 +inf; NaN stays NaN. The polynomial is evaluated in Estrin's
    scheme: MLX fuses at most 11 levels of operations into one kernel, Horner's 12 would split it."""
    t = mx.clip(x * _LOG2E, -127.0, 128.0)
    k = (t + _ROUND) - _ROUND
    f = t - k
    f2 = f * f
    a = _EXP2_POLY[::-1]  # ascending: a[0] + a[1] f + ... + a[6] f^6
    p = (a[0] + a[1] * f) + f2 * (a[2] + a[3] * f) + (f2 * f2) * ((a[4] + a[5] * f) + f2 * a[6])
    return p * mx.view(mx.left_shift(k.astype(mx.int32) + 127, 23), F32)  # 2^k from its bits (2^128 = inf)


@mx.compile
def _sigmoid32(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + _exp(-x))


@mx.compile
def _silu32(x: mx.array) -> mx.array:
    return x / (1.0 + _exp(-x))


# Exact GELU = x * Phi(x), Phi(x) = 1 - E / 2 for x >= 0 and E / 2 below, where E = erfc(|x| / sqrt 2)
# = t p(t) exp(-x^2 / 2), t = 1 / (1 + c |x| / sqrt 2) (Abramowitz & Stegun 7.1.26: max abs error
# 1.5e-7; GELU's max abs error here 4.7e-7, as mx.nn.gelu's). No branch (mx.where is slow in MLX's
# CPU kernels); three kernels, each within MLX's fusion depth.
_AS_C = 0.3275911 / math.sqrt(2.0)
_AS_POLY = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


@mx.compile
def _half_gauss32(x: mx.array) -> mx.array:
    """exp(-x^2 / 2)."""
    t = mx.maximum((x * x) * (-0.5 * _LOG2E), -127.0)
    k = (t + _ROUND) - _ROUND
    f = t - k
    f2 = f * f
    a = _EXP2_POLY[::-1]
    p = (a[0] + a[1] * f) + f2 * (a[2] + a[3] * f) + (f2 * f2) * ((a[4] + a[5] * f) + f2 * a[6])
    return p * mx.view(mx.left_shift(k.astype(mx.int32) + 127, 23), F32)


@mx.compile
def _erfc_abs32(x: mx.array, gauss: mx.array) -> mx.array:
    """erfc(|x| / sqrt 2) given exp(-x^2 / 2)."""
    t = 1.0 / (1.0 + _AS_C * mx.abs(x))
    t2 = t * t
    a = _AS_POLY
    return (t * gauss) * ((a[0] + a[1] * t) + t2 * (a[2] + a[3] * t) + (t2 * t2) * a[4])


@mx.compile
def _gelu_from32(x: mx.array, erfc: mx.array) -> mx.array:
    return x * (0.5 * erfc + (x >= 0) * (1.0 - erfc))


@mx.compile
def _geglu_from32(hidden: mx.array, gate: mx.array, erfc: mx.array) -> mx.array:
    return hidden * (gate * (0.5 * erfc + (gate >= 0) * (1.0 - erfc)))


def _gelu32(x: mx.array) -> mx.array:
    return _gelu_from32(x, _erfc_abs32(x, _half_gauss32(x)))


def _geglu32(hidden: mx.array, gate: mx.array) -> mx.array:
    return _geglu_from32(hidden, gate, _erfc_abs32(gate, _half_gauss32(gate)))


@mx.compile
def _gelu_tanh32(x: mx.array) -> mx.array:
    # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): no cancellation near 0
    return x / (1.0 + _exp(-2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _in_f32(fn, *arrays: mx.array) -> mx.array:
    dtype = arrays[0].dtype
    if dtype == F32:
        return fn(*arrays)
    return fn(*(a.astype(F32) for a in arrays)).astype(dtype)


def sigmoid(x: mx.array) -> mx.array:
    return _in_f32(_sigmoid32, x)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x): on every core where the native kernel applies (float32 on the CPU), else the
    compiled arithmetic above."""
    y = native.silu(x)
    return _in_f32(_silu32, x) if y is None else y


def gelu(x: mx.array) -> mx.array:
    """Exact GELU, x * Phi(x) (torch's F.gelu default)."""
    return _in_f32(_gelu32, x)


def gelu_tanh(x: mx.array) -> mx.array:
    """The tanh approximation of GELU (F.gelu(approximate="tanh"), mx.nn.gelu_approx)."""
    return _in_f32(_gelu_tanh32, x)


def geglu(hidden: mx.array, gate: mx.array) -> mx.array:
    """hidden * gelu(gate), in one pass."""
    return _in_f32(_geglu32, hidden, gate)


# ---------------------------------------------------------------------------------------------
# Layers


@mx.compile
def _squared_deviation(x: mx.array, mean: mx.array) -> mx.array:
    d = x - mean
    return d * d


@mx.compile
def _scale_shift(x: mx.array, scale: mx.array, shift: mx.array) -> mx.array:
    return x * scale + shift


class GroupNorm(nn.GroupNorm):
    """PyTorch-compatible group norm on channels-last input (N, ..., C): statistics over all
    positions and each group's C / groups channels.

    Computed in place, without MLX's transposes to a group-major copy and back, in four passes
    over the map: per-channel sums over the positions (then over each group's channels, a small
    array), the squared deviations from the group means and their per-channel sums (two passes:
    mean of squared deviations, as torch, no one-pass cancellation), and one fused x * scale +
    shift with per-channel scale = weight / std and shift = bias - mean * scale (torch's own
    fused form). Every broadcast operand is per channel, (N, 1, C): MLX's CPU kernels run a
    broadcast along the contiguous channel axis about 3x faster than one along a group's few
    channels (the previous (N, HW, G, C/G) form, with per-group operands, took 8.4 ms on a
    16x32x32x320 map where this takes 4.7; nn.GroupNorm(pytorch_compatible=True) 16 ms).

    `channels_last` tells the golden harness that this layer sees the reference's tensors with
    the channel axis moved last, so it can feed it recorded inputs and compare its outputs."""

    channels_last = True

    def __init__(self, groups: int, channels: int, eps: float = 1e-5):
        super().__init__(groups, channels, eps=eps, pytorch_compatible=True)

    def __call__(self, x: mx.array) -> mx.array:
        has_affine = "weight" in self
        y = native.group_norm(x, self.weight if has_affine else None, self.bias if has_affine else None,
                              self.num_groups, self.eps)
        if y is not None:  # float32 on the CPU: the same statistics on every core (runtime.native)
            return y
        dtype, shape = x.dtype, x.shape
        batch, channels, groups = shape[0], shape[-1], self.num_groups
        size = channels // groups
        xf = x.reshape(batch, -1, channels).astype(F32)
        count = xf.shape[1] * size

        def per_channel(group_values: mx.array) -> mx.array:  # (N, G, 1) -> (N, 1, C)
            return mx.broadcast_to(group_values, (batch, groups, size)).reshape(batch, 1, channels)

        def group_sum(values: mx.array) -> mx.array:  # (N, HW, C) -> per group (N, G, 1)
            return mx.sum(mx.sum(values, axis=1).reshape(batch, groups, size), axis=2, keepdims=True)

        mean = per_channel(group_sum(xf) / count)
        inv_std = per_channel(mx.rsqrt(group_sum(_squared_deviation(xf, mean)) / count + self.eps))
        if "weight" in self:
            scale = inv_std * self.weight.astype(F32)
            shift = self.bias.astype(F32) - mean * scale
        else:
            scale, shift = inv_std, -mean * inv_std
        return _scale_shift(xf, scale, shift).reshape(shape).astype(dtype)


# mx.conv2d on the CPU unfolds its input (im2col: kh * kw copies of it) before one matrix
# product, and keeps that copy until the evaluation it belongs to ends. Above this many bytes of
# unfolded input a convolution runs in bands of images, then of output rows, each band evaluated
# before the next: the unfolded copy exists one band at a time (16 frames of the SD VAE's
# 256x256x128 maps would otherwise unfold to 4.8 GB for one convolution). Smaller products are
# also faster here: a 300 MB unfold took 340 ms, the same convolution in 128 MB bands 150 ms.
CONV_UNFOLD_BUDGET_BYTES = 128 * 1024**2


class Conv2d(nn.Conv2d):
    """MLX convolution: channels-last input and output, weights [out, kh, kw, in]; the native
    kernel where it applies, else banded when its unfolded input would exceed
    CONV_UNFOLD_BUDGET_BYTES."""

    channels_last = True

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.bias if "bias" in self else None
        return conv2d_banded(x, self.weight, self.stride, self.padding, self.dilation, self.groups, bias)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def conv2d_banded(x: mx.array, weight: mx.array, stride=1, padding=0, dilation=1, groups: int = 1,
                  bias: mx.array | None = None) -> mx.array:
    """conv2d(x, weight) + bias: vidport's native convolution (vidport.runtime.native) where it
    applies (stride 1, float32, on the CPU), else mx.conv2d, in bands of images and then of output
    rows (each evaluated on the spot) when its unfolded input is large."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if stride == (1, 1) and dilation == (1, 1) and groups == 1:
        y = native.conv(x[:, None], weight[:, None], bias, ((0, 0), (padding[0],) * 2, (padding[1],) * 2))
        if y is not None:
            return y[:, 0]
    y = _mlx_conv2d_banded(x, weight, stride, padding, dilation, groups)
    return y if bias is None else y + bias


def _mlx_conv2d_banded(x: mx.array, weight: mx.array, stride: tuple[int, int], padding: tuple[int, int],
                       dilation: tuple[int, int], groups: int) -> mx.array:
    batch, height, width, channels = x.shape
    kh, kw = weight.shape[1:3]
    if kh * kw == 1 or groups != 1:
        return mx.conv2d(x, weight, stride, padding, dilation, groups)
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    row_bytes = out_w * kh * kw * channels * x.itemsize  # unfolded bytes per output row of one image
    if batch * out_h * row_bytes <= CONV_UNFOLD_BUDGET_BYTES:
        return mx.conv2d(x, weight, stride, padding, dilation, groups)
    images = CONV_UNFOLD_BUDGET_BYTES // (out_h * row_bytes)
    if images >= 1:
        parts = []
        for i in range(0, batch, images):
            parts.append(mx.conv2d(x[i:i + images], weight, stride, padding, dilation, groups))
            mx.eval(parts[-1])
        return mx.concatenate(parts, axis=0)
    # one image is too large: each image in bands of output rows over the padded input
    x = mx.pad(x, [(0, 0), padding, padding, (0, 0)]) if padding != (0, 0) else x
    rows = max(1, CONV_UNFOLD_BUDGET_BYTES // row_bytes)
    reach = dilation[0] * (kh - 1) + 1
    images = []
    for i in range(batch):
        parts = []
        for first in range(0, out_h, rows):
            last = min(out_h, first + rows)
            band = x[i:i + 1, first * stride[0]:(last - 1) * stride[0] + reach]
            parts.append(mx.conv2d(band, weight, stride, 0, dilation, groups))
            mx.eval(parts[-1])
        images.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1))
    return images[0] if batch == 1 else mx.concatenate(images, axis=0)


# Nearest x2 upsampling followed by a 3x3 convolution (padding 1), the decoders' and the UNet's
# upsamplers, computed on the low-resolution map. Output pixel (2i + a, 2j + b) sees only two rows
# and two columns of the low-resolution input: for a = 0, kernel row 0 lands on input row i - 1 and
# rows 1 and 2 both on row i; for a = 1, rows 0 and 1 on row i and row 2 on row i + 1 (columns
# alike with b). So each of the four output phases is a 2x2 convolution of the input padded by 1,
# with kernel taps summed in those groups: 16 instead of 36 multiply-adds per input pixel and
# channel pair (2.25x fewer), and no 4x upsampled copy. The four phases share one unfolded input
# (each padded pixel's 2x2 window, 4x the input) and run as one matrix product with all four
# phase kernels side by side; phase (a, b) is then that product's window (i + a, j + b).
# Exact up to float rounding. Large maps go in bands of rows (CONV_UNFOLD_BUDGET_BYTES).
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))  # phase -> the kernel taps that share each of its two input rows


def _phase_kernels(weight: mx.array) -> mx.array:
    """[O, 3, 3, C] -> [(r, s, C), (a, b, O)]: phase (a, b)'s 2x2 kernel taps (r, s), as one matrix."""
    w = weight.astype(F32)
    phases = []
    for a in (0, 1):
        rows = mx.stack([sum(w[:, t] for t in taps) for taps in _PHASE_TAPS[a]], axis=1)
        for b in (0, 1):
            phases.append(mx.stack([sum(rows[:, :, t] for t in taps) for taps in _PHASE_TAPS[b]], axis=2))
    out_channels, in_channels = weight.shape[0], weight.shape[-1]
    return mx.concatenate(phases).reshape(4 * out_channels, 4 * in_channels).T.astype(weight.dtype)


def upsample2x_conv3x3(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """conv3x3(nearest_upsample_x2(x), padding 1) for channels-last x (N, H, W, C) and weights
    [O, 3, 3, C]: the (N, 2H, 2W, O) result, computed on x."""
    batch, height, width, channels = x.shape
    out_channels = weight.shape[0]
    kernels = _phase_kernels(weight)
    bias4 = None if bias is None else mx.tile(bias, 4)
    # natively: one 2x2 convolution over the input padded by 1, the phases as 4 x O output channels
    phase_weight = kernels.T.reshape(4 * out_channels, 1, 2, 2, channels)
    y = native.conv(x[:, None], phase_weight, bias4, ((0, 0), (1, 1), (1, 1)))
    if y is not None:
        return _interleave_phases(y[:, 0], height, width)
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    window_row_bytes = batch * (width + 1) * 4 * channels * x.itemsize
    rows = max(1, CONV_UNFOLD_BUDGET_BYTES // window_row_bytes - 1)
    bands = []
    for first in range(0, height, rows):
        n = min(rows, height - first)
        windows = mx.concatenate([padded[:, first + r:first + n + 1 + r, s:width + 1 + s]
                                  for r in (0, 1) for s in (0, 1)], axis=-1).reshape(-1, 4 * channels)
        y = windows @ kernels if bias4 is None else mx.addmm(bias4, windows, kernels)
        bands.append(_interleave_phases(y.reshape(batch, n + 1, width + 1, 4 * out_channels), n, width))
        if rows < height:
            mx.eval(bands[-1])
    return bands[0] if len(bands) == 1 else mx.concatenate(bands, axis=1)


def _interleave_phases(y: mx.array, height: int, width: int) -> mx.array:
    """(N, height + 1, width + 1, 4 O) phase outputs -> the (N, 2 height, 2 width, O) image: output
    pixel (2i + a, 2j + b) is phase (a, b) at window (i + a, j + b)."""
    batch, out_channels = y.shape[0], y.shape[-1] // 4
    y = y.reshape(batch, height + 1, width + 1, 2, 2, out_channels)
    phase = [[y[:, a:a + height, b:b + width, a, b] for b in (0, 1)] for a in (0, 1)]
    image = mx.stack([mx.stack(row, axis=3) for row in phase], axis=2)  # (N, height, 2, W, 2, O)
    return image.reshape(batch, 2 * height, 2 * width, out_channels)


class SiLU(nn.Module):
    """SiLU on channels-last feature maps (elementwise; the flag keeps the harness's layouts aligned)."""

    channels_last = True

    def __call__(self, x: mx.array) -> mx.array:
        return silu(x)


class Dropout(nn.Dropout):
    """Dropout on channels-last feature maps (identity at inference)."""

    channels_last = True


# ---------------------------------------------------------------------------------------------
# Attention
#
# MLX has no fused attention kernel on the CPU: mx.fast.scaled_dot_product_attention falls back
# to matmul, softmax, matmul over the whole (batch, heads, queries, keys) score tensor, and its
# softmax runs MLX's scalar exp (about 15-20 ns an element on x86, against well under 1 ns for a
# vectorised one). On the SD 1.5 UNet's 1024-token self-attention that made attention 5-10x
# slower than torch's SDPA. `attention` below instead
#   - works on blocks of query rows whose scores fit in the cache (SCORE_BLOCK_ELEMENTS), so the
#     scores never exist in full (peak memory: one block) and stay cache-resident between the
#     matmul, the exponential and the second matmul;
#   - computes exp with `_shifted_exp` (the fused `_exp` above, about 15x faster than mx.exp);
#   - gets each row's softmax denominator from the second matmul (a column of ones appended to
#     v), so the probabilities are never normalised in place: out = (e @ v) / (e @ 1);
#   - from KEYS_MAJOR_MIN_KEYS keys up, computes each block's scores keys-major, [keys, rows] =
#     k q^T, and the second product as e^T v (BLAS reads e transposed, no copy). The row maxima
#     are then a (1, rows) row that the exponential broadcasts along its outer axis; MLX's CPU
#     kernels broadcast a value along the innermost axis (the rows-major (rows, 1) maxima) about
#     2x slower (0.59 against 0.28 ms for a 256 x 1024 block), and OpenBLAS's threaded products
#     of the rows-major shapes (256 x 40 by 40 x 1024) stalled far more on a loaded 2-core
#     machine: the 1024-token self-attention of 16 x 8 heads took 3.2-5.3 s of CPU rows-major
#     against 0.6-1.1 s keys-major (0.41 against 0.37 s with one BLAS thread). With fewer keys
#     (temporal attention over 8 frames) the rows-major form is about 10% faster.
# Everything runs in float32 (half-precision inputs are upcast; the output has q's dtype).

SCORE_BLOCK_ELEMENTS = 256 * 1024  # float32 scores per block: 1 MB, one core's L2
KEYS_MAJOR_MIN_KEYS = 16


@mx.compile
def _shifted_exp(scores: mx.array, row_max: mx.array) -> mx.array:
    """exp(scores - row_max) as one fused kernel; -inf (a masked score) gives exactly 0."""
    return _exp(scores - row_max)


def _causal(queries: int, keys: int) -> mx.array:
    """Boolean [queries, keys]: query i sees keys up to i + (keys - queries) (mx.fast's alignment)."""
    return mx.arange(keys)[None, :] <= (mx.arange(queries) + (keys - queries))[:, None]


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | str | None = None) -> mx.array:
    """softmax(q k^T * scale + mask) v, as mx.fast.scaled_dot_product_attention takes it:
    q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] -> [B, H, Lq, Dv] in q's dtype.

    `mask`: None, "causal", a boolean array (True = attend) or an additive float array,
    broadcastable to [B, H, Lq, Lk]. A row that may attend to nothing gives NaN, as mx.fast does."""
    batch, heads, queries, dim = q.shape
    keys, dim_v = k.shape[2], v.shape[-1]
    dtype = q.dtype
    n = batch * heads
    keys_major = keys >= KEYS_MAJOR_MIN_KEYS
    q = (q.astype(mx.float32) * scale).reshape(n, queries, dim)
    q = q.swapaxes(1, 2) if keys_major else q  # [n, dim, queries] or [n, queries, dim]
    k = k.astype(mx.float32).reshape(n, keys, dim)
    k = k if keys_major else k.swapaxes(1, 2)  # [n, keys, dim] or [n, dim, keys]
    v1 = mx.concatenate([v.astype(mx.float32).reshape(n, keys, dim_v), mx.ones((n, keys, 1), mx.float32)], axis=-1)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask {mask!r}: only 'causal' is a named mask")
        mask = _causal(queries, keys)
    if mask is not None:
        mask = mx.broadcast_to(mask, (batch, heads, queries, keys)).reshape(n, queries, keys)
        mask = mask.swapaxes(1, 2) if keys_major else mask
    key_axis = 1 if keys_major else 2

    rows = max(1, min(queries, SCORE_BLOCK_ELEMENTS // keys))
    group = max(1, min(n, SCORE_BLOCK_ELEMENTS // (rows * keys)))  # heads per block when rows are few
    outs = []
    for h in range(0, n, group):
        hs = slice(h, h + group)
        parts = []
        for r in range(0, queries, rows):
            rs = slice(r, r + rows)
            scores = k[hs] @ q[hs, :, rs] if keys_major else q[hs, rs] @ k[hs]
            if mask is not None:
                block = mask[hs, :, rs] if keys_major else mask[hs, rs]
                scores = mx.where(block, scores, -mx.inf) if block.dtype == mx.bool_ else scores + block
            e = _shifted_exp(scores, mx.max(scores, axis=key_axis, keepdims=True))
            weighted = (e.swapaxes(1, 2) if keys_major else e) @ v1[hs]
            parts.append(weighted[..., :dim_v] / weighted[..., dim_v:])
        outs.append(parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
    return out.reshape(batch, heads, queries, dim_v).astype(dtype)


def attend_heads(q: mx.array, k: mx.array, v: mx.array, heads: int, scale: float,
                 mask: mx.array | str | None = None) -> mx.array:
    """Multi-head `attention` on projections with the heads side by side in the last axis:
    q [B, Lq, heads * D], k [B, Lk, heads * D], v [B, Lk, heads * Dv] -> [B, Lq, heads * Dv]."""
    def split(x: mx.array) -> mx.array:
        return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3)

    out = attention(split(q), split(k), split(v), scale, mask)
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)
