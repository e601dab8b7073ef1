"""The UMT5 text encoder in MLX (Wan's umt5-xxl), mirroring transformers' `UMT5EncoderModel`
tree name for name.

Token ids (batch, length) and a padding mask -> hidden states (batch, length, d_model). T5
conventions: RMS layer norm (no mean, no bias) computed in float32, attention logits unscaled,
a gated-GELU feed-forward. Unlike T5, which computes one relative position bias in the first
layer and shares it, UMT5 learns a bias table in every layer.
"""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vidport.runtime.layers import attention, gelu_tanh


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets of (key - query) offsets: half the buckets per direction, exact
    for small offsets, logarithmic up to `max_distance`, and the last bucket beyond it. Computed
    in float32 with the reference's operation order, so truncation lands in the same bucket."""
    half = num_buckets // 2
    buckets = (relative_position > 0).astype(np.int64) * half
    distance = np.abs(relative_position)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) for offsets the exact branch takes
        scaled = np.log(distance.astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(np.isfinite(scaled), scaled, 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class UMT5LayerNorm(nn.Module):
    """T5's RMS norm: x / rms(x) * weight, statistics in float32, result in the weight's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((hidden_size,))
        self.eps = eps

    def __call__(self, hidden_states: mx.array) -> mx.array:
        x = hidden_states.astype(mx.float32)
        x = x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.weight * x.astype(self.weight.dtype)


class GELUTanh(nn.Module):
    """transformers' `gelu_new`: the tanh approximation of GELU."""

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_tanh(x)


ACTIVATIONS = {"gelu_new": GELUTanh, "gelu_pytorch_tanh": GELUTanh, "gelu": nn.GELU, "relu": nn.ReLU}


def additive_mask(mask: mx.array | None, dtype: mx.Dtype) -> mx.array | None:
    """A mask as transformers hands it to attention (boolean: True = attend; or already additive)
    -> an additive float mask."""
    if mask is None:
        return None
    if mx.issubdtype(mask.dtype, mx.floating):
        return mask.astype(dtype)
    return mx.where(mask, mx.array(0.0, dtype), mx.array(mx.finfo(dtype).min, dtype))


class UMT5Attention(nn.Module):
    """Self-attention with its own learned relative position bias, no 1/sqrt(d) scaling."""

    def __init__(self, d_model: int, d_kv: int, heads: int, num_buckets: int, max_distance: int):
        super().__init__()
        self.heads, self.d_kv = heads, d_kv
        self.num_buckets, self.max_distance = num_buckets, max_distance
        inner = heads * d_kv
        self.q = nn.Linear(d_model, inner, bias=False)
        self.k = nn.Linear(d_model, inner, bias=False)
        self.v = nn.Linear(d_model, inner, bias=False)
        self.o = nn.Linear(inner, d_model, bias=False)
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def compute_bias(self, query_length: int, key_length: int) -> mx.array:
        """(1, heads, query_length, key_length) bias from this layer's bucket table."""
        offsets = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
        buckets = mx.array(relative_position_bucket(offsets, self.num_buckets, self.max_distance))
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)[None]

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: None = None, past_key_values: None = None,
                 attention_mask: mx.array | None = None) -> mx.array:
        """transformers' arguments; cross-attention and caches (decoder only) must be None."""
        if encoder_hidden_states is not None or past_key_values is not None:
            raise ValueError("the UMT5 encoder port has no cross-attention or cache")
        batch, length, _ = hidden_states.shape

        def heads(x: mx.array) -> mx.array:
            return x.reshape(batch, length, self.heads, self.d_kv).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q(hidden_states)), heads(self.k(hidden_states)), heads(self.v(hidden_states))
        bias = self.compute_bias(length, length).astype(q.dtype)
        mask = additive_mask(attention_mask, q.dtype)
        bias = bias if mask is None else bias + mask
        out = attention(q, k, v, 1.0, mask=bias)
        return self.o(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class UMT5LayerSelfAttention(nn.Module):
    def __init__(self, d_model: int, eps: float, **attention: Any):
        super().__init__()
        self.SelfAttention = UMT5Attention(d_model, **attention)
        self.layer_norm = UMT5LayerNorm(d_model, eps)
        self.dropout = nn.Dropout(0.0)

    def __call__(self, hidden_states: mx.array, attention_mask: mx.array | None = None,
                 past_key_values: None = None) -> mx.array:
        out = self.SelfAttention(self.layer_norm(hidden_states), attention_mask=attention_mask,
                                 past_key_values=past_key_values)
        return hidden_states + self.dropout(out)


class UMT5DenseGatedActDense(nn.Module):
    """act(wi_0 x) * wi_1 x -> wo."""

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"dense_act_fn '{activation}' is not supported; known: {', '.join(ACTIVATIONS)}")
        self.wi_0 = nn.Linear(d_model, d_ff, bias=False)
        self.wi_1 = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(0.0)
        self.act = ACTIVATIONS[activation]()

    def __call__(self, hidden_states: mx.array) -> mx.array:
        gated = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        return self.wo(self.dropout(gated))


class UMT5LayerFF(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, eps: float):
        super().__init__()
        self.DenseReluDense = UMT5DenseGatedActDense(d_model, d_ff, activation)
        self.layer_norm = UMT5LayerNorm(d_model, eps)
        self.dropout = nn.Dropout(0.0)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        return hidden_states + self.dropout(self.DenseReluDense(self.layer_norm(hidden_states)))


class UMT5Block(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, eps: float, **attention: Any):
        super().__init__()
        self.layer = [UMT5LayerSelfAttention(d_model, eps, **attention), UMT5LayerFF(d_model, d_ff, activation, eps)]

    def __call__(self, hidden_states: mx.array, attention_mask: mx.array | None = None,
                 encoder_hidden_states: None = None, encoder_attention_mask: None = None,
                 past_key_values: None = None) -> mx.array:
        """transformers' arguments; the decoder-only ones must be None."""
        if encoder_hidden_states is not None or encoder_attention_mask is not None:
            raise ValueError("the UMT5 encoder port has no cross-attention")
        hidden_states = self.layer[0](hidden_states, attention_mask=attention_mask, past_key_values=past_key_values)
        return self.layer[1](hidden_states)


class TiedEmbedding(nn.Module):
    """A lookup in another module's table: transformers' `encoder.embed_tokens`, whose weight is
    tied to `shared.weight`. It holds no parameter of its own, so the table is stored once."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        object.__setattr__(self, "_table", table)  # an attribute, not a child: outside the tree

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self._table.weight[input_ids]


class UMT5Stack(nn.Module):
    def __init__(self, shared: nn.Embedding, num_layers: int, d_model: int, eps: float, **block: Any):
        super().__init__()
        self.embed_tokens = TiedEmbedding(shared)
        self.block = [UMT5Block(d_model=d_model, eps=eps, **block) for _ in range(num_layers)]
        self.final_layer_norm = UMT5LayerNorm(d_model, eps)
        self.dropout = nn.Dropout(0.0)

    def __call__(self, input_ids: mx.array | None = None, attention_mask: mx.array | None = None,
                 inputs_embeds: mx.array | None = None) -> mx.array:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        # (batch, length) 1 = token, 0 = padding -> boolean (batch, 1, 1, length): no query sees padding
        mask = None if attention_mask is None else (attention_mask[:, None, None, :] > 0)
        hidden_states = self.dropout(hidden_states)
        for block in self.block:
            hidden_states = block(hidden_states, mask)
        return self.dropout(self.final_layer_norm(hidden_states))


# UMT5Config arguments this port reads; the defaults are transformers' own.
_DEFAULTS = {"vocab_size": 250112, "d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 8, "num_heads": 6,
             "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
             "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu"}


class UMT5EncoderModel(nn.Module):
    """Token ids (+ padding mask) -> last hidden state."""

    def __init__(self, vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int,
                 relative_attention_num_buckets: int, relative_attention_max_distance: int,
                 layer_norm_epsilon: float, feed_forward_proj: str):
        super().__init__()
        gated, _, activation = feed_forward_proj.rpartition("-")
        if gated != "gated":
            raise ValueError(f"feed_forward_proj '{feed_forward_proj}': only gated feed-forwards (UMT5's) are ported")
        activation = "gelu_new" if activation == "gelu" else activation  # as UMT5Config maps it
        self.shared = nn.Embedding(vocab_size, d_model)
        self.encoder = UMT5Stack(self.shared, num_layers, d_model, layer_norm_epsilon, d_ff=d_ff,
                                 activation=activation, d_kv=d_kv, heads=num_heads,
                                 num_buckets=relative_attention_num_buckets,
                                 max_distance=relative_attention_max_distance)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "UMT5EncoderModel":
        """From a transformers UMT5Config dict (its other entries, such as dropout or the decoder's
        settings, do not change the encoder's inference)."""
        return cls(**{key: config.get(key, default) for key, default in _DEFAULTS.items()})

    def __call__(self, input_ids: mx.array | None = None, attention_mask: mx.array | None = None,
                 inputs_embeds: mx.array | None = None) -> mx.array:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
