"""vidport.runtime.native (our C++ MLX primitive around oneDNN) against torch: the primitive maps
MLX's channels-last arrays, asymmetric padding and the bias onto oneDNN's descriptors, so each of
those is checked against F.conv2d / F.conv3d, and the layers that route to it against the torch
functions diffusers calls."""
from __future__ import annotations

import numpy as np
import pytest

import vidport.runtime  # noqa: F401  (before mlx: the fast BLAS)
from vidport.runtime import native
from vidport.runtime.layers import Conv2d
from vidport.runtime.wan_vae_conv import WanCausalConv3d
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
    before = module.conv_threads()
    with native.conv_threads(threads):
        assert module.conv_threads() == threads
        ours = np.array(native.conv(mx.array(x), mx.array(weight), mx.array(b), padding))
    assert module.conv_threads() == before
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


def test_two_streams_convolving_at_once_match_torch():
    """Two MLX streams (runtime.cpu_threads) run the same oneDNN primitive at the same time; each
    call needs its own scratch memory (oneDNN's shared default mixed the two calls' results)."""
    from vidport.runtime.cpu_threads import map_parts

    rng = np.random.default_rng(11)
    weight, b = rand(rng, 16, 1, 3, 3, 16), rand(rng, 16)
    xs = [rand(rng, 1, 1, 24, 24, 16) for _ in range(8)]
    padding = ((0, 0), (1, 1), (1, 1))
    w, bias = mx.array(weight), mx.array(b)
    outs = map_parts(lambda x: native.conv(mx.array(x), w, bias, padding), xs, (w, bias))
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(np.array(out), torch_conv3d(x, weight, b, padding), atol=3e-5, rtol=1e-5)
