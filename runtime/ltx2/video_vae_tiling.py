"""Tiled LTX-2 video decoding, as diffusers' `AutoencoderKLLTX2Video` does it: spatial tiles of
latents decoded one at a time and blended linearly where they overlap (`tiled_decode`), and, with
framewise decoding, overlapping runs of latent frames blended in time (`_temporal_tiled_decode`,
each run spatially tiled in turn when it is large). Peak memory follows the tile, not the clip;
the result equals diffusers' tiled decode (not its untiled one: the blend is an approximation by
design). `decode_stream` hands the temporal decode out run by run, each chunk final when yielded,
so a long clip never holds all its frames. Channels-last: latents (B, T, h, w, C), video
(B, F, H, W, 3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import mlx.core as mx

from vidport.runtime.wan_vae_tiling import blend_edge, blend_tiles

if TYPE_CHECKING:
    from vidport.runtime.ltx2.video_vae import AutoencoderKLLTX2Video


@dataclass(frozen=True)
class Tiling:
    """diffusers' settings, in output pixels and frames (its defaults): tiles of 512 pixels every
    448, and, when `temporal`, runs of 16 frames every 8; `spatial` is diffusers' `use_tiling`,
    `temporal` its `use_framewise_decoding`."""

    min_height: int = 512
    min_width: int = 512
    min_num_frames: int = 16
    stride_height: int = 448
    stride_width: int = 448
    stride_num_frames: int = 8
    spatial: bool = True
    temporal: bool = False


def decode_tiled(model: "AutoencoderKLLTX2Video", z: mx.array, temb: mx.array | None, causal: bool | None,
                 tiling: Tiling) -> mx.array:
    """diffusers' `_decode` with tiling on: temporal runs where the clip is longer than one, else
    spatial tiles where the latents are larger than one, else the plain decoder: `decode_stream`'s
    chunks, joined."""
    chunks = list(decode_stream(model, z, temb, causal, tiling))
    return chunks[0] if len(chunks) == 1 else mx.concatenate(chunks, axis=1)


def decode_stream(model: "AutoencoderKLLTX2Video", z: mx.array, temb: mx.array | None = None,
                  causal: bool | None = None, tiling: Tiling | None = None) -> Iterator[mx.array]:
    """`decode_tiled` as chunks of frames (B, n, H, W, 3), in order, each final when it is yielded,
    so that a writer can take a long clip without all its frames in memory: one chunk per temporal
    run, or the whole decode at once where the clip is one run (or `temporal` is off). `tiling`
    defaults to the model's, else diffusers' defaults with temporal runs on."""
    tiling = tiling or model.tiling or Tiling(temporal=True)
    if tiling.temporal and z.shape[1] > tiling.min_num_frames // model.temporal_compression_ratio:
        yield from _temporal(model, z, temb, causal, tiling)
    else:
        yield _run(model, z, temb, causal, tiling)


def _run(model: "AutoencoderKLLTX2Video", z: mx.array, temb: mx.array | None, causal: bool | None,
         tiling: Tiling) -> mx.array:
    """One run of latent frames: in spatial tiles where it is larger than one tile."""
    if tiling.spatial and _too_large(model, z.shape[2], z.shape[3], tiling):
        return _spatial(model, z, temb, causal, tiling)
    return model.decoder(z, temb, causal=causal)


def _too_large(model: "AutoencoderKLLTX2Video", height: int, width: int, tiling: Tiling) -> bool:
    ratio = model.spatial_compression_ratio
    return width > tiling.min_width // ratio or height > tiling.min_height // ratio


def _spatial(model: "AutoencoderKLLTX2Video", z: mx.array, temb: mx.array | None, causal: bool | None,
             tiling: Tiling) -> mx.array:
    height, width = z.shape[2:4]
    ratio = model.spatial_compression_ratio
    tile_h, tile_w = tiling.min_height // ratio, tiling.min_width // ratio
    step_h, step_w = tiling.stride_height // ratio, tiling.stride_width // ratio
    rows: list[list[mx.array]] = []
    for top in range(0, height, step_h):
        row = []
        for left in range(0, width, step_w):
            row.append(model.decoder(z[:, :, top:top + tile_h, left:left + tile_w], temb, causal=causal))
            mx.eval(row[-1])
        rows.append(row)
    keep = (tiling.stride_height, tiling.stride_width)
    overlap = (tiling.min_height - tiling.stride_height, tiling.min_width - tiling.stride_width)
    return blend_tiles(rows, keep, overlap, (height * ratio, width * ratio))


def _temporal(model: "AutoencoderKLLTX2Video", z: mx.array, temb: mx.array | None, causal: bool | None,
              tiling: Tiling) -> Iterator[mx.array]:
    """diffusers' `_temporal_tiled_decode` run by run. Its blend writes only into the later run's
    head (from the earlier run's tail) and each run keeps only its head, so a run's kept frames are
    final once it is blended with the run before: they are yielded then, and only the tail the
    next run blends from is carried on."""
    frames = z.shape[1]
    ratio_t = model.temporal_compression_ratio
    run, step = tiling.min_num_frames // ratio_t, tiling.stride_num_frames // ratio_t
    blend = max(tiling.min_num_frames - tiling.stride_num_frames, 0)
    left = (frames - 1) * ratio_t + 1
    previous = None
    for start in range(0, frames, step):
        decoded = _run(model, z[:, start:start + run + 1], temb, causal, tiling)
        if previous is not None:  # diffusers drops a later run's last frame
            decoded = blend_edge(previous, decoded[:, :-1], blend, axis=1)
        chunk = decoded[:, : min(tiling.stride_num_frames + (1 if previous is None else 0), left)]
        previous = decoded[:, decoded.shape[1] - min(blend, decoded.shape[1]):]
        mx.eval(chunk, previous)
        left -= chunk.shape[1]
        if chunk.shape[1]:
            yield chunk
