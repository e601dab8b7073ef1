"""LTX-2's text connectors in MLX, mirroring diffusers' `LTX2TextConnectors` module for module.

The text encoder's hidden states (every Gemma 3 layer, embeddings included, stacked on a last
axis) are normalised and projected: LTX-2.0 normalises each prompt's layers by their masked mean
and range and projects once for both streams; LTX-2.3 RMS-normalises each token's layers and
projects per stream. Each stream's connector then moves the prompt's tokens to the front, fills
the rest with its learnable registers, and runs a few transformer blocks with a 1-D RoPE over
the whole (now unmasked) sequence. The video stream's output is zeroed where the returned mask
is 0; with registers that mask is all ones.
"""
from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vidport.runtime.layers import attend_heads, gelu_tanh, sigmoid

F32 = mx.float32


class RMSNorm(nn.Module):
    """torch.nn.RMSNorm: with a scale (`elementwise_affine`) or without parameters."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight if "weight" in self else None, self.eps)


class LTX2RotaryPosEmbed1d(nn.Module):
    """(cos, sin) of a 1-D RoPE over token positions 0..pos-1, as fractions of `base_seq_len`.
    The frequency ladder theta ** linspace(0, 1) * pi / 2 is computed in float64 when
    `double_precision` (then rounded to float32, as diffusers does); "interleaved" gives
    [B, T, dim] tables with each frequency twice, "split" [B, heads, T, head_dim / 2]."""

    def __init__(self, dim: int, base_seq_len: int = 4096, theta: float = 10000.0, double_precision: bool = True,
                 rope_type: str = "interleaved", num_attention_heads: int = 32):
        super().__init__()
        if rope_type not in ("interleaved", "split"):
            raise ValueError(f"rope_type {rope_type!r}: LTX-2 connectors use 'interleaved' or 'split'")
        self.dim, self.base_seq_len, self.rope_type, self.heads = dim, base_seq_len, rope_type, num_attention_heads
        precision = np.float64 if double_precision else np.float32
        ladder = np.power(precision(theta), np.linspace(0.0, 1.0, dim // 2, dtype=precision))
        self._freqs = mx.array((ladder * precision(math.pi) / precision(2.0)).astype(np.float32))

    def __call__(self, batch_size: int, pos: int, device: Any = None) -> tuple[mx.array, mx.array]:
        """diffusers' signature; `device` is torch's and means nothing here."""
        grid = mx.arange(pos, dtype=F32) / self.base_seq_len
        freqs = (grid[:, None] * 2 - 1) * self._freqs  # [T, dim // 2]
        freqs = mx.broadcast_to(freqs[None], (batch_size, *freqs.shape))
        cos, sin = mx.cos(freqs), mx.sin(freqs)
        if self.rope_type == "interleaved":
            cos, sin = mx.repeat(cos, 2, axis=-1), mx.repeat(sin, 2, axis=-1)
            pad = self.dim % 2
            if pad:
                cos = mx.concatenate([mx.ones((*cos.shape[:2], pad), F32), cos], axis=-1)
                sin = mx.concatenate([mx.zeros((*sin.shape[:2], pad), F32), sin], axis=-1)
            return cos, sin
        split = (batch_size, pos, self.heads, -1)
        return cos.reshape(split).transpose(0, 2, 1, 3), sin.reshape(split).transpose(0, 2, 1, 3)


def apply_interleaved_rotary_emb(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate channel pairs (2i, 2i+1) of [B, T, C] in float32."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = mx.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (x.astype(F32) * cos + rotated.astype(F32) * sin).astype(x.dtype)


def apply_split_rotary_emb(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate (first half, second half) of each head of [B, T, heads * D] by [B, heads, T, D / 2]."""
    batch, heads, tokens, half = cos.shape
    heads_x = x.reshape(batch, tokens, heads, -1).transpose(0, 2, 1, 3).astype(F32)
    first, second = heads_x[..., :half], heads_x[..., half:]
    out = mx.concatenate([first * cos - sin * second, second * cos + sin * first], axis=-1)
    return out.transpose(0, 2, 1, 3).reshape(batch, tokens, -1).astype(x.dtype)


class LTX2Attention(nn.Module):
    """diffusers' `LTX2Attention` with `LTX2AudioVideoAttnProcessor`, as the connectors use it:
    self-attention, q/k RMS-normalised across heads, then rotated; LTX-2.3 gates each head's
    output by 2 * sigmoid(a logit of the block's input)."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, rope_type: str = "interleaved",
                 apply_gated_attention: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.rope_type, self.scale = heads, rope_type, dim_head**-0.5
        self.norm_q = RMSNorm(inner, eps=norm_eps)
        self.norm_k = RMSNorm(inner, eps=norm_eps)
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(query_dim, inner)
        self.to_v = nn.Linear(query_dim, inner)
        self.to_out = [nn.Linear(inner, query_dim), nn.Dropout(0.0)]
        if apply_gated_attention:
            self.to_gate_logits = nn.Linear(query_dim, heads)

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: None = None,
                 attention_mask: mx.array | None = None,
                 query_rotary_emb: tuple[mx.array, mx.array] | None = None) -> mx.array:
        if encoder_hidden_states is not None:
            raise ValueError("the connectors' attention is self-attention only")
        q = self.norm_q(self.to_q(hidden_states))
        k = self.norm_k(self.to_k(hidden_states))
        v = self.to_v(hidden_states)
        if query_rotary_emb is not None:
            rotate = apply_interleaved_rotary_emb if self.rope_type == "interleaved" else apply_split_rotary_emb
            q, k = rotate(q, *query_rotary_emb), rotate(k, *query_rotary_emb)
        out = attend_heads(q, k, v, self.heads, self.scale, attention_mask)
        if "to_gate_logits" in self:
            gates = 2.0 * sigmoid(self.to_gate_logits(hidden_states))  # [B, T, heads]
            out = (out.reshape(*out.shape[:2], self.heads, -1) * gates[..., None]).reshape(out.shape)
        return self.to_out[1](self.to_out[0](out))


class GELU(nn.Module):
    """diffusers' GELU module: a projection, then the tanh-approximate GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def __call__(self, hidden_states: mx.array) -> mx.array:
        return gelu_tanh(self.proj(hidden_states))


class FeedForward(nn.Module):
    """diffusers' FeedForward(dim, activation_fn="gelu-approximate"): net = [GELU, Dropout, Linear]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = [GELU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]

    def __call__(self, hidden_states: mx.array) -> mx.array:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class LTX2TransformerBlock1d(nn.Module):
    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6,
                 rope_type: str = "interleaved", apply_gated_attention: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps=eps, elementwise_affine=False)
        self.attn1 = LTX2Attention(dim, num_attention_heads, attention_head_dim, rope_type, apply_gated_attention)
        self.norm2 = RMSNorm(dim, eps=eps, elementwise_affine=False)
        self.ff = FeedForward(dim)

    def __call__(self, hidden_states: mx.array, attention_mask: mx.array | None = None,
                 rotary_emb: tuple[mx.array, mx.array] | None = None) -> mx.array:
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states), attention_mask=attention_mask,
                                                   query_rotary_emb=rotary_emb)
        return hidden_states + self.ff(self.norm2(hidden_states))


class LTX2ConnectorTransformer1d(nn.Module):
    """One stream's connector: registers in place of padding, the blocks, a final RMS norm;
    returns the hidden states and the additive mask the blocks used (all zeros with registers)."""

    def __init__(self, num_attention_heads: int = 30, attention_head_dim: int = 128, num_layers: int = 2,
                 num_learnable_registers: int | None = 128, rope_base_seq_len: int = 4096,
                 rope_theta: float = 10000.0, rope_double_precision: bool = True, eps: float = 1e-6,
                 rope_type: str = "interleaved", gated_attention: bool = False):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.num_learnable_registers = num_learnable_registers
        if num_learnable_registers is not None:
            self.learnable_registers = mx.zeros((num_learnable_registers, inner))
        self.rope = LTX2RotaryPosEmbed1d(inner, rope_base_seq_len, rope_theta, rope_double_precision, rope_type,
                                         num_attention_heads)
        self.transformer_blocks = [
            LTX2TransformerBlock1d(inner, num_attention_heads, attention_head_dim, rope_type=rope_type,
                                   apply_gated_attention=gated_attention)
            for _ in range(num_layers)]
        self.norm_out = RMSNorm(inner, eps=eps, elementwise_affine=False)

    def replace_padding(self, hidden_states: mx.array, attention_mask: mx.array,
                        threshold: float = -9000.0) -> mx.array:
        """The valid tokens (additive mask >= threshold) moved to the front in their order, every
        position after them the register of that absolute position (registers tiled over T)."""
        batch, tokens, width = hidden_states.shape
        if tokens % self.num_learnable_registers:
            raise ValueError(f"The `hidden_states` sequence length {tokens} should be divisible by the number of "
                             f"learnable registers {self.num_learnable_registers}")
        registers = mx.tile(self.learnable_registers, (tokens // self.num_learnable_registers, 1))
        valid = (attention_mask.reshape(batch, tokens) >= threshold).astype(mx.int32)
        positions = mx.arange(tokens)
        order = mx.argsort((1 - valid) * tokens + positions[None], axis=1)  # valid first, each group in order
        front = mx.take_along_axis(hidden_states, order[..., None], axis=1)
        in_front = (positions[None] < valid.sum(axis=1, keepdims=True))[..., None]
        return mx.where(in_front, front, registers[None].astype(hidden_states.dtype))

    def __call__(self, hidden_states: mx.array, attention_mask: mx.array | None = None,
                 attn_mask_binarize_threshold: float = -9000.0) -> tuple[mx.array, mx.array]:
        batch, tokens, _ = hidden_states.shape
        if self.num_learnable_registers is not None:
            hidden_states = self.replace_padding(hidden_states, attention_mask, attn_mask_binarize_threshold)
            attention_mask = mx.zeros_like(attention_mask)
        rotary_emb = self.rope(batch, tokens)
        for block in self.transformer_blocks:
            hidden_states = block(hidden_states, attention_mask=attention_mask, rotary_emb=rotary_emb)
        return self.norm_out(hidden_states), attention_mask


def per_layer_masked_mean_norm(states: mx.array, lengths: mx.array, padding_side: str = "left",
                               scale_factor: float = 8, eps: float = 1e-6) -> mx.array:
    """LTX-2.0: each prompt's layers centred on their mean over the prompt's tokens and channels
    and divided by their range there, times `scale_factor`; [B, T, C, L] -> [B, T, C * L], padding 0."""
    batch, tokens, channels, layers = states.shape
    index = mx.arange(tokens)[None]
    if padding_side == "right":
        mask = index < lengths[:, None]
    elif padding_side == "left":
        mask = index >= tokens - lengths[:, None]
    else:
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side}")
    mask4 = mask[:, :, None, None]
    total = mx.where(mask4, states, 0).sum(axis=(1, 2), keepdims=True)
    mean = total / ((lengths * channels).reshape(batch, 1, 1, 1) + eps)
    low = mx.where(mask4, states, mx.inf).min(axis=(1, 2), keepdims=True)
    high = mx.where(mask4, states, -mx.inf).max(axis=(1, 2), keepdims=True)
    normed = (states - mean) / (high - low + eps) * scale_factor
    normed = mx.where(mask[:, :, None], normed.reshape(batch, tokens, channels * layers), 0)
    return normed.astype(states.dtype)


def per_token_rms_norm(states: mx.array, eps: float = 1e-6) -> mx.array:
    """LTX-2.3: each token's layer RMS-normalised over its channels (axis 2 of [B, T, C, L])."""
    return states * mx.rsqrt(mx.mean(states * states, axis=2, keepdims=True) + eps)


class LTX2TextConnectors(nn.Module):
    """Takes and returns what diffusers' does: the stacked hidden states [B, T, C * L] (or
    [B, T, C, L]) and the tokenizer's 0/1 mask [B, T] -> (video text embeddings, audio text
    embeddings, the 0/1 mask of the video embeddings)."""

    def __init__(self, caption_channels: int = 3840, text_proj_in_factor: int = 49,
                 video_connector_num_attention_heads: int = 30, video_connector_attention_head_dim: int = 128,
                 video_connector_num_layers: int = 2, video_connector_num_learnable_registers: int | None = 128,
                 video_gated_attn: bool = False, audio_connector_num_attention_heads: int = 30,
                 audio_connector_attention_head_dim: int = 128, audio_connector_num_layers: int = 2,
                 audio_connector_num_learnable_registers: int | None = 128, audio_gated_attn: bool = False,
                 connector_rope_base_seq_len: int = 4096, rope_theta: float = 10000.0,
                 rope_double_precision: bool = True, causal_temporal_positioning: bool = False,
                 rope_type: str = "interleaved", per_modality_projections: bool = False,
                 video_hidden_dim: int = 4096, audio_hidden_dim: int = 2048, proj_bias: bool = False):
        super().__init__()
        self.caption_channels, self.per_modality_projections = caption_channels, per_modality_projections
        self.video_hidden_dim, self.audio_hidden_dim = video_hidden_dim, audio_hidden_dim
        width = caption_channels * text_proj_in_factor
        if per_modality_projections:
            self.video_text_proj_in = nn.Linear(width, video_hidden_dim, bias=proj_bias)
            self.audio_text_proj_in = nn.Linear(width, audio_hidden_dim, bias=proj_bias)
        else:
            self.text_proj_in = nn.Linear(width, caption_channels, bias=proj_bias)
        rope = {"rope_base_seq_len": connector_rope_base_seq_len, "rope_theta": rope_theta,
                "rope_double_precision": rope_double_precision, "rope_type": rope_type}
        self.video_connector = LTX2ConnectorTransformer1d(
            video_connector_num_attention_heads, video_connector_attention_head_dim, video_connector_num_layers,
            video_connector_num_learnable_registers, gated_attention=video_gated_attn, **rope)
        self.audio_connector = LTX2ConnectorTransformer1d(
            audio_connector_num_attention_heads, audio_connector_attention_head_dim, audio_connector_num_layers,
            audio_connector_num_learnable_registers, gated_attention=audio_gated_attn, **rope)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LTX2TextConnectors":
        return cls(**config)

    def __call__(self, text_encoder_hidden_states: mx.array, attention_mask: mx.array, padding_side: str = "left",
                 scale_factor: int = 8) -> tuple[mx.array, mx.array, mx.array]:
        states = text_encoder_hidden_states
        if states.ndim == 3:
            states = states.reshape(*states.shape[:2], self.caption_channels, -1)
        batch, tokens = attention_mask.shape
        if self.per_modality_projections:
            normed = per_token_rms_norm(states).reshape(batch, tokens, -1)
            normed = mx.where(attention_mask.astype(mx.bool_)[..., None], normed, 0).astype(states.dtype)
            video = self.video_text_proj_in(normed * math.sqrt(self.video_hidden_dim / self.caption_channels))
            audio = self.audio_text_proj_in(normed * math.sqrt(self.audio_hidden_dim / self.caption_channels))
        else:
            normed = per_layer_masked_mean_norm(states, attention_mask.sum(axis=-1), padding_side, scale_factor)
            video = audio = self.text_proj_in(normed)

        dtype = video.dtype
        additive = (attention_mask.astype(mx.int32) - 1).astype(dtype).reshape(batch, 1, -1, tokens)
        additive = additive * mx.finfo(dtype).max
        video, video_mask = self.video_connector(video, additive)
        binary = (video_mask < 1e-6).astype(mx.int32).reshape(batch, tokens, 1)
        video = video * binary.astype(video.dtype)
        audio, _ = self.audio_connector(audio, additive)
        return video, audio, binary.squeeze(-1)
