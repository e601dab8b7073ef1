"""vidport.runtime.native (our C++ MLX primitives) against torch: the convolution maps MLX's
channels-last arrays, asymmetric padding and the bias onto oneDNN's descriptors; SiLU, group norm
and the Wan VAE's RMS norm are our own vectorised loops split across threads. Each is checked
against the torch function diffusers calls (F.conv2d / F.conv3d, F.silu, F.group_norm, WanRMS_norm's
F.normalize), on the cases the kernels treat specially. tests/test_layers.py runs the layers that
route here both ways, native and MLX."""
from __future__ import annotations

import numpy as np
import pytest

import vidport.runtime  # noqa: F401  (before mlx: the fast BLAS)
from vidport.runtime import native
from vidport.runtime.layers import Conv2d
from vidport.runtime.wan_vae_conv import WanCausalConv3d
from vidport.runtime.wan_vae_layers import WanRMSNorm
import mlx.core as mx
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(native.load() is None, reason="the native extension is not built here")


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def torch_conv3d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, padding) -> np.ndarray:
    """F.conv3d on our channels-last layouts, zero padding given as (before, after) per axis."""
    xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3)
    flat = [p for pair in reversed(padding) for p in pair]  # F.pad wants the last axis first
    xt = F.pad(xt, flat)
    wt = torch.from_numpy(weight).permute(0, 4, 1, 2, 3)
    out = F.conv3d(xt, wt, None if bias is None else torch.from_numpy(bias))
    return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("x_shape, kernel, out_channels, padding, bias", [
    ((2, 1, 9, 7, 5), (1, 3, 3), 6, ((0, 0), (1, 1), (1, 1)), True),    # 2-D, odd sides, bias
    ((1, 1, 1, 1, 3), (1, 3, 3), 2, ((0, 0), (1, 1), (1, 1)), False),   # one pixel: all but the centre tap is padding
    ((2, 1, 8, 8, 4), (1, 1, 1), 3, ((0, 0), (0, 0), (0, 0)), True),    # pointwise: no unfolding
    ((1, 1, 6, 5, 3), (1, 3, 3), 4, ((0, 0), (0, 0), (0, 0)), False),   # no padding: smaller output
    ((1, 4, 6, 5, 3), (3, 3, 3), 4, ((2, 0), (1, 1), (1, 1)), True),    # Wan VAE: time padded on the past side only
    ((2, 3, 5, 4, 2), (3, 1, 1), 3, ((1, 1), (0, 0), (0, 0)), False),   # time only
])
def test_conv_matches_torch(x_shape, kernel, out_channels, padding, bias):
    rng = np.random.default_rng(3)
    x, weight = rand(rng, *x_shape), rand(rng, out_channels, *kernel, x_shape[-1])
    b = rand(rng, out_channels) if bias else None
    ours = native.conv(mx.array(x), mx.array(weight), None if b is None else mx.array(b), padding)
    theirs = torch_conv3d(x, weight, b, padding)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.array(ours), theirs, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_counts_give_the_same_result(threads):
    """One thread (two MLX streams at once), and more threads than cores."""
    module = native.load()
    rng = np.random.default_rng(5)
    x, weight, b = rand(rng, 2, 1, 13, 11, 8), rand(rng, 7, 1, 3, 3, 8), rand(rng, 7)
    padding = ((0, 0), (1, 1), (1, 1))
    before = module.threads()
    with native.threads(threads):
        assert module.threads() == threads
        ours = np.array(native.conv(mx.array(x), mx.array(weight), mx.array(b), padding))
    assert module.threads() == before
    np.testing.assert_allclose(ours, torch_conv3d(x, weight, b, padding), atol=3e-5, rtol=1e-5)


def test_strided_views_are_made_contiguous():
    rng = np.random.default_rng(6)
    x = rand(rng, 1, 1, 8, 10, 6)
    weight = rand(rng, 4, 1, 3, 3, 6)
    view = mx.array(x).transpose(0, 1, 3, 2, 4)  # not row-contiguous
    ours = native.conv(view, mx.array(weight), None, ((0, 0), (1, 1), (1, 1)))
    np.testing.assert_allclose(np.array(ours), torch_conv3d(x.transpose(0, 1, 3, 2, 4), weight, None,
                                                            ((0, 0), (1, 1), (1, 1))), atol=3e-5, rtol=1e-5)


def test_other_dtypes_are_left_to_mlx():
    x = mx.ones((1, 1, 4, 4, 2), dtype=mx.bfloat16)
    assert native.conv(x, mx.ones((2, 1, 3, 3, 2), dtype=mx.bfloat16), None, ((0, 0),) * 3) is None


@pytest.mark.parametrize("x_shape, w_shape, padding, message", [
    ((1, 1, 4, 4, 2), (2, 1, 3, 3, 3), ((0, 0),) * 3, "weight O x kt x kh x kw x C"),
    ((1, 4, 4, 2), (2, 3, 3, 2), ((0, 0),) * 3, "input N x T x H x W x C"),
    ((1, 1, 2, 2, 2), (2, 1, 3, 3, 2), ((0, 0),) * 3, "kernel larger than the padded input"),
    ((1, 1, 4, 4, 2), (2, 1, 3, 3, 2), ((0, 0), (-1, 0), (0, 0)), "negative padding"),
])
def test_bad_shapes_raise_clear_errors(x_shape, w_shape, padding, message):
    with pytest.raises(ValueError, match=message):
        native.conv(mx.zeros(x_shape), mx.zeros(w_shape), None, padding)


def test_conv2d_layer_matches_torch():
    """layers.Conv2d (the UNet's and SD VAE's) routes stride-1 float32 convolutions here."""
    rng = np.random.default_rng(8)
    conv = Conv2d(6, 5, kernel_size=3, padding=1)
    conv.weight, conv.bias = mx.array(rand(rng, 5, 3, 3, 6)), mx.array(rand(rng, 5))
    x = rand(rng, 2, 9, 10, 6)
    theirs = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(np.array(conv.weight)).permute(0, 3, 1, 2),
                      torch.from_numpy(np.array(conv.bias)), padding=1).permute(0, 2, 3, 1)
    np.testing.assert_allclose(np.array(conv(mx.array(x))), theirs.numpy(), atol=3e-5, rtol=1e-5)


def test_wan_causal_conv3d_matches_torch():
    """The Wan VAE's causal convolution (time padded by 2 on the past side), with a cached frame."""
    rng = np.random.default_rng(10)
    conv = WanCausalConv3d(4, 3, kernel_size=3, padding=1)
    conv.weight, conv.bias = mx.array(rand(rng, 3, 3, 3, 3, 4)), mx.array(rand(rng, 3))
    x, cache = rand(rng, 1, 3, 6, 5, 4), rand(rng, 1, 1, 6, 5, 4)
    ours = conv(mx.array(x), mx.array(cache))
    theirs = torch_conv3d(np.concatenate([cache, x], axis=1), np.array(conv.weight), np.array(conv.bias),
                          ((1, 0), (1, 1), (1, 1)))
    np.testing.assert_allclose(np.array(ours), theirs, atol=3e-5, rtol=1e-5)


def test_two_streams_convolving_at_once_match_torch(monkeypatch):
    """Two MLX streams (runtime.cpu_threads) run the same oneDNN primitive at the same time; each
    call needs its own scratch memory (oneDNN's shared default mixed the two calls' results)."""
    from vidport.runtime import cpu_threads
    from vidport.runtime.cpu_threads import map_parts

    monkeypatch.setattr(cpu_threads, "workers_for", lambda parts: 2)  # with native kernels it picks 1

    rng = np.random.default_rng(11)
    weight, b = rand(rng, 16, 1, 3, 3, 16), rand(rng, 16)
    xs = [rand(rng, 1, 1, 24, 24, 16) for _ in range(8)]
    padding = ((0, 0), (1, 1), (1, 1))
    w, bias = mx.array(weight), mx.array(b)
    outs = map_parts(lambda x: native.conv(mx.array(x), w, bias, padding), xs, (w, bias))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(np.array(out), torch_conv3d(x, weight, b, padding), atol=3e-5, rtol=1e-5)


EXTREMES = np.array([-1e4, -200.0, -88.0, -87.4, -87.2, -30.0, -5.0, -1e-3, -0.0, 0.0, 1e-7, 1e-3, 2.5, 30.0,
                     88.0, 89.0, 200.0, 1e4, np.inf, -np.inf, np.nan], dtype=np.float32)


@pytest.mark.parametrize("size", [1, 37, 200_003])  # one thread's share, and several with a ragged end
def test_silu_matches_torch(size):
    """The polynomial exponential near float's underflow (-87.3), infinities (silu(-inf) is nan, as in
    torch) and nan; one ulp-scale error elsewhere."""
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.standard_normal(size).astype(np.float32) * 6, EXTREMES])
    ours = np.array(native.silu(mx.array(x)))
    theirs = F.silu(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    defined = ~np.isnan(theirs)
    np.testing.assert_allclose(ours[defined], theirs[defined], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, groups, threads", [
    ((2, 64, 48, 64), 32, 2),    # many positions: sums in several parts and blocks of rows
    ((1, 3, 4, 5, 40), 8, 1),    # video: statistics over frames and pixels, one thread
    ((3, 1, 1, 12), 4, 3),       # one position, more threads than positions
])
def test_group_norm_matches_torch(shape, groups, threads):
    rng = np.random.default_rng(13)
    channels = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32) * 4 + 50  # a large mean: the variance must not cancel
    weight, bias = rand(rng, channels), rand(rng, channels)
    with native.threads(threads):
        ours = np.array(native.group_norm(mx.array(x), mx.array(weight), mx.array(bias), groups, 1e-6))
        plain = np.array(native.group_norm(mx.array(x), None, None, groups, 1e-6))
    # F.group_norm in float64: in float32, torch's own result is off by up to 7e-4 at this mean
    channels_first = torch.from_numpy(x).double().movedim(-1, 1)
    theirs = F.group_norm(channels_first, groups, torch.from_numpy(weight).double(), torch.from_numpy(bias).double(),
                          eps=1e-6)
    np.testing.assert_allclose(ours, theirs.movedim(1, -1).numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(plain, F.group_norm(channels_first, groups, eps=1e-6).movedim(1, -1).numpy(),
                               atol=1e-5, rtol=1e-5)


def test_wan_rms_norm_matches_diffusers_formula():
    """WanRMSNorm routes here: F.normalize over channels * sqrt(C) * gamma (diffusers' WanRMS_norm),
    including an all-zero pixel (the 1e-12 floor)."""
    rng = np.random.default_rng(14)
    norm = WanRMSNorm(40)
    norm.gamma = mx.array(rand(rng, 40))
    x = rand(rng, 1, 2, 7, 9, 40) * 3
    x[0, 0, 0, 0] = 0.0
    theirs = F.normalize(torch.from_numpy(x), dim=-1) * 40**0.5 * torch.from_numpy(np.array(norm.gamma))
    np.testing.assert_allclose(np.array(norm(mx.array(x))), theirs.numpy(), atol=2e-6, rtol=1e-5)


def test_norm_arguments_are_checked():
    with pytest.raises(ValueError, match="divisible by groups"):
        native.group_norm(mx.zeros((1, 4, 6)), None, None, 4, 1e-6)
    with pytest.raises(ValueError, match="both weight and bias"):
        native.group_norm(mx.zeros((1, 4, 8)), mx.ones(8), None, 4, 1e-6)
    with pytest.raises(ValueError, match="one value per channel"):
        native.rms_norm(mx.zeros((2, 8)), mx.ones(4))


def test_large_weights_over_few_pixels_are_left_to_mlx():
    """oneDNN reorders the weights on every call: over few output pixels MLX's product is faster."""
    few = native.conv(mx.zeros((1, 1, 4, 4, 2048)), mx.zeros((256, 1, 3, 3, 2048)), None, ((0, 0), (1, 1), (1, 1)))
    many = native.conv(mx.zeros((1, 1, 64, 64, 64)), mx.zeros((64, 1, 3, 3, 64)), None, ((0, 0), (1, 1), (1, 1)))
    assert few is None and many is not None
