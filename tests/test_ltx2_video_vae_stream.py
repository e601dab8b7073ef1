"""Streaming LTX-2 video decode: `decode_stream`'s chunks joined are diffusers' framewise tiled
decode, each chunk is handed out while later runs are still to be decoded, and a clip of one run
comes out at once. The reference is diffusers' AutoencoderKLLTX2Video loaded from the same
Diffusers folder that vidport converts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vidport.converter.convert import convert, plan_conversion
from vidport.golden.metrics import psnr
from fixtures.ltx2_video_vae import write_diffusers

# tiles of 3 latent pixels every 2 (96 / 64 pixels), runs of 2 + 1 latent frames every 1, as the
# tiled-decode test of test_ltx2_video_vae.py; 5 latent frames, 4x4 latent pixels: 5 runs (the
# last adds no frame, as in diffusers) of 2x2 spatial tiles each
TILES = (96, 96, 16, 64, 64, 8)
LONG = (1, 4, 5, 4, 4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers' model, ours) from one Diffusers `vae/` folder."""
    from diffusers import AutoencoderKLLTX2Video

    from vidport.runtime.loading import load_model

    root = tmp_path_factory.mktemp("ltx2_video_vae_stream")
    write_diffusers(root / "vae", seed=1)
    convert(plan_conversion(root / "vae", "mlx"), root / "mlx")
    return AutoencoderKLLTX2Video.from_pretrained(root / "vae").eval(), load_model(root / "mlx")


def _latents(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Channels-first (B, C, T, h, w), as diffusers takes them."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _diffusers_decode(reference, latents: np.ndarray, tiles: tuple[int, ...] | None) -> np.ndarray:
    """diffusers' decode, framewise-tiled with `tiles` (its `enable_tiling` arguments; () for its
    defaults) or untiled (None), channels-last."""
    if tiles is None:
        reference.disable_tiling()
        reference.use_framewise_decoding = False
    else:
        reference.enable_tiling(*tiles)
        reference.use_framewise_decoding = True
    with torch.no_grad():
        return np.moveaxis(reference.decode(torch.from_numpy(latents)).sample.numpy(), 1, -1)


def _stream(stream) -> list[np.ndarray]:
    return [np.array(chunk) for chunk in stream]


@pytest.fixture(scope="module")
def long_clip(models):
    """The long clip streamed with TILES, and diffusers' tiled and untiled decodes of it."""
    import mlx.core as mx

    from vidport.runtime.ltx2.video_vae_tiling import Tiling, decode_stream

    reference, model = models
    latents = _latents(LONG, 3)
    chunks = _stream(decode_stream(model, mx.array(np.moveaxis(latents, 1, -1)),
                                   tiling=Tiling(*TILES, spatial=True, temporal=True)))
    return chunks, _diffusers_decode(reference, latents, TILES), _diffusers_decode(reference, latents, None)


def test_stream_equals_diffusers_framewise_tiled_decode(long_clip):
    chunks, tiled, _ = long_clip
    assert len(chunks) >= 3 and all(c.shape[0] == 1 and c.shape[2:] == (128, 128, 3) for c in chunks)
    streamed = np.concatenate(chunks, axis=1)
    assert streamed.shape == tiled.shape == (1, 33, 128, 128, 3)
    assert np.abs(streamed - tiled).max() < 1e-4


def test_tiled_error_is_diffusers_tiled_error(long_clip):
    """Against diffusers' untiled decode our blend loses what diffusers' own blend loses (PSNR,
    outputs clipped to [-1, 1], peak 2), and that loss is real (tiling changes the result)."""
    chunks, tiled, untiled = long_clip
    untiled = np.clip(untiled, -1, 1)
    theirs = psnr(untiled, np.clip(tiled, -1, 1), peak=2.0)
    ours = psnr(untiled, np.clip(np.concatenate(chunks, axis=1), -1, 1), peak=2.0)
    assert np.isfinite(theirs) and theirs < 60
    assert abs(ours - theirs) < 0.5


def test_first_chunk_arrives_before_the_last_run_is_decoded(models, monkeypatch):
    """A consumer notes how many decoder calls have run when each chunk reaches it: the first
    arrives while runs are still to be decoded, and every chunk after more of them have run."""
    import mlx.core as mx

    from vidport.runtime.ltx2.video_vae import LTX2VideoDecoder3d
    from vidport.runtime.ltx2.video_vae_tiling import Tiling

    _, model = models
    calls = []
    decoder_call = LTX2VideoDecoder3d.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return decoder_call(self, *args, **kwargs)

    monkeypatch.setattr(LTX2VideoDecoder3d, "__call__", counted)
    model.enable_tiling(Tiling(*TILES, spatial=True, temporal=True))
    try:
        seen = [len(calls) for _ in model.decode_stream(mx.array(np.moveaxis(_latents(LONG, 4), 1, -1)))]
    finally:
        model.disable_tiling()
    assert len(seen) >= 3 and seen[0] < len(calls)
    assert all(a < b for a, b in zip(seen, seen[1:]))


@pytest.mark.parametrize("frames,count", [(6, 5), (2, 1)])
def test_long_clip_in_chunks_short_clip_at_once(models, frames, count):
    """With no tiling set the method takes diffusers' defaults with framewise decoding: runs of 2 + 1
    latent frames every 1, so 6 latent frames come out in 5 chunks (the sixth run adds no frame)
    and 2 (one run) in one; joined, diffusers' default framewise decode."""
    import mlx.core as mx

    reference, model = models
    assert model.tiling is None
    latents = _latents((1, 4, frames, 2, 2), frames)
    chunks = _stream(model.decode_stream(mx.array(np.moveaxis(latents, 1, -1))))
    assert len(chunks) == count
    expected = _diffusers_decode(reference, latents, ())
    assert np.abs(np.concatenate(chunks, axis=1) - expected).max() < 1e-4
