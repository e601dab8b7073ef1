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


def blend_edge(previous: mx.array, tile: mx.array, extent: int, axis: int) -> mx.array:
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


def blend_tiles(rows: list[list[mx.array]], keep: tuple[int, int], overlap: tuple[int, int],
                size: tuple[int, int]) -> mx.array:
    """Decoded tiles (B, T, h, w, C), row by row, into one output: each tile fades in from the one
    above and the one to its left over `overlap` pixels, keeps `keep` of itself, and the kept
    parts are joined and cropped to `size`. Each blend reads its neighbours as already blended, as
    diffusers' in-place loop does (Wan's and LTX-2's tiled decodes alike)."""
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = blend_edge(rows[i - 1][j], row[j], overlap[0], axis=2)
            if j > 0:
                row[j] = blend_edge(row[j - 1], row[j], overlap[1], axis=3)
    bands = [mx.concatenate([tile[:, :, :keep[0], :keep[1]] for tile in row], axis=3) for row in rows]
    return mx.concatenate(bands, axis=2)[:, :, :size[0], :size[1]]


def tile_sizes(tiling: Tiling, patch: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(keep, overlap) of each decoded tile, in decoder-output pixels (a patched decoder's are
    `patch` output pixels wide)."""
    keep = (tiling.stride_height // patch, tiling.stride_width // patch)
    return keep, (tiling.min_height // patch - keep[0], tiling.min_width // patch - keep[1])


@dataclass(frozen=True)
class TileGrid:
    """The tiles `tiled_decode` cuts a (h, w) latent frame into, as latent (top, left) corners."""

    rows: tuple[int, ...]
    columns: tuple[int, ...]
    tile: tuple[int, int]  # latent pixels
    tiled: bool  # False: the frame fits one tile and tiled_decode is not used (AutoencoderKLWan.decode)

    @classmethod
    def of(cls, height: int, width: int, tiling: Tiling, spatial: int) -> "TileGrid":
        tile_h, tile_w = tiling.min_height // spatial, tiling.min_width // spatial
        rows = tuple(range(0, height, tiling.stride_height // spatial))
        columns = tuple(range(0, width, tiling.stride_width // spatial))
        return cls(rows, columns, (tile_h, tile_w), height > tile_h or width > tile_w)

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.columns)

    def corners(self) -> list[tuple[int, int]]:
        """Row-major, the order tiled_decode decodes and blends in."""
        return [(top, left) for top in self.rows for left in self.columns]

    def describe(self, tiling: Tiling, ranks: int) -> str:
        """The decode's part of a parallel run's plan line."""
        size = (f"{tiling.min_height} px every {tiling.stride_height}" if tiling.min_height == tiling.min_width
                and tiling.stride_height == tiling.stride_width else
                f"{tiling.min_height}x{tiling.min_width} px every {tiling.stride_height}x{tiling.stride_width}")
        if not self.tiled:
            return f"decode: rank 0 alone, the frame fits one tile of {size}"
        most = -(-self.count // ranks)
        return (f"decode: {self.count} tiles ({len(self.rows)}x{len(self.columns)} of {size}) over {ranks} ranks, "
                f"up to {most} a rank, blended on rank 0")


def tiled_decode(model: "AutoencoderKLWan", latents: mx.array, tiling: Tiling) -> mx.array:
    """(B, T, h, w, z_dim) -> decoder output (B, T', H, W, C) before unpatchify and clamp."""
    _, _, height, width, _ = latents.shape
    factor, patch = model.scale_factor_spatial, model.patch_size or 1
    grid = TileGrid.of(height, width, tiling, factor)
    rows = [[model.decode_frames(model.post_quant_conv(latents[:, :, top:top + grid.tile[0], left:left + grid.tile[1]]))
             for left in grid.columns] for top in grid.rows]
    return blend_tiles(rows, *tile_sizes(tiling, patch), (height * factor // patch, width * factor // patch))
