"""The CLIP text encoder in MLX, mirroring transformers' `CLIPTextModel` tree name for name.

Token ids (batch, length) -> hidden states (batch, length, hidden): token + position embeddings,
pre-norm transformer layers with causal self-attention, a final layer norm. SD 1.x conditions
its UNet on the last hidden state; the pooled output is the state at the end-of-text token.
"""
from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.layers import attend_heads, sigmoid


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with (`quick_gelu`)."""

    def __call__(self, x: mx.array) -> mx.array:
        return x * sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_positions, hidden_size)
        self.max_positions = max_positions

    def __call__(self, input_ids: mx.array, position_ids: mx.array | None = None) -> mx.array:
        length = input_ids.shape[-1]
        if length > self.max_positions:
            raise ValueError(f"{length} tokens exceed the text encoder's {self.max_positions} positions")
        if position_ids is None:
            position_ids = mx.arange(length)[None]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPAttention(nn.Module):
    """Multi-head self-attention. `attention_mask` (additive or boolean, broadcastable to
    (batch, heads, length, length)) replaces the causal mask when given, as transformers does."""

    def __init__(self, hidden_size: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (hidden_size // heads) ** -0.5
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def __call__(self, hidden_states: mx.array, attention_mask: mx.array | None = None,
                 is_causal: bool = False) -> mx.array:
        length = hidden_states.shape[1]
        mask = attention_mask if attention_mask is not None else ("causal" if is_causal and length > 1 else None)
        out = attend_heads(self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                           self.heads, self.scale, mask)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"hidden_act '{activation}' is not supported; known: {', '.join(ACTIVATIONS)}")
        self.activation_fn = ACTIVATIONS[activation]()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, heads: int, activation: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, heads)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, activation)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def __call__(self, hidden_states: mx.array, attention_mask: mx.array | None = None,
                 is_causal: bool = False) -> mx.array:
        hidden_states = hidden_states + self.self_attn(hidden_states=self.layer_norm1(hidden_states),
                                                       attention_mask=attention_mask, is_causal=is_causal)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class CLIPEncoder(nn.Module):
    def __init__(self, layers: int, **layer_args: Any):
        super().__init__()
        self.layers = [CLIPEncoderLayer(**layer_args) for _ in range(layers)]

    def __call__(self, inputs_embeds: mx.array, attention_mask: mx.array | None = None,
                 is_causal: bool = False) -> mx.array:
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, is_causal=is_causal)
        return hidden_states


def causal_padding_mask(attention_mask: mx.array) -> mx.array:
    """(batch, length) 1 = token, 0 = padding -> a boolean (batch, 1, length, length) mask that
    lets each token see itself, earlier tokens, and no padding."""
    length = attention_mask.shape[-1]
    causal = mx.tril(mx.ones((length, length), dtype=mx.bool_))
    return causal[None, None] & (attention_mask[:, None, None, :] > 0)


# CLIPTextConfig arguments this port reads; its defaults are transformers' own.
_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5, "eos_token_id": 49407}


class CLIPTextModel(nn.Module):
    """Token ids -> (last hidden state, pooled output)."""

    def __init__(self, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int, max_position_embeddings: int, hidden_act: str, layer_norm_eps: float,
                 eos_token_id: int):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.encoder = CLIPEncoder(num_hidden_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   heads=num_attention_heads, activation=hidden_act, eps=layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.eos_token_id = eos_token_id

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CLIPTextModel":
        """From a transformers CLIPTextConfig dict (its other entries, such as dropout or
        `architectures`, do not change inference)."""
        return cls(**{key: config.get(key, default) for key, default in _DEFAULTS.items()})

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None,
                 position_ids: mx.array | None = None) -> tuple[mx.array, mx.array]:
        hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        mask = None if attention_mask is None else causal_padding_mask(attention_mask)
        hidden_states = self.encoder(inputs_embeds=hidden_states, attention_mask=mask, is_causal=True)
        last_hidden_state = self.final_layer_norm(hidden_states)
        return last_hidden_state, self.pool(last_hidden_state, input_ids)

    def pool(self, last_hidden_state: mx.array, input_ids: mx.array) -> mx.array:
        """The state at the first end-of-text token; configs that name token 2 as end-of-text
        (SD 1.x's, from before transformers fixed it) take the highest token id, as transformers does."""
        if self.eos_token_id == 2:
            positions = mx.argmax(input_ids, axis=-1)
        else:
            positions = mx.argmax((input_ids == self.eos_token_id).astype(mx.int32), axis=-1)
        return mx.take_along_axis(last_hidden_state, positions[:, None, None], axis=1)[:, 0]
