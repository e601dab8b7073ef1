"""The reference of the causal (Self-Forcing / CausVid) Wan DiT: diffusers' model run under a
block-causal mask.

That is diffusers' own `WanTransformer3DModel`, unchanged but for the attention processor of
every self-attention (`attn1`): diffusers' `WanAttnProcessor` given a fixed boolean mask, which
its native backend hands to torch's `scaled_dot_product_attention`. The model runs over the whole
sequence of latent frames with one timestep per token (the (B, tokens) timestep diffusers takes
for Wan 2.2 TI2V), each token at its frame's timestep. A query in block b may attend to every
key in blocks 0..b (block-causal); with a window of `local_attn_size` L frames and `sink_size`
S, only to the frames f < end of b with f < S or f >= end - (L - S).

A KV-cache pass of the causal model over block b, at timesteps t, with the earlier blocks
written to the cache by their clean pass at timestep 0, computes what this reference computes
for block b over [the earlier blocks' clean latents at 0 | block b at t] (`cached_pass`): under
the mask no earlier token sees a later one, so the earlier blocks' keys and values are exactly
those their clean pass cached.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


def block_starts(block_frames: Sequence[int]) -> list[int]:
    return [int(s) for s in np.cumsum([0, *block_frames])[:-1]]


def frame_mask(block_frames: Sequence[int], local_attn_size: int | None = None, sink_size: int = 0,
               causal: bool = True) -> np.ndarray:
    """[frames, frames] booleans: may frame i attend to frame j (True = attend)."""
    total = sum(block_frames)
    if not causal:
        return np.ones((total, total), dtype=bool)
    mask = np.zeros((total, total), dtype=bool)
    for start, frames in zip(block_starts(block_frames), block_frames):
        end = start + frames
        seen = np.arange(total) < end
        if local_attn_size is not None:
            j = np.arange(total)
            seen &= (j < sink_size) | (j >= end - (local_attn_size - sink_size))
        mask[start:end] = seen
    return mask


def token_mask(frames_mask: np.ndarray, frame_tokens: int) -> torch.Tensor:
    """The frame mask for tokens in (frame, row, column) order: [1, 1, tokens, tokens]."""
    ones = np.ones((frame_tokens, frame_tokens), dtype=bool)
    return torch.from_numpy(np.kron(frames_mask, ones))[None, None]


class MaskedWanAttnProcessor(WanAttnProcessor):
    """diffusers' WanAttnProcessor with a fixed boolean attention mask, on torch's SDPA."""

    _attention_backend = AttentionBackendName.NATIVE

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the block-causal mask is for the self-attention (attn1), which diffusers calls unmasked")
        return super().__call__(attn, hidden_states, None, self.mask, rotary_emb)


@contextlib.contextmanager
def masked_self_attention(model, mask: torch.Tensor) -> Iterator[None]:
    """Every block's attn1 attends under `mask` ([1, 1, tokens, tokens]) while inside."""
    originals = [block.attn1.processor for block in model.blocks]
    try:
        for block in model.blocks:
            block.attn1.set_processor(MaskedWanAttnProcessor(mask))
        yield
    finally:
        for block, processor in zip(model.blocks, originals):
            block.attn1.set_processor(processor)


def forward_block_causal(model, latents: torch.Tensor, frame_timesteps: torch.Tensor, context: torch.Tensor,
                         block_frames: Sequence[int], *, local_attn_size: int | None = None, sink_size: int = 0,
                         image_context: torch.Tensor | None = None, causal: bool = True,
                         per_frame_timesteps: bool = True) -> torch.Tensor:
    """diffusers' forward over latents [B, C, frames, H, W] (frames = sum(block_frames)) under the
    block-causal mask, each token at its frame's timestep (frame_timesteps [B, frames]).

    `causal=False` (full attention) and `per_frame_timesteps=False` (every token at the last
    frame's timestep, the scalar a non-causal port would pass) are the simplifications a test
    must be able to tell apart."""
    batch, _, frames, height, width = latents.shape
    if sum(block_frames) != frames or frame_timesteps.shape != (batch, frames):
        raise ValueError(f"{frames} frames, blocks {list(block_frames)}, timesteps {tuple(frame_timesteps.shape)}")
    _, p_h, p_w = model.config.patch_size
    frame_tokens = (height // p_h) * (width // p_w)
    if per_frame_timesteps:
        timestep = frame_timesteps.repeat_interleave(frame_tokens, dim=1)
    else:
        timestep = frame_timesteps[:, -1]
    mask = token_mask(frame_mask(block_frames, local_attn_size, sink_size, causal), frame_tokens)
    with torch.no_grad(), masked_self_attention(model, mask):
        return model(latents, timestep, context, image_context, return_dict=False)[0]


def cached_pass(model, clean_before: torch.Tensor | None, block: torch.Tensor, block_timesteps: torch.Tensor,
                context: torch.Tensor, block_frames: Sequence[int], context_timestep: float = 0.0,
                **kwargs) -> torch.Tensor:
    """What a KV-cache pass over `block` [B, C, F, H, W] at `block_timesteps` [B, F] computes,
    the blocks before it (`clean_before`, their frames in `block_frames[:-1]`) having been
    written by their clean pass at `context_timestep` (the official `context_noise`, 0): the
    reference over both, the block's frames out."""
    frames = block.shape[2]
    if clean_before is None:
        latents, timesteps = block, block_timesteps
    else:
        before = torch.full((block.shape[0], clean_before.shape[2]), context_timestep, dtype=block_timesteps.dtype)
        latents, timesteps = torch.cat([clean_before, block], dim=2), torch.cat([before, block_timesteps], dim=1)
    return forward_block_causal(model, latents, timesteps, context, block_frames, **kwargs)[:, :, -frames:]
