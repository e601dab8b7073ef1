"""The UNet's spatial transformer in MLX, mirroring diffusers' `Transformer2DModel` (continuous
input; 1x1-conv projections as SD 1.x uses, or linears with `use_linear_projection` as SD 2.x
and some SD 1.5 fine-tunes use) and its `BasicTransformerBlock`: self-attention over
pixels, cross-attention to the text tokens, GEGLU feed-forward."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.animatediff_motion import FeedForward
from vidport.runtime.layers import Conv2d, GroupNorm, attend_heads


class Attention(nn.Module):
    """diffusers `Attention` (no bias on q/k/v): self-attention, or cross-attention when
    `cross_attention_dim` is given and the call passes `encoder_hidden_states`."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, query_dim), nn.Dropout(0.0)]

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array | None = None) -> mx.array:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        out = attend_heads(self.to_q(hidden_states), self.to_k(context), self.to_v(context), self.heads, self.scale)
        return self.to_out[1](self.to_out[0](out))


class BasicTransformerBlock(nn.Module):
    """LayerNorm -> self-attention, LayerNorm -> cross-attention, LayerNorm -> feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array | None = None) -> mx.array:
        hidden_states = self.attn1(self.norm1(hidden_states)) + hidden_states
        hidden_states = self.attn2(self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states) + hidden_states
        return self.ff(self.norm3(hidden_states)) + hidden_states


class Transformer2DModel(nn.Module):
    """Group norm, projection in, transformer blocks over the H*W pixels, projection out, residual.
    The projections are 1x1 convolutions, or linears (`linear_projection`) applied to the
    flattened pixels, as diffusers does; on channels-last maps the two compute the same.

    The feature map is channels-last; the text tokens keep their (batch, tokens, dim) layout."""

    channels_last = ("hidden_states",)

    def __init__(self, heads: int, dim_head: int, in_channels: int, layers: int, cross_attention_dim: int,
                 groups: int, linear_projection: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm(groups, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner) if linear_projection else Conv2d(in_channels, inner, 1)
        self.transformer_blocks = [BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim)
                                   for _ in range(layers)]
        self.proj_out = nn.Linear(inner, in_channels) if linear_projection else Conv2d(inner, in_channels, 1)

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array | None = None) -> mx.array:
        batch, height, width, _ = hidden_states.shape
        residual = hidden_states
        x = self.proj_in(self.norm(hidden_states))
        x = x.reshape(batch, height * width, -1)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states=encoder_hidden_states)
        x = self.proj_out(x.reshape(batch, height, width, -1))
        return x + residual
