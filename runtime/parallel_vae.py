"""The Wan VAE's tiled decode split across the ranks of a parallel run (`--set vae_tiling=...`
under `mlx.launch`), equal to the same tiled decode in one process.

Why tiles and not time: the Wan decoder is causal in time, a feature cache carrying each latent
frame's state into the next, so a rank cannot start at frame k without decoding the frames before
it; a split by time is not exact. The spatial tiles of `wan_vae_tiling.tiled_decode` (diffusers'
`tiled_decode`) are independent of each other: each goes through the decoder with its own cache,
and only the blend afterwards joins them. So each rank decodes its share of the same tiles, the
decoded tiles are gathered, and rank 0 blends them in the same order with the same arithmetic:
the frames equal the one-process tiled decode (tests/test_distributed.py measures it).

Assignment: the tiles in row-major order are dealt round-robin, tile k to rank k mod N, and
decoded in rounds of N (at most one tile more on one rank than another). Each round is one
`all_gather` (MLX has no gather to one rank): every rank sends one decoded tile, padded with zeros
to the full tile's shape because all_gather takes equal shapes (the tiles on the right and bottom
edges are smaller; a rank without a tile in the last round sends zeros); rank 0 crops each back to
its known shape. Traffic: each rank receives (N-1)/N of the padded tiles, the frame's decoder
output times (tile / stride)^2 overall, about 1.8x at diffusers' 256/192; the other ranks drop it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mlx.core as mx

from vidport.converter.core.errors import VidportError
from vidport.runtime.wan_vae_tiling import Tiling, TileGrid, blend_tiles, tile_sizes

if TYPE_CHECKING:
    from vidport.runtime.distributed import World
    from vidport.runtime.wan_vae import AutoencoderKLWan


def parse_tiling(value: Any, spatial: int) -> Tiling | None:
    """`--set vae_tiling=`: true (diffusers' 256-pixel tiles every 192), [tile, stride] or
    [tile_h, tile_w, stride_h, stride_w] in pixels, multiples of the VAE's `spatial` factor;
    false or absent: no tiling."""
    if value is None or value is False:
        return None
    if value is True:
        return Tiling()
    sizes = value if isinstance(value, list) else None
    if sizes is not None and len(sizes) == 2:
        sizes = [sizes[0], sizes[0], sizes[1], sizes[1]]
    if (sizes is None or len(sizes) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % spatial == 0 for v in sizes)):
        raise VidportError(f"--set vae_tiling={value}: expected true, [tile, stride] or [tile_h, tile_w, stride_h, "
                           f"stride_w] in pixels, positive multiples of {spatial}",
                           hint="for example --set vae_tiling=true (256-pixel tiles every 192) or "
                                f"--set vae_tiling=[{16 * spatial},{12 * spatial}]")
    tiling = Tiling(*sizes)
    if tiling.stride_height > tiling.min_height or tiling.stride_width > tiling.min_width:
        raise VidportError(f"--set vae_tiling={value}: a stride longer than the tile would leave gaps between tiles",
                           hint="give a stride at most the tile size")
    return tiling


def _decoded_shape(vae: "AutoencoderKLWan", latents: mx.array, tile: tuple[int, int]) -> tuple[int, ...]:
    """The decoder output of a full tile: 1 + 4(T-1) frames, the spatial factor less the patch."""
    patch = vae.patch_size or 1
    up = vae.scale_factor_spatial // patch
    frames = 1 + vae.scale_factor_temporal * (latents.shape[1] - 1)
    return (latents.shape[0], frames, tile[0] * up, tile[1] * up, vae.rgb_channels * patch * patch)


def _pad(tile: mx.array, shape: tuple[int, ...]) -> mx.array:
    if tile.shape[:2] != shape[:2] or tile.shape[4] != shape[4]:
        raise VidportError(f"a decoded VAE tile of shape {list(tile.shape)} does not fit the expected {list(shape)}",
                           hint="this VAE's decoder does not give 1 + 4(T-1) frames; decode with "
                                "--set vae_tiling=false")
    return mx.pad(tile, [(0, 0), (0, 0), (0, shape[2] - tile.shape[2]), (0, shape[3] - tile.shape[3]), (0, 0)])


def split_tiled_decode(vae: "AutoencoderKLWan", latents: mx.array, tiling: Tiling, world: "World") -> mx.array | None:
    """(B, T, h, w, z_dim) latents, the same on every rank -> on rank 0 the decoder output (B, T',
    H, W, C) before unpatchify and clamp, equal to `tiled_decode(vae, latents, tiling)`; None on the
    other ranks. Every rank must call it (each round is a collective)."""
    _, _, height, width, _ = latents.shape
    spatial, patch = vae.scale_factor_spatial, vae.patch_size or 1
    grid = TileGrid.of(height, width, tiling, spatial)
    corners, n = grid.corners(), world.size
    full = _decoded_shape(vae, latents, grid.tile)
    decoded: list[mx.array] = []
    for start in range(0, len(corners), n):
        mine = start + world.rank
        if mine < len(corners):
            top, left = corners[mine]
            tile = vae.post_quant_conv(latents[:, :, top:top + grid.tile[0], left:left + grid.tile[1]])
            own = _pad(vae.decode_frames(tile), full)
        else:
            own = mx.zeros(full, dtype=latents.dtype)
        both = mx.distributed.all_gather(own[None], group=world.group)
        world.evaluate(both, what=f"VAE tiles {start + 1}-{min(start + n, len(corners))} of {len(corners)}")
        if world.is_main:
            decoded.extend(both[i] for i in range(min(n, len(corners) - start)))
        del both, own
    if not world.is_main:
        return None
    up = spatial // patch
    rows = []
    for i, top in enumerate(grid.rows):
        rows.append([])
        for j, left in enumerate(grid.columns):
            tile_h = min(grid.tile[0], height - top) * up
            tile_w = min(grid.tile[1], width - left) * up
            rows[i].append(decoded[i * len(grid.columns) + j][:, :, :tile_h, :tile_w])
    return blend_tiles(rows, *tile_sizes(tiling, patch), (height * up, width * up))

