"""The causal, autoregressive Wan DiT of Self-Forcing (and CausVid): Wan 2.1's weights and names,
run one block of latent frames at a time over a KV cache (runtime.causal_wan_cache).

What differs from `WanTransformer3DModel` (as the official `CausalWanModel` does it):
- one timestep per latent frame: the modulation of every block and of the head is per frame;
- self-attention is block-causal: a block attends to the cached frames before it and to all of
  its own frames (not frame-causal inside the block);
- the 3D RoPE of a block starts at its frame index in the video (`causal_rope_apply(start_frame)`);
- the cross-attention keys and values of the prompt are computed once and cached.

Equivalently (and this is how it is verified, reference.causal_wan): diffusers'
`WanTransformer3DModel` over the whole sequence of frames, the earlier blocks as they were
written to the cache, under a block-causal attention mask with per-token timesteps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.converter.core.manifest import read_manifest
from vidport.runtime.causal_wan_cache import CausalWanCache
from vidport.runtime.loading import load_model
from vidport.runtime.wan_attention import ContextKV
from vidport.runtime.wan_dit import WanTransformer3DModel
from vidport.runtime.wan_rope import WanRotaryPosEmbed


class AllTokens:
    """Every token of a block, in this process: what one process runs. The sequence-parallel plan
    (runtime.parallel_causal_wan.RankTokens) keeps this rank's share of the tokens, gathers the
    keys, values and output of every rank, and bounds each block's wait on the others."""

    def part(self, x: mx.array, axis: int) -> mx.array:
        """This process's tokens of `x` (tokens along `axis`)."""
        return x

    def gather(self, x: mx.array, axis: int) -> mx.array:
        """Every process's tokens of `x`, in token order."""
        return x

    def settle(self, *arrays: Any, what: str) -> None:
        """Evaluate what waits on other processes (nothing does here: the graph stays lazy)."""


ALL_TOKENS = AllTokens()


def block_rotary(rope: WanRotaryPosEmbed, grid: tuple[int, int, int], start_frame: int) -> tuple[mx.array, mx.array]:
    """The RoPE tables of a block's post-patch grid, its frames at positions start_frame, ..."""
    cos, sin = rope.tables(*grid, start_frame=start_frame)
    return mx.array(cos), mx.array(sin)


class CausalWanTransformer(WanTransformer3DModel):
    """A Wan DiT (the same parameters: a converted `wan-dit` folder loads into it) that runs block
    by block: `model(latents_block, timestep_per_frame, context, cache)`."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._patch_size[0] != 1:
            raise ValueError(f"patch size {self._patch_size}: the causal Wan DiT needs a temporal patch of 1")

    @classmethod
    def load(cls, folder: str | Path) -> "CausalWanTransformer":
        """The causal model of a converted MLX Wan DiT folder (weights loaded strictly)."""
        model = load_model(folder)
        if isinstance(model, cls):
            return model
        if not isinstance(model, WanTransformer3DModel):
            raise VidportError(f"{folder}: holds a {type(model).__name__}, not a Wan DiT")
        causal = cls.from_config(read_manifest(Path(folder))["config"])
        causal.update(model.parameters())
        causal.eval()
        return causal

    def __call__(self, latents: mx.array, timestep: Any, context: mx.array | None, cache: CausalWanCache,
                 start_frame: int | None = None, *, image_context: mx.array | None = None,
                 write: bool = False, tokens: AllTokens = ALL_TOKENS) -> mx.array:
        """One block: latents [B, F, H, W, C] channels-last (F latent frames), timestep [B, F] or
        [F] (one per frame), text context [B, 512, text_dim] -> the prediction [B, F, H, W, out].

        `context` (and `image_context`, CLIP tokens for an I2V checkpoint) is read on the first
        call with an empty cache and its keys/values cached; later calls reuse them (pass None
        or the same prompt). `start_frame` is the block's first frame in the video, which must be
        `cache.frames` (default). With `write`, the block's keys and values join the cache.
        `tokens`: which of the block's tokens this process computes (all, unless split across ranks)."""
        batch, frames, height, width, _ = latents.shape
        grid = self.rope.grid(frames, height, width)
        frame_tokens = grid[1] * grid[2]
        start = cache.frames if start_frame is None else start_frame
        cache.check_block(start, frames, frame_tokens)
        if cache.cross is None:
            if context is None:
                raise ValueError("the first call with a cache needs the text context")
            cache.cross, cache.dtype = self._cross_keys_values(context, image_context), context.dtype
        temb, modulation = self._frame_embedding(timestep, batch, frames, frame_tokens, cache.dtype)
        temb, modulation = tokens.part(temb, 1), tokens.part(modulation, 1)
        rotary = tuple(tokens.part(table, 0) for table in block_rotary(self.rope, grid, start))
        x = self.patch_embedding(latents)
        x = tokens.part(x.reshape(batch, -1, x.shape[-1]), 1)  # tokens in (frame, row, column) order

        past = cache.visible(frames)
        written: list[tuple[mx.array, mx.array]] = []
        for layer, block in enumerate(self.blocks):
            def self_attention(norm: mx.array, attn=block.attn1, layer=layer) -> mx.array:
                k, v, _ = attn.keys_values(norm, rotary)
                k, v = tokens.gather(k, 1), tokens.gather(v, 1)
                written.append((k, v))
                if past is not None:
                    k = mx.concatenate([past[layer][0], k], axis=1)
                    v = mx.concatenate([past[layer][1], v], axis=1)
                return attn.output(attn.queries(norm, rotary), (k, v, None))

            def cross_attention(norm: mx.array, attn=block.attn2, layer=layer) -> mx.array:
                return attn.output(attn.queries(norm), cache.cross[layer])

            x = block.around(x, modulation, self_attention, cross_attention)
            tokens.settle(x, written[-1], what=f"DiT block {layer}")

        out = self.unpatchify(tokens.gather(self.head(x, temb), 1), grid)
        if write:
            mx.eval(out, written)
            cache.write(written, frames, frame_tokens)
        return out

    def _cross_keys_values(self, context: mx.array, image_context: mx.array | None) -> list[ContextKV]:
        embedder = self.condition_embedder
        context = embedder.text_embedder(context)
        if image_context is not None:
            if "image_embedder" not in embedder:
                raise ValueError("image conditioning given to a model without an image embedder")
            context = mx.concatenate([embedder.image_embedder(image_context), context], axis=1)
        return [block.attn2.keys_values(context) for block in self.blocks]

    def _frame_embedding(self, timestep: Any, batch: int, frames: int, frame_tokens: int,
                         dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """The time embedding of each frame's timestep, given to each of its tokens:
        temb [B, tokens, dim] for the head, the blocks' modulation [B, tokens, 6, dim]."""
        t = mx.array(np.asarray(timestep)) if not isinstance(timestep, mx.array) else timestep
        if t.shape not in ((frames,), (1, frames), (batch, frames)):
            raise ValueError(f"timestep of shape {tuple(t.shape)}: give one per frame, ({batch}, {frames})")
        t = mx.broadcast_to(t.reshape(-1, frames), (batch, frames)).reshape(-1)
        embedder = self.condition_embedder
        temb = embedder.time_embedder(embedder.timesteps_proj(t)).astype(dtype)  # [B * F, dim]
        projection = embedder.time_proj(embedder.act_fn(temb))
        temb = mx.repeat(temb.reshape(batch, frames, 1, -1), frame_tokens, axis=2)
        projection = mx.repeat(projection.reshape(batch, frames, 1, 6, -1), frame_tokens, axis=2)
        return temb.reshape(batch, frames * frame_tokens, -1), projection.reshape(batch, frames * frame_tokens, 6, -1)
