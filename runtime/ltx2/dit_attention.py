"""The LTX-2 DiT's attention and the small layers around it, mirroring diffusers name for name:
`LTX2Attention` (with its processor: q/k RMS-normed across heads, RoPE on q and k with separate
tables for the audio-video cross-attention, LTX-2.3's per-head gates, STG's value shortcut),
the parameter-free RMSNorm, the tanh-GELU feed-forward and `LTX2AdaLayerNormSingle`."""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.causal_wan import ALL_TOKENS, AllTokens
from vidport.runtime.layers import attention, gelu_tanh, sigmoid
from vidport.runtime.ltx2.rope import apply_interleaved_rotary, apply_split_rotary
from vidport.runtime.sd15_unet import TimestepEmbedding
from vidport.runtime.sd15_unet import Timesteps as _Timesteps

F32 = mx.float32


class Timesteps(_Timesteps):
    """diffusers' sinusoidal timestep features; the timesteps stay float32 (as in diffusers) when
    verify feeds this layer alone."""

    float32_inputs = True


class RMSNorm(nn.Module):
    """diffusers' `RMSNorm`: statistics in float32, the result in the input's dtype (LTX-2's block
    norms have no weight)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = mx.ones((dim,))

    def __call__(self, hidden_states: mx.array) -> mx.array:
        normed = mx.fast.rms_norm(hidden_states.astype(F32), None, self.eps)
        if "weight" in self:
            return (normed * self.weight.astype(F32)).astype(hidden_states.dtype)
        return normed.astype(hidden_states.dtype)


class GELU(nn.Module):
    """diffusers' `GELU` block with the tanh approximation: a projection, then the activation."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        return gelu_tanh(self.proj(hidden_states))


class FeedForward(nn.Module):
    """diffusers' `FeedForward` ("gelu-approximate", 4x inner width): net = [GELU, Dropout, Linear]."""

    def __init__(self, dim: int, bias: bool = True, mult: int = 4):
        super().__init__()
        self.net = [GELU(dim, dim * mult, bias), nn.Dropout(0.0), nn.Linear(dim * mult, dim, bias=bias)]

    def __call__(self, hidden_states: mx.array) -> mx.array:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class PixArtAlphaCombinedTimestepSizeEmbeddings(nn.Module):
    """The sinusoidal timestep features (256) through a two-layer MLP; LTX-2 uses no size conditions."""

    float32_inputs = True

    def __init__(self, embedding_dim: int):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, shift=0)
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)

    def __call__(self, timestep: mx.array, resolution: None = None, aspect_ratio: None = None,
                 batch_size: int | None = None, hidden_dtype: Any = None) -> mx.array:
        """diffusers' arguments; `hidden_dtype` is the model's (ours: the weights' dtype)."""
        features = self.time_proj(timestep).astype(self.timestep_embedder.linear_1.weight.dtype)
        return self.timestep_embedder(features)


class LTX2AdaLayerNormSingle(nn.Module):
    """A timestep -> `num_mod_params` modulation rows per channel, and the embedded timestep."""

    float32_inputs = True

    def __init__(self, embedding_dim: int, num_mod_params: int = 6):
        super().__init__()
        self.num_mod_params = num_mod_params
        self.emb = PixArtAlphaCombinedTimestepSizeEmbeddings(embedding_dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, num_mod_params * embedding_dim)

    def __call__(self, timestep: mx.array, added_cond_kwargs: None = None, batch_size: int | None = None,
                 hidden_dtype: Any = None) -> tuple[mx.array, mx.array]:
        embedded = self.emb(timestep)
        return self.linear(self.silu(embedded)), embedded


def _expand_mask(mask: mx.array | None) -> mx.array | None:
    """An additive mask [B, queries or 1, keys] as diffusers' processor uses it, for every head."""
    return None if mask is None else mask[:, None].astype(F32)


class LTX2Attention(nn.Module):
    """Self- or cross-attention. `query_rotary_emb` rotates q, `key_rotary_emb` k (q's tables where
    it is None); LTX-2.3's gates scale each head's output by 2 sigmoid(logits of the query input)."""

    def __init__(self, query_dim: int, heads: int = 8, kv_heads: int = 8, dim_head: int = 64, bias: bool = True,
                 cross_attention_dim: int | None = None, out_bias: bool = True, norm_eps: float = 1e-6,
                 norm_elementwise_affine: bool = True, rope_type: str = "interleaved",
                 apply_gated_attention: bool = False):
        super().__init__()
        inner, inner_kv = dim_head * heads, dim_head * kv_heads
        context_dim = cross_attention_dim or query_dim
        self.heads, self.rope_type, self.scale = heads, rope_type, dim_head**-0.5
        self.norm_q = nn.RMSNorm(inner, eps=norm_eps)
        self.norm_k = nn.RMSNorm(inner_kv, eps=norm_eps)
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_kv, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_kv, bias=bias)
        self.to_out = [nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)]
        if apply_gated_attention:
            self.to_gate_logits = nn.Linear(query_dim, heads)
        self.gated = apply_gated_attention

    def _rotate(self, x: mx.array, rotary: tuple[mx.array, mx.array]) -> mx.array:
        rotate = apply_split_rotary if self.rope_type == "split" else apply_interleaved_rotary
        return rotate(x, *rotary)

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array | None = None,
                 attention_mask: mx.array | None = None,
                 query_rotary_emb: tuple[mx.array, mx.array] | None = None,
                 key_rotary_emb: tuple[mx.array, mx.array] | None = None,
                 perturbation_mask: mx.array | None = None, all_perturbed: Any = None,
                 key_tokens: AllTokens = ALL_TOKENS) -> mx.array:
        """`perturbation_mask` [B, 1, 1] (0: skip attention, take the values: STG) and
        `all_perturbed` are the perturbed processor's (LTX-2.3's `perturbed_attn`). `key_tokens`:
        which of the context's tokens this process holds; the rotated keys and the values of every
        process are gathered (runtime.parallel_ltx2's sequence plan), STG's shortcut keeps its own."""
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        value = self.to_v(context)
        if all_perturbed is None:
            all_perturbed = perturbation_mask is not None and not bool(mx.any(perturbation_mask != 0))
        if bool(all_perturbed):
            out = value
        else:
            query = self.norm_q(self.to_q(hidden_states))
            key = self.norm_k(self.to_k(context))
            if query_rotary_emb is not None:
                query = self._rotate(query, query_rotary_emb)
                key = self._rotate(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
            key, values = key_tokens.gather(key, 1), key_tokens.gather(value, 1)
            heads = [t.reshape(*t.shape[:2], self.heads, -1).transpose(0, 2, 1, 3) for t in (query, key, values)]
            out = attention(*heads, self.scale, _expand_mask(attention_mask))
            out = out.transpose(0, 2, 1, 3).reshape(*hidden_states.shape[:2], -1)
            if perturbation_mask is not None:
                mask = perturbation_mask.astype(out.dtype)
                out = value + mask * (out - value)
        if self.gated:
            gates = 2.0 * sigmoid(self.to_gate_logits(hidden_states))
            out = (out.reshape(*out.shape[:2], self.heads, -1) * gates[..., None]).reshape(out.shape)
        return self.to_out[1](self.to_out[0](out))
