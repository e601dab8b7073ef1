"""Wan attention in MLX, mirroring diffusers' `WanAttention` + `WanAttnProcessor`.

q and k are RMS-normalised over all heads at once (qk_norm "rms_norm_across_heads") before being
split into heads; self-attention then rotates them with the 3D RoPE. Image-to-video models
(Wan 2.1 I2V) also attend from the same queries to CLIP image tokens through their own k/v
projections (`add_k_proj`, `add_v_proj`, `norm_added_k`), and add that result in.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.layers import attention
from vidport.runtime.wan_rope import apply_rotary

# The text context length the pipelines pad prompts to. diffusers splits the cross-attention
# context of an I2V model as [image tokens | the last 512 text tokens]; so do we.
TEXT_CONTEXT_LENGTH = 512

# (k, v, (image k, image v) or None), each [batch, tokens, heads, dim_head]
ContextKV = tuple[mx.array, mx.array, tuple[mx.array, mx.array] | None]


class WanAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, eps: float = 1e-5,
                 added_kv_proj_dim: int | None = None):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = [nn.Linear(inner, dim), nn.Dropout(0.0)]
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner)
            self.norm_added_k = nn.RMSNorm(inner, eps=eps)
        self.has_image_kv = added_kv_proj_dim is not None

    def _heads(self, x: mx.array) -> mx.array:
        """[batch, tokens, heads * dim_head] -> [batch, tokens, heads, dim_head]."""
        return x.reshape(*x.shape[:2], self.heads, -1)

    def _attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """Heads-split [batch, tokens, heads, dim_head] in, heads merged back out."""
        out = attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), self.scale)
        out = out.transpose(0, 2, 1, 3)
        return out.reshape(*out.shape[:2], -1)

    def queries(self, hidden_states: mx.array, rotary_emb: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """Normalised (and, for self-attention, rotated) queries [batch, tokens, heads, dim_head]."""
        q = self._heads(self.norm_q(self.to_q(hidden_states)))
        return q if rotary_emb is None else apply_rotary(q, *rotary_emb)

    def keys_values(self, context: mx.array, rotary_emb: tuple[mx.array, mx.array] | None = None) -> ContextKV:
        """(k, v, image k/v or None) of what the queries attend to: a causal model caches these.
        An I2V cross-attention's context is [image tokens | the last 512 text tokens]."""
        image_kv = None
        if self.has_image_kv:
            image_length = context.shape[1] - TEXT_CONTEXT_LENGTH
            image_context, context = context[:, :image_length], context[:, image_length:]
            image_kv = (self._heads(self.norm_added_k(self.add_k_proj(image_context))),
                        self._heads(self.add_v_proj(image_context)))
        k = self._heads(self.norm_k(self.to_k(context)))
        v = self._heads(self.to_v(context))
        if rotary_emb is not None:
            k = apply_rotary(k, *rotary_emb)
        return k, v, image_kv

    def output(self, q: mx.array, keys_values: ContextKV) -> mx.array:
        """Attention of the queries over the keys/values (plus the image ones), projected out."""
        k, v, image_kv = keys_values
        out = self._attend(q, k, v)
        if image_kv is not None:
            out = out + self._attend(q, *image_kv)
        return self.to_out[1](self.to_out[0](out))

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array | None = None,
                 attention_mask: None = None,
                 rotary_emb: tuple[mx.array, mx.array] | None = None) -> mx.array:
        """diffusers' argument order; `attention_mask` must be None (Wan never masks)."""
        if attention_mask is not None:
            raise ValueError("WanAttention takes no attention mask")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return self.output(self.queries(hidden_states, rotary_emb), self.keys_values(context, rotary_emb))
