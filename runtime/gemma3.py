"""The Gemma 3 text tower in MLX (gemma-3-12b-it as LTX-2 uses it), mirroring transformers'
`Gemma3TextModel` tree name for name.

Token ids (batch, length) and a padding mask -> every hidden state: the scaled embeddings, each
decoder layer's output, and the final norm's in place of the last layer's (as transformers'
`output_hidden_states` gives them; LTX-2 stacks all of them). Gemma 3 conventions: embeddings
times sqrt(hidden) rounded to the weights' dtype, RMS norms scaling by (1 + weight) in float32,
per-head q / k norms, grouped-query attention scaled by query_pre_attn_scalar**-0.5, norms after
attention and around the tanh-GELU gated feed-forward, and two kinds of layer (`layer_types`):
sliding-window layers (a query sees the `sliding_window` latest keys, itself included; local RoPE
base) and global layers (every earlier key; global RoPE base, with linear scaling where configured).
Positions are 0..length-1 whatever the padding (transformers' default), and a query that may see
no key at all (a left-padded row's padding) gets a zero attention output, as torch's SDPA gives.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vidport.runtime.layers import attention
from vidport.runtime.umt5 import GELUTanh

SLIDING, FULL = "sliding_attention", "full_attention"

# Gemma3TextConfig arguments this port reads; the defaults are transformers' own (a test checks
# them against Gemma3TextConfig), used where a config.json leaves a key out as transformers does.
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6, "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "attn_logit_softcapping": None, "use_bidirectional_attention": False,
}
_DEFAULT_THETA = {FULL: 1_000_000.0, SLIDING: 10_000.0}
_DEFAULT_PATTERN = 6  # every 6th layer global, where a config gives neither layer_types nor a pattern
_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new")  # both the tanh approximation


def layer_types(config: dict[str, Any]) -> list[str]:
    """Each layer's kind: the config's `layer_types`, else (transformers 4.50 configs) every
    `sliding_window_pattern`-th layer global, as Gemma3TextConfig derives it."""
    count = config.get("num_hidden_layers", _DEFAULTS["num_hidden_layers"])
    given = config.get("layer_types")
    if given is None:
        pattern = config.get("sliding_window_pattern", _DEFAULT_PATTERN)
        return [SLIDING if (i + 1) % pattern else FULL for i in range(count)]
    if len(given) != count or any(kind not in (SLIDING, FULL) for kind in given):
        raise ValueError(f"layer_types {given}: need {count} entries, each '{SLIDING}' or '{FULL}'")
    return list(given)


def rope_parameters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """RoPE per layer kind ({rope_type, rope_theta, factor}): transformers 5's `rope_parameters`,
    else the 4.50 keys (rope_theta and rope_scaling for global layers, rope_local_base_freq for
    sliding ones), as Gemma3TextConfig standardises them."""
    given = config.get("rope_parameters") or {}
    found = {}
    for kind, theta_key, scaling in ((FULL, "rope_theta", config.get("rope_scaling")),
                                     (SLIDING, "rope_local_base_freq", None)):
        params = dict(given.get(kind) or {"rope_type": "default"})
        if kind not in given and scaling:
            params.update(scaling)
        params.setdefault("rope_theta", config.get(theta_key, _DEFAULT_THETA[kind]))
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        if params["rope_type"] not in ("default", "linear"):
            raise ValueError(f"{kind} RoPE '{params['rope_type']}': only default and linear RoPE (Gemma 3's) are ported")
        found[kind] = params
    return found


class Gemma3RMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), all in float32, then back to the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        h = x.astype(mx.float32)
        h = h * mx.rsqrt(mx.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + self.weight.astype(mx.float32))).astype(x.dtype)


class Gemma3TextScaledWordEmbedding(nn.Module):
    """A table lookup times sqrt(hidden_size), the factor rounded to the table's dtype first
    (bfloat16 weights: sqrt(3840) = 61.97 becomes 62.0), as transformers multiplies."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = mx.zeros((num_embeddings, embedding_dim))
        self.embed_scale = float(np.sqrt(np.float32(embedding_dim)))

    def __call__(self, input_ids: mx.array) -> mx.array:
        return self.weight[input_ids] * mx.array(self.embed_scale, dtype=mx.float32).astype(self.weight.dtype)


class Gemma3RotaryEmbedding(nn.Module):
    """cos / sin tables per layer kind, each from its own base (and linear scaling), computed in
    float32 and returned in x's dtype."""

    def __init__(self, head_dim: int, params: dict[str, dict[str, Any]]):
        super().__init__()
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        self._inv_freq = {}
        for kind, p in params.items():
            inv_freq = np.float32(1.0) / (np.float32(p["rope_theta"]) ** exponents)
            if p["rope_type"] == "linear":
                inv_freq = inv_freq / np.float32(p["factor"])
            self._inv_freq[kind] = mx.array(inv_freq.astype(np.float32))

    def __call__(self, x: mx.array, position_ids: mx.array, layer_type: str) -> tuple[mx.array, mx.array]:
        freqs = position_ids[..., None].astype(mx.float32) * self._inv_freq[layer_type]
        emb = mx.concatenate([freqs, freqs], axis=-1)
        return mx.cos(emb).astype(x.dtype), mx.sin(emb).astype(x.dtype)


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, H, L, D]; cos / sin [B, L, D], broadcast over heads."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Gemma3Attention(nn.Module):
    """The same for both layer kinds: the kind decides only the mask and RoPE table it is handed."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        hidden, self.head_dim = config["hidden_size"], config["head_dim"]
        self.heads, self.kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.heads} query heads do not share {self.kv_heads} key/value heads evenly")
        bias = bool(config["attention_bias"])
        self.scaling = float(config["query_pre_attn_scalar"]) ** -0.5
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=bias)
        self.q_norm = Gemma3RMSNorm(self.head_dim, config["rms_norm_eps"])
        self.k_norm = Gemma3RMSNorm(self.head_dim, config["rms_norm_eps"])

    def __call__(self, hidden_states: mx.array, position_embeddings: tuple[mx.array, mx.array],
                 attention_mask: mx.array | None = None, position_ids: mx.array | None = None,
                 past_key_values: None = None) -> mx.array:
        """transformers' arguments. `attention_mask`: boolean [B, 1, Lq, Lk], True = attend (this
        layer kind's, window included), or None for a plain causal mask; no cache."""
        if past_key_values is not None:
            raise ValueError("the Gemma 3 port has no key/value cache")
        batch, length, _ = hidden_states.shape

        def heads(x: mx.array, count: int) -> mx.array:
            return x.reshape(batch, length, count, self.head_dim).transpose(0, 2, 1, 3)

        q = self.q_norm(heads(self.q_proj(hidden_states), self.heads))
        k = self.k_norm(heads(self.k_proj(hidden_states), self.kv_heads))
        v = heads(self.v_proj(hidden_states), self.kv_heads)
        cos, sin = position_embeddings
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        groups = self.heads // self.kv_heads
        if groups > 1:  # each key/value head serves `groups` consecutive query heads
            k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
        if attention_mask is None:
            out = attention(q, k, v, self.scaling, "causal")
        else:
            mask = attention_mask.astype(mx.bool_)
            out = attention(q, k, v, self.scaling, mask)
            out = mx.where(mx.any(mask, axis=-1, keepdims=True), out, mx.array(0, out.dtype))
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class Gemma3MLP(nn.Module):
    """down(act(gate x) * up x)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = GELUTanh()  # transformers' gelu_pytorch_tanh

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: dict[str, Any]):
        super().__init__()
        hidden, eps = config["hidden_size"], config["rms_norm_eps"]
        self.self_attn = Gemma3Attention(config)
        self.mlp = Gemma3MLP(hidden, config["intermediate_size"])
        self.input_layernorm = Gemma3RMSNorm(hidden, eps)
        self.post_attention_layernorm = Gemma3RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(hidden, eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(hidden, eps)

    def __call__(self, hidden_states: mx.array, position_embeddings: tuple[mx.array, mx.array],
                 attention_mask: mx.array | None = None, position_ids: mx.array | None = None,
                 past_key_values: None = None) -> mx.array:
        attended = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, past_key_values=past_key_values)
        hidden_states = hidden_states + self.post_attention_layernorm(attended)
        fed = self.mlp(self.pre_feedforward_layernorm(hidden_states))
        return hidden_states + self.post_feedforward_layernorm(fed)


class Gemma3TextModel(nn.Module):
    """Token ids (+ padding mask) -> the last hidden state; `hidden_states` gives all of them."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        config = {key: config.get(key, default) for key, default in _DEFAULTS.items()} | {
            k: v for k, v in config.items() if k in ("layer_types", "sliding_window_pattern", "rope_parameters",
                                                     "rope_scaling", "rope_theta", "rope_local_base_freq")}
        if config["hidden_activation"] not in _ACTIVATIONS:
            raise ValueError(f"hidden_activation '{config['hidden_activation']}': only the tanh GELU (Gemma 3's) is ported")
        if config["attn_logit_softcapping"] is not None:
            raise ValueError("attn_logit_softcapping: Gemma 2's logit soft-capping is not ported (Gemma 3 has none)")
        if config["use_bidirectional_attention"]:
            raise ValueError("use_bidirectional_attention: only the causal Gemma 3 (LTX-2's text encoder) is ported")
        self.layer_types = layer_types(config)
        self.sliding_window = int(config["sliding_window"])
        self.embed_tokens = Gemma3TextScaledWordEmbedding(config["vocab_size"], config["hidden_size"])
        self.layers = [Gemma3DecoderLayer(config) for _ in self.layer_types]
        self.norm = Gemma3RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        self.rotary_emb = Gemma3RotaryEmbedding(config["head_dim"], rope_parameters(config))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Gemma3TextModel":
        """From a transformers Gemma3TextConfig dict (transformers 5's keys or 4.50's)."""
        return cls(config)

    def masks(self, attention_mask: mx.array | None, length: int) -> dict[str, mx.array | None]:
        """Boolean [B, 1, L, L] masks per layer kind (True = attend): causal, padded keys hidden,
        and for sliding layers only keys with q - k < sliding_window. Without padding a global
        layer needs no array (plain causal)."""
        q = mx.arange(length)[:, None]
        k = mx.arange(length)[None, :]
        causal = k <= q
        window = causal & (k > q - self.sliding_window)
        if attention_mask is None:
            return {FULL: None, SLIDING: window[None, None]}
        keys = (attention_mask != 0)[:, None, None, :]
        return {FULL: causal[None, None] & keys, SLIDING: window[None, None] & keys}

    def hidden_states(self, input_ids: mx.array | None = None, attention_mask: mx.array | None = None,
                      position_ids: mx.array | None = None, inputs_embeds: mx.array | None = None) -> list[mx.array]:
        """num_hidden_layers + 1 states, each [B, L, hidden]: what transformers returns with
        output_hidden_states (the last one after the final norm)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        length = hidden.shape[1]
        if position_ids is None:
            position_ids = mx.arange(length)[None]
        masks = self.masks(attention_mask, length)
        rope = {kind: self.rotary_emb(hidden, position_ids, kind) for kind in set(self.layer_types)}
        states = [hidden]
        for layer, kind in zip(self.layers, self.layer_types):
            hidden = layer(hidden, position_embeddings=rope[kind], attention_mask=masks[kind],
                           position_ids=position_ids)
            states.append(hidden)
        states[-1] = self.norm(hidden)
        return states

    def stacked_hidden_states(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """[B, L, hidden, num_hidden_layers + 1]: the states stacked on a last axis, as LTX-2's
        pipeline stacks them (it then flattens the last two axes, hidden-major)."""
        return mx.stack(self.hidden_states(input_ids, attention_mask), axis=-1)

    def __call__(self, input_ids: mx.array | None = None, attention_mask: mx.array | None = None,
                 position_ids: mx.array | None = None, inputs_embeds: mx.array | None = None,
                 use_cache: bool | None = None) -> mx.array:
        """transformers' arguments; `use_cache` asks for a generation cache, which a single
        encoding pass never reads (the port keeps none)."""
        return self.hidden_states(input_ids, attention_mask, position_ids, inputs_embeds)[-1]

