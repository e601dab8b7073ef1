"""The causal (Self-Forcing) Wan DiT on MLX against its reference, diffusers' WanTransformer3DModel
run over the whole sequence under a block-causal attention mask with per-token timesteps.

Each block of latent frames is run as the official inference runs it, on fixed inputs (no
sampler): two denoising passes at the block's per-frame timesteps, then the clean pass at
timestep 0 that writes the KV cache. Every pass must equal the reference's forward over
[the earlier blocks' clean latents at 0 | the block] in float32 (PCC >= 0.99999 and max abs
<= 1e-4 x max(1, RMS)); simplifying the mask, the RoPE frame offset, the per-frame timesteps or
which pass fills the cache must break it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from vidport.golden.metrics import compare, passes, threshold_for
from fixtures.wan_dit import random_wan_transformer, wan_config, write_diffusers

FLOAT32 = threshold_for("float32")
HEIGHT, WIDTH = 4, 6  # 2 x 3 patches a frame: a non-square grid
DENOISE = (937.5, 687.5)  # two denoising passes a block; each frame of a block a little apart


@dataclass
class Case:
    """Fixed inputs, channels-first [1, C, F, H, W] as diffusers takes them."""

    blocks: list[int]
    noisy: list[list[np.ndarray]]  # per block, per denoising pass
    timesteps: list[list[np.ndarray]]  # per block, per denoising pass: [1, F]
    clean: list[np.ndarray]  # per block: what its clean pass writes
    context: np.ndarray


def make_case(blocks: list[int], seed: int = 0, channels: int = 16) -> Case:
    rng = np.random.default_rng(seed)
    latents = lambda f: rng.standard_normal((1, channels, f, HEIGHT, WIDTH), dtype=np.float32)  # noqa: E731
    return Case(blocks, [[latents(f) for _ in DENOISE] for f in blocks],
                [[np.array([[t - 20.0 * i for i in range(f)]], np.float32) for t in DENOISE] for f in blocks],
                [latents(f) for f in blocks], rng.standard_normal((1, 512, 32), dtype=np.float32))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Ours from a converted Diffusers folder; the reference: diffusers loading that folder."""
    from diffusers import WanTransformer3DModel

    from vidport.converter.convert import convert, plan_conversion
    from vidport.runtime.causal_wan import CausalWanTransformer

    root = tmp_path_factory.mktemp("causal-wan")
    write_diffusers(root / "transformer", "t2v", seed=21)
    convert(plan_conversion(root / "transformer", "mlx"), root / "mlx")
    return CausalWanTransformer.load(root / "mlx"), WanTransformer3DModel.from_pretrained(root / "transformer").eval()


def _channels_last(x: np.ndarray):
    import mlx.core as mx

    return mx.array(x.transpose(0, 2, 3, 4, 1))


def chunked(model, case: Case, window: int | None = None, sinks: int = 0, written_by: str = "clean",
            image: np.ndarray | None = None):
    """Our passes block by block: per block [denoise..., clean] outputs, channels-first. Only a
    writing pass changes the cache, so the last denoising pass may run after the clean one:
    `written_by="noisy"` (a mutation) fills the cache from it instead."""
    import mlx.core as mx

    from vidport.runtime.causal_wan_cache import CausalWanCache

    cache, outputs = CausalWanCache(window, sinks), []
    context, image_context = mx.array(case.context), None if image is None else mx.array(image)
    for b, frames in enumerate(case.blocks):
        start = cache.frames

        def run(x, t, write=False):
            return model(_channels_last(x), t, context, cache, start, image_context=image_context, write=write)

        denoised = [run(x, t) for x, t in zip(case.noisy[b][:-1], case.timesteps[b][:-1])]
        if written_by == "clean":  # as the official inference does
            last = run(case.noisy[b][-1], case.timesteps[b][-1])
            clean = run(case.clean[b], np.zeros((1, frames), np.float32), write=True)
        else:
            clean = run(case.clean[b], np.zeros((1, frames), np.float32))
            last = run(case.noisy[b][-1], case.timesteps[b][-1], write=True)
        outputs.append([np.array(x).transpose(0, 4, 1, 2, 3) for x in [*denoised, last, clean]])
    return outputs, cache


def referenced(reference, case: Case, **flags):
    """The reference's outputs for the same passes (reference.causal_wan.cached_pass)."""
    from vidport.reference.causal_wan import cached_pass

    outputs, context = [], torch.from_numpy(case.context)
    for b in range(len(case.blocks)):
        before = torch.from_numpy(np.concatenate(case.clean[:b], axis=2)) if b else None
        inputs = [*zip(case.noisy[b], case.timesteps[b]), (case.clean[b], np.zeros((1, case.blocks[b]), np.float32))]
        outputs.append([cached_pass(reference, before, torch.from_numpy(x), torch.from_numpy(t), context,
                                    case.blocks[: b + 1], **flags).numpy() for x, t in inputs])
    return outputs


def scores(got, expected) -> list[list[dict]]:
    return [[compare(e, g) for g, e in zip(gb, eb)] for gb, eb in zip(got, expected)]


def all_pass(found: list[list[dict]]) -> bool:
    return all(passes(m, FLOAT32) for block in found for m in block)


BLOCKS = {"1 block": [3], "2 blocks": [3, 3], "4 blocks": [3, 3, 3, 3], "i2v first frame": [1, 3, 3]}


@pytest.mark.parametrize("blocks", list(BLOCKS.values()), ids=list(BLOCKS))
def test_chunked_equals_block_causal_reference(models, blocks, record_property):
    ours, reference = models
    case = make_case(blocks, seed=len(blocks))
    got, cache = chunked(ours, case)
    found = scores(got, referenced(reference, case))
    record_property("pcc", [[round(m["pcc"], 9) for m in block] for block in found])
    record_property("max_abs", [[m["max_abs"] for m in block] for block in found])
    assert all_pass(found), found
    assert cache.frames == sum(blocks) and cache.held_frames == list(range(sum(blocks)))
    assert cache.nbytes == 2 * (2 * sum(blocks) * 6 + 2 * 512) * 64 * 4  # layers x (self k, v + cross k, v) x width


@pytest.fixture(scope="module")
def three_blocks(models):
    """Ours on [1, 3, 3] once, for the mutations."""
    case = make_case([1, 3, 3], seed=7)
    return case, chunked(models[0], case)[0]


def test_full_mask_fails(models, three_blocks):
    case, got = three_blocks
    assert all_pass(scores(got, referenced(models[1], case)))
    found = scores(got, referenced(models[1], case, causal=False))
    assert all(passes(m, FLOAT32) for m in found[0])  # nothing comes after the first block's frames
    assert all(m["pcc"] < FLOAT32.min_pcc for block in found[1:] for m in block)  # every later pass, by PCC alone


def test_one_timestep_for_all_frames_fails(models, three_blocks):
    case, got = three_blocks
    found = scores(got, referenced(models[1], case, per_frame_timesteps=False))
    # every denoising pass after the first (one-frame) block; the clean passes are all at 0 anyway
    assert all(m["pcc"] < 0.99 for block in found[1:] for m in block[:-1])


def test_rope_without_frame_offset_fails(models, three_blocks, monkeypatch):
    from vidport.runtime import causal_wan

    case, _ = three_blocks
    expected = referenced(models[1], case)
    original = causal_wan.block_rotary
    monkeypatch.setattr(causal_wan, "block_rotary", lambda rope, grid, start: original(rope, grid, 0))
    found = scores(chunked(models[0], case)[0], expected)
    assert all(passes(m, FLOAT32) for m in found[0])  # the first block starts at frame 0 anyway
    assert all(not passes(m, FLOAT32) for block in found[1:] for m in block)


def test_cache_from_a_noisy_pass_fails(models, three_blocks):
    """Later blocks must see the clean pass's keys and values, not a denoising pass's."""
    case, _ = three_blocks
    found = scores(chunked(models[0], case, written_by="noisy")[0], referenced(models[1], case))
    assert all(passes(m, FLOAT32) for m in found[0])
    assert all(not passes(m, FLOAT32) for block in found[1:] for m in block)


def test_clip_image_context_i2v_checkpoint(tmp_path):
    """A checkpoint with image cross-attention (Wan 2.1 I2V): the CLIP tokens' keys and values are
    cached with the text's, and every pass still equals the reference."""
    from diffusers import WanTransformer3DModel

    from vidport.converter.convert import convert, plan_conversion
    from vidport.runtime.causal_wan import CausalWanTransformer

    write_diffusers(tmp_path / "transformer", "i2v", seed=22)
    convert(plan_conversion(tmp_path / "transformer", "mlx"), tmp_path / "mlx")
    ours = CausalWanTransformer.load(tmp_path / "mlx")
    reference = WanTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()
    case = make_case([1, 3], seed=3, channels=36)
    image = np.random.default_rng(4).standard_normal((1, 257, 48), dtype=np.float32)
    got, cache = chunked(ours, case, image=image)
    found = scores(got, referenced(reference, case, image_context=torch.from_numpy(image)))
    assert all_pass(found), found
    assert all(image_kv is not None and image_kv[0].shape[1] == 257 for _, _, image_kv in cache.cross)


WINDOWS = {"6 frames": ([3, 3, 3, 3], 6, 0), "7 frames, 1 sink": ([3, 3, 3, 3], 7, 1),
           "4 frames, 1 sink, i2v": ([1, 3, 3, 3], 4, 1)}


@pytest.mark.parametrize("blocks,window,sinks", list(WINDOWS.values()), ids=list(WINDOWS))
def test_rolling_window_equals_windowed_reference(models, blocks, window, sinks, record_property):
    ours, reference = models
    case = make_case(blocks, seed=window)
    got, cache = chunked(ours, case, window, sinks)
    found = scores(got, referenced(reference, case, local_attn_size=window, sink_size=sinks))
    record_property("pcc", [[round(m["pcc"], 9) for m in block] for block in found])
    record_property("max_abs", [[m["max_abs"] for m in block] for block in found])
    assert all_pass(found), found
    unwindowed = scores(got, referenced(reference, case))
    assert not all(passes(m, FLOAT32) for m in unwindowed[-1])  # the window changed the last block
    held = cache.held_frames
    assert len(held) < window and held[:sinks] == list(range(sinks)) and held[-1] == sum(blocks) - 1
    assert cache.nbytes == 2 * (2 * len(held) * 6 + 2 * 512) * 64 * 4


def test_window_must_leave_room_for_the_block(models):
    from vidport.runtime.causal_wan_cache import CausalWanCache

    import mlx.core as mx

    case = make_case([3])
    block, context = _channels_last(case.clean[0]), mx.array(case.context)
    with pytest.raises(ValueError, match="does not fit a window"):
        models[0](block, np.zeros((1, 3)), context, CausalWanCache(3, 1))
    with pytest.raises(ValueError, match="blocks run in order"):
        models[0](block, np.zeros((1, 3)), context, CausalWanCache(), start_frame=3)
    with pytest.raises(ValueError, match="one per frame"):
        models[0](block, np.zeros((1, 1)), context, CausalWanCache())


def test_masked_processor_equals_an_explicit_loop():
    """The reference's masked attention against torch SDPA run block by block over the keys each
    block may see (sinks and window included), with diffusers' own projections and RoPE."""
    from diffusers.models.transformers.transformer_wan import WanAttention, WanRotaryPosEmbed

    from vidport.reference.causal_wan import MaskedWanAttnProcessor, block_starts, frame_mask, token_mask

    torch.manual_seed(0)
    blocks, tokens, window, sinks = [1, 3, 3, 3], 6, 5, 1
    attn = WanAttention(dim=64, heads=4, dim_head=16, eps=1e-6).eval()
    cos, sin = WanRotaryPosEmbed(16, (1, 2, 2), 1024)(torch.zeros(1, 16, sum(blocks), HEIGHT, WIDTH))
    x = torch.randn(1, sum(blocks) * tokens, 64)
    frames = frame_mask(blocks, window, sinks)
    with torch.no_grad():
        got = MaskedWanAttnProcessor(token_mask(frames, tokens))(attn, x, rotary_emb=(cos, sin))

        def heads(t):  # [1, tokens, 64] -> [1, heads, tokens, 16]
            return t.unflatten(2, (4, 16)).transpose(1, 2)

        def rotate(t):  # interleaved pairs times exp(i * angle), written out
            c, s = cos[0, :, 0][None, None, :, 0::2], sin[0, :, 0][None, None, :, 1::2]
            even, odd = t[..., 0::2], t[..., 1::2]
            return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)

        q, k = rotate(heads(attn.norm_q(attn.to_q(x)))), rotate(heads(attn.norm_k(attn.to_k(x))))
        v = heads(attn.to_v(x))
        parts = []
        for start, size in zip(block_starts(blocks), blocks):
            seen = [f for f in range(sum(blocks)) if f < sinks or start + size - (window - sinks) <= f < start + size]
            keys = torch.tensor([f * tokens + i for f in seen for i in range(tokens)])
            rows = slice(start * tokens, (start + size) * tokens)
            parts.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k[:, :, keys], v[:, :, keys]))
        expected = attn.to_out[0](torch.cat(parts, dim=2).transpose(1, 2).flatten(2))
    assert frames[-1].tolist() == [True] + [False] * 5 + [True] * 4  # the sink and the last 4 frames
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_block_causal_reference_is_the_prefix_run():
    """Mask-free: in a one-layer model the masked full-sequence output of block b is what stock
    diffusers (its own processor, no mask) gives for block b run over blocks 0..b alone."""
    from vidport.reference.causal_wan import forward_block_causal

    model = random_wan_transformer(wan_config("t2v", num_layers=1), seed=5)
    case = make_case([1, 3, 3], seed=9)
    latents = torch.from_numpy(np.concatenate([n[0] for n in case.noisy], axis=2))
    frame_t = torch.from_numpy(np.concatenate([t[0] for t in case.timesteps], axis=1))
    context = torch.from_numpy(case.context)
    masked = forward_block_causal(model, latents, frame_t, context, case.blocks)
    end = 0
    for frames in case.blocks:
        end += frames
        with torch.no_grad():
            prefix = model(latents[:, :, :end], frame_t[:, :end].repeat_interleave(6, dim=1), context,
                           return_dict=False)[0]
        torch.testing.assert_close(masked[:, :, end - frames:end], prefix[:, :, -frames:], rtol=0, atol=2e-5)
    full = forward_block_causal(model, latents, frame_t, context, case.blocks, causal=False)
    assert (full[:, :, :1] - masked[:, :, :1]).abs().max() > 1e-2  # the mask is what made the difference
