"""runtime.layers against torch: the fast activations, the blocked attention, the in-place group
norm and the banded convolution are our own code paths, so each is checked on its own against
the torch function diffusers calls, including the cases the fast paths treat specially (extreme
inputs, masks, half precision, several row blocks and head groups, bands of images and of rows)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import vidport.runtime  # noqa: F401  (before mlx: the fast BLAS)
import vidport.runtime.layers as layers
import mlx.core as mx
import torch
import torch.nn.functional as F


def as_torch(x: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(x.astype(mx.float32)))


def close(ours: mx.array, theirs: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), theirs.float().numpy(), atol=atol, rtol=rtol)


EXTREMES = np.array([-1e4, -200.0, -88.0, -87.0, -30.0, -5.0, -1e-3, 0.0, 1e-7, 1e-3, 2.5, 30.0, 88.0, 89.0, 200.0,
                     1e4, np.inf, -np.inf], dtype=np.float32)


def sample_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.standard_normal(20000).astype(np.float32) * 4, EXTREMES])


@pytest.fixture(params=["native", "mlx"])
def kernels(request, monkeypatch) -> str:
    """Run a fast path both ways: with vidport's native kernels (runtime.native, float32 on the CPU)
    and with MLX's own operations (other dtypes and devices, or no extension)."""
    if request.param == "mlx":
        for name in ("conv", "silu", "group_norm", "rms_norm"):
            monkeypatch.setattr(layers.native, name, lambda *args: None)
    elif layers.native.load() is None:
        pytest.skip("the native extension is not built here")
    return request.param


@pytest.mark.parametrize("name, reference, atol", [
    ("silu", F.silu, 2e-6),
    ("sigmoid", torch.sigmoid, 1e-6),
    ("gelu", F.gelu, 1e-6),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), 2e-6),
])
def test_activation_matches_torch(name, reference, atol, kernels):
    x = sample_values()
    ours = np.array(getattr(layers, name)(mx.array(x)))
    theirs = reference(torch.from_numpy(x)).numpy()
    defined = ~np.isnan(theirs)  # torch's exact GELU gives NaN at +-inf; ours the limit
    np.testing.assert_allclose(ours[defined], theirs[defined], atol=atol, rtol=1e-5)
    assert np.isnan(np.array(getattr(layers, name)(mx.array([np.nan], dtype=mx.float32)))).all()


def test_geglu_and_half_precision_match_torch():
    rng = np.random.default_rng(1)
    hidden, gate = (rng.standard_normal((64, 96)).astype(np.float32) * 3 for _ in range(2))
    close(layers.geglu(mx.array(hidden), mx.array(gate)), torch.from_numpy(hidden) * F.gelu(torch.from_numpy(gate)),
          atol=2e-5, rtol=1e-5)  # |hidden| up to ~12 times GELU's 1e-6
    half = layers.silu(mx.array(hidden).astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16
    close(half, F.silu(torch.from_numpy(hidden).bfloat16().float()).bfloat16(), atol=0.0, rtol=8e-3)


def sdpa(q, k, v, scale, mask=None):
    if isinstance(mask, str):  # mx.fast's causal alignment: the last query sees every key (torch's lower-right)
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(as_torch(q), as_torch(k), as_torch(v), scale=scale,
                                              attn_mask=causal_lower_right(q.shape[2], k.shape[2]))
    return F.scaled_dot_product_attention(as_torch(q), as_torch(k), as_torch(v), scale=scale,
                                          attn_mask=None if mask is None else torch.from_numpy(np.array(mask)))


@pytest.mark.parametrize("shape", [
    (2, 3, 5, 7, 16),      # tiny: one block
    (1, 2, 600, 600, 8),   # queries split into row blocks (600 keys -> 436 rows a block)
    (4, 8, 8, 8, 32),      # many heads grouped into one block (temporal attention's shape)
    (2, 4, 40, 77, 24),    # cross-attention, keys != queries
])
def test_attention_matches_torch_sdpa(shape, monkeypatch):
    monkeypatch.setattr(layers, "SCORE_BLOCK_ELEMENTS", 256 * 1024 if shape[2] < 100 else 600 * 436)
    batch, heads, queries, keys, dim = shape
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.standard_normal((batch, heads, n, dim)).astype(np.float32) * 2)
               for n in (queries, keys, keys))
    close(layers.attention(q, k, v, dim**-0.5), sdpa(q, k, v, dim**-0.5), atol=1e-5, rtol=1e-5)


def test_attention_row_blocks_and_head_groups_are_both_exercised(monkeypatch):
    """A block budget smaller than one head's scores: rows split, then heads one at a time."""
    monkeypatch.setattr(layers, "SCORE_BLOCK_ELEMENTS", 3 * 50)
    rng = np.random.default_rng(3)
    q, k, v = (mx.array(rng.standard_normal((2, 3, 20, 8)).astype(np.float32)) for _ in range(3))
    k, v = mx.concatenate([k, k[:, :, :10] * 0.5], axis=2), mx.concatenate([v, v[:, :, :10]], axis=2)  # 30 keys
    close(layers.attention(q, k, v, 0.3), sdpa(q, k, v, 0.3), atol=2e-6, rtol=1e-5)


def force_layout(monkeypatch, keys_major: bool) -> None:
    """Scores keys-major ([keys, rows]) or rows-major, whatever the number of keys."""
    monkeypatch.setattr(layers, "KEYS_MAJOR_MIN_KEYS", 1 if keys_major else 10**9)


@pytest.mark.parametrize("keys_major", [True, False])
@pytest.mark.parametrize("kind", ["causal", "bool", "additive"])
@pytest.mark.parametrize("queries, keys", [(6, 6), (9, 21)])
def test_attention_masks_match_torch(kind, keys_major, queries, keys, monkeypatch):
    force_layout(monkeypatch, keys_major)
    monkeypatch.setattr(layers, "SCORE_BLOCK_ELEMENTS", 4 * keys)  # several row blocks: the mask sliced per block
    rng = np.random.default_rng(4)
    q = mx.array(rng.standard_normal((2, 2, queries, 16)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((2, 2, keys, 16)).astype(np.float32)) for _ in range(2))
    if kind == "causal":
        mask = "causal"
    elif kind == "bool":
        allowed = rng.random((2, 1, queries, keys)) > 0.4
        allowed[..., 0] = True  # every row sees something
        mask = mx.array(allowed)
    else:
        mask = mx.array(rng.standard_normal((1, 2, queries, keys)).astype(np.float32) * 3)
    close(layers.attention(q, k, v, 0.25, mask), sdpa(q, k, v, 0.25, mask), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("keys_major", [True, False])
@pytest.mark.parametrize("shape", [
    (3, 5, 8, 8, 40),      # temporal attention's shape (8 frames): rows-major by default
    (2, 3, 17, 16, 8),     # the first key count laid out keys-major by default
    (1, 2, 33, 129, 24),   # odd sizes, several row blocks and one head a block
])
def test_attention_layouts_both_match_torch(shape, keys_major, monkeypatch):
    force_layout(monkeypatch, keys_major)
    monkeypatch.setattr(layers, "SCORE_BLOCK_ELEMENTS", 10 * shape[3])
    batch, heads, queries, keys, dim = shape
    rng = np.random.default_rng(9)
    q, k, v = (mx.array(rng.standard_normal((batch, heads, n, dim)).astype(np.float32) * 2)
               for n in (queries, keys, keys))
    close(layers.attention(q, k, v, dim**-0.5), sdpa(q, k, v, dim**-0.5), atol=1e-5, rtol=1e-5)


def test_attention_keeps_half_precision_and_rejects_unknown_named_mask():
    rng = np.random.default_rng(5)
    q, k, v = (mx.array(rng.standard_normal((1, 2, 9, 16)).astype(np.float32)).astype(mx.bfloat16) for _ in range(3))
    out = layers.attention(q, k, v, 0.25)
    assert out.dtype == mx.bfloat16
    close(out, sdpa(q, k, v, 0.25), atol=1e-2)
    with pytest.raises(ValueError, match="causal"):
        layers.attention(q, k, v, 0.25, mask="sliding")


@pytest.mark.parametrize("shape, groups, affine", [
    ((3, 7, 9, 64), 32, True),
    ((3, 7, 9, 12), 4, False),
    ((3, 7, 9, 5), 1, True),         # one group, odd channel count
    ((2, 33, 17, 96), 32, True),     # odd map sides
    ((2, 3, 5, 4, 24), 8, True),     # (N, F, H, W, C): statistics over frames and pixels together
    ((1, 1, 1, 6), 3, True),         # one position: each group's statistics over its channels alone
    ((4, 2, 320), 32, "none"),       # no weight and bias at all
])
def test_group_norm_matches_torch(shape, groups, affine, kernels):
    rng = np.random.default_rng(6)
    channels = shape[-1]
    x = rng.standard_normal(shape).astype(np.float32) * 5 + 3  # offset: a one-pass variance would drift
    norm = layers.GroupNorm(groups, channels, eps=1e-6)
    weight, bias = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    if affine is True:
        weight, bias = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    if affine == "none":
        del norm.weight, norm.bias
    else:
        norm.weight, norm.bias = mx.array(weight), mx.array(bias)
    channels_first = torch.from_numpy(x).movedim(-1, 1)
    theirs = F.group_norm(channels_first, groups, torch.from_numpy(weight), torch.from_numpy(bias), eps=1e-6)
    close(norm(mx.array(x)), theirs.movedim(1, -1), atol=1e-5)


def test_group_norm_keeps_half_precision():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 6, 5, 32)).astype(np.float32) * 2 - 1
    norm = layers.GroupNorm(8, 32)
    norm.weight = mx.array(rng.standard_normal(32).astype(np.float32)).astype(mx.bfloat16)
    norm.bias = mx.array(rng.standard_normal(32).astype(np.float32)).astype(mx.bfloat16)
    ours = norm(mx.array(x).astype(mx.bfloat16))
    assert ours.dtype == mx.bfloat16
    theirs = F.group_norm(torch.from_numpy(x).bfloat16().float().permute(0, 3, 1, 2), 8, as_torch(norm.weight),
                          as_torch(norm.bias)).permute(0, 2, 3, 1)
    close(ours, theirs.bfloat16(), atol=0.0, rtol=1e-2)  # both round once to bfloat16: within one bf16 ulp


@pytest.mark.parametrize("budget_rows, stride, padding, batch", [
    (None, 1, 1, 3),  # under budget: one mx.conv2d
    (20, 1, 1, 3),    # bands of whole images (two images a band)
    (3, 1, 1, 2),     # one image is too large: bands of output rows
    (3, 2, 1, 2),     # rows, strided (the downsampler)
    (4, 1, 0, 1),     # rows, no padding
])
def test_banded_conv2d_matches_torch(budget_rows, stride, padding, batch, monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((batch, 10, 11, 6)).astype(np.float32)
    weight = rng.standard_normal((5, 3, 3, 6)).astype(np.float32)
    out_w = (11 + 2 * padding - 3) // stride + 1
    if budget_rows is not None:  # bytes of unfolded input for that many output rows
        monkeypatch.setattr(layers, "CONV_UNFOLD_BUDGET_BYTES", budget_rows * out_w * 9 * 6 * 4)
    monkeypatch.setattr(layers.native, "conv", lambda *args: None)  # MLX's path (tests/test_native.py: the native one)
    ours = layers.conv2d_banded(mx.array(x), mx.array(weight), stride, padding)
    theirs = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(weight).permute(0, 3, 1, 2),
                      stride=stride, padding=padding).permute(0, 2, 3, 1)
    assert ours.shape == tuple(theirs.shape)
    close(ours, theirs, atol=2e-5)


@pytest.mark.parametrize("shape, out_channels, budget_rows, bias", [
    ((2, 5, 7, 6), 4, None, True),   # odd sides, bias
    ((1, 1, 1, 3), 2, None, False),  # one pixel: every tap but the centre falls on the padding
    ((2, 6, 4, 8), 8, 2, True),      # in bands of rows
    ((1, 5, 3, 4), 6, 2, False),     # in bands of rows, the last one shorter
])
def test_upsample2x_conv3x3_matches_torch(shape, out_channels, budget_rows, bias, kernels, monkeypatch):
    """The four-phase form equals F.interpolate(nearest, x2) then F.conv2d(padding=1), diffusers' upsampler:
    as one native 2x2 convolution (runtime.native), and as MLX's windows and matrix product."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape).astype(np.float32)
    weight = rng.standard_normal((out_channels, 3, 3, shape[-1])).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32) if bias else None
    if budget_rows is not None:  # bytes of the 2x2 windows of that many input rows, and the one below them
        monkeypatch.setattr(layers, "CONV_UNFOLD_BUDGET_BYTES", (budget_rows + 1) * shape[0] * (shape[2] + 1) * 4 * shape[-1] * 4)
    ours = layers.upsample2x_conv3x3(mx.array(x), mx.array(weight), None if b is None else mx.array(b))
    upsampled = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2.0, mode="nearest")
    theirs = F.conv2d(upsampled, torch.from_numpy(weight).permute(0, 3, 1, 2),
                      None if b is None else torch.from_numpy(b), padding=1).permute(0, 2, 3, 1)
    assert ours.shape == tuple(theirs.shape)
    close(ours, theirs, atol=3e-5)


def test_upsample2x_conv3x3_keeps_half_precision():
    rng = np.random.default_rng(10)
    x = mx.array(rng.standard_normal((1, 4, 3, 8)).astype(np.float32)).astype(mx.bfloat16)
    weight = mx.array(rng.standard_normal((8, 3, 3, 8)).astype(np.float32) * 0.2).astype(mx.bfloat16)
    ours = layers.upsample2x_conv3x3(x, weight)
    assert ours.dtype == mx.bfloat16
    upsampled = F.interpolate(as_torch(x).permute(0, 3, 1, 2), scale_factor=2.0, mode="nearest")
    theirs = F.conv2d(upsampled, as_torch(weight).permute(0, 3, 1, 2), padding=1).permute(0, 2, 3, 1)
    close(ours, theirs, atol=0.05, rtol=2e-2)  # bfloat16 products, and the summed taps rounded once to bfloat16


@pytest.mark.parametrize("user_value", [None, "20"])
def test_configure_cpu_leaves_the_blas_thread_timeout_as_the_user_set_it(user_value, monkeypatch):
    """The short OpenBLAS spin applies to the runtime's own OpenBLAS only, while it loads."""
    from vidport.runtime import configure_cpu

    if user_value is None:
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", user_value)
    configure_cpu(malloc=False)
    assert os.environ.get("OPENBLAS_THREAD_TIMEOUT") == user_value
