"""Spatially tiled Wan VAE decoding, as diffusers' `AutoencoderKLWan.tiled_decode`: overlapping
latent tiles are decoded one at a time (each through its own feature cache, frame by frame) and
blended linearly where they overlap. Peak memory follows the tile, not the frame size; the result
equals diffusers' tiled decode (not its untiled one: the blend is an approximation by design)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:
    from vidport.runtime.wan_vae import AutoencoderKLWan


@dataclass(frozen=True)
class Tiling:
    """diffusers' tiling settings, in output pixels (defaults: 256 tiles every 192 pixels)."""

    min_height: int = 256
    min_width: int = 256
    stride_height: int = 192
    stride_width: int = 192


def _blend(previous: mx.array, tile: mx.array, extent: int, axis: int) -> mx.array:
    """Fade from the end of `previous` into the start of `tile` over `extent` rows/columns."""
    extent = min(previous.shape[axis], tile.shape[axis], extent)
    if extent <= 0:
        return tile
    shape = [1] * tile.ndim
    shape[axis] = extent
    weight = (mx.arange(extent, dtype=mx.float32) / extent).reshape(shape).astype(tile.dtype)
    head = mx.take(tile, mx.arange(extent), axis=axis)
    tail = mx.take(previous, mx.arange(previous.shape[axis] - extent, previous.shape[axis]), axis=axis)
    rest = mx.take(tile, mx.arange(extent, tile.shape[axis]), axis=axis)
    return mx.concatenate([tail * (1 - weight) + head * weight, rest], axis=axis)


def tiled_decode(model: "AutoencoderKLWan", latents: mx.array, tiling: Tiling) -> mx.array:
    """(B, T, h, w, z_dim) -> decoder output (B, T', H, W, C) before unpatchify and clamp."""
    _, frames, height, width, _ = latents.shape
    factor = model.scale_factor_spatial
    patch = model.patch_size or 1
    tile_h, tile_w = tiling.min_height // factor, tiling.min_width // factor
    step_h, step_w = tiling.stride_height // factor, tiling.stride_width // factor
    keep_h, keep_w = tiling.stride_height // patch, tiling.stride_width // patch  # decoder-output pixels
    blend_h, blend_w = tiling.min_height // patch - keep_h, tiling.min_width // patch - keep_w
    rows: list[list[mx.array]] = []
    for top in range(0, height, step_h):
        row = []
        for left in range(0, width, step_w):
            tile = model.post_quant_conv(latents[:, :, top:top + tile_h, left:left + tile_w])
            row.append(model.decode_frames(tile))
        rows.append(row)
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], blend_h, axis=2)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], blend_w, axis=3)
    bands = [mx.concatenate([tile[:, :, :keep_h, :keep_w] for tile in row], axis=3) for row in rows]
    out = mx.concatenate(bands, axis=2)
    return out[:, :, : height * factor // patch, : width * factor // patch]
