"""The Wan video DiT in MLX, mirroring diffusers' `WanTransformer3DModel` name for name
(Wan 2.1 T2V / I2V, Wan 2.2 TI2V and each A14B expert).

Latents go in and come out channels-last, (batch, frames, height, width, channels); every other
tensor has diffusers' layout. Modulation, layer norms and residual sums run in float32 as
diffusers does (it keeps those in float32 even for a bfloat16 model).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.wan_attention import WanAttention
from vidport.runtime.wan_embeddings import FeedForward, FP32LayerNorm, WanTimeTextImageEmbedding
from vidport.runtime.wan_rope import WanRotaryPosEmbed

F32 = mx.float32


class PatchEmbedding(nn.Conv3d):
    """The patchify Conv3d (kernel = stride = patch size), channels-last: weights [out, t, h, w, in]."""

    channels_last = True


def _modulation(table: mx.array, temb: mx.array, parts: int) -> list[mx.array]:
    """table [1, parts, dim] + temb, in float32, cut into `parts` tensors that broadcast against
    [batch, tokens, dim]: temb [batch, parts, dim] (one timestep per sample) or
    [batch, tokens, parts, dim] (Wan 2.2 TI2V: one per token)."""
    if temb.ndim == 4:
        mod = table.astype(F32)[None] + temb.astype(F32)
        return [mod[:, :, i] for i in range(parts)]
    mod = table.astype(F32) + temb.astype(F32)
    return [mod[:, i : i + 1] for i in range(parts)]


class WanTransformerBlock(nn.Module):
    """Self-attention (3D RoPE), cross-attention to text (and image), GELU MLP; the timestep
    modulates the first and last through a learned `scale_shift_table` [1, 6, dim]."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, qk_norm: str | None = "rms_norm_across_heads",
                 cross_attn_norm: bool = False, eps: float = 1e-6, added_kv_proj_dim: int | None = None):
        super().__init__()
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm {qk_norm!r} is not supported (Wan uses 'rms_norm_across_heads')")
        head_dim = dim // num_heads
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, num_heads, head_dim, eps)
        self.attn2 = WanAttention(dim, num_heads, head_dim, eps, added_kv_proj_dim=added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, ffn_dim, approximate="tanh")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = mx.zeros((1, 6, dim))

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array, temb: mx.array,
                 rotary_emb: tuple[mx.array, mx.array]) -> mx.array:
        return self.around(hidden_states, temb, lambda norm: self.attn1(norm, None, None, rotary_emb),
                           lambda norm: self.attn2(norm, encoder_hidden_states, None, None))

    def around(self, hidden_states: mx.array, temb: mx.array, self_attention: Callable[[mx.array], mx.array],
               cross_attention: Callable[[mx.array], mx.array]) -> mx.array:
        """The block around its two attentions, given as functions of their normed input: the
        causal DiT (runtime.causal_wan) passes ones that read and fill its caches."""
        dtype = hidden_states.dtype
        shift, scale, gate, c_shift, c_scale, c_gate = _modulation(self.scale_shift_table, temb, 6)

        norm = (self.norm1(hidden_states.astype(F32)) * (1 + scale) + shift).astype(dtype)
        attn = self_attention(norm)
        hidden_states = (hidden_states.astype(F32) + attn * gate).astype(dtype)

        norm = self.norm2(hidden_states.astype(F32)).astype(dtype)
        hidden_states = hidden_states + cross_attention(norm)

        norm = (self.norm3(hidden_states.astype(F32)) * (1 + c_scale) + c_shift).astype(dtype)
        ff = self.ffn(norm)
        return (hidden_states.astype(F32) + ff.astype(F32) * c_gate).astype(dtype)


class WanTransformer3DModel(nn.Module):
    """Takes diffusers' config (`from_config`) and diffusers' call:
    model(latents [B, F, H, W, C], timestep [B] or [B, tokens], text context [B, 512, text_dim],
    image context [B, 257, image_dim] for Wan 2.1 I2V) -> [B, F, H, W, out_channels]."""

    channels_last = ("hidden_states",)

    def __init__(self, patch_size: tuple[int, int, int] | list[int] = (1, 2, 2), num_attention_heads: int = 40,
                 attention_head_dim: int = 128, in_channels: int = 16, out_channels: int | None = 16,
                 text_dim: int = 4096, freq_dim: int = 256, ffn_dim: int = 13824, num_layers: int = 40,
                 cross_attn_norm: bool = True, qk_norm: str | None = "rms_norm_across_heads", eps: float = 1e-6,
                 image_dim: int | None = None, added_kv_proj_dim: int | None = None, rope_max_seq_len: int = 1024,
                 pos_embed_seq_len: int | None = None):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        self._patch_size = tuple(patch_size)
        self.out_channels = out_channels

        self.rope = WanRotaryPosEmbed(attention_head_dim, self._patch_size, rope_max_seq_len)
        self.patch_embedding = PatchEmbedding(in_channels, inner, self._patch_size, stride=self._patch_size)
        self.condition_embedder = WanTimeTextImageEmbedding(inner, freq_dim, inner * 6, text_dim, image_dim,
                                                            pos_embed_seq_len)
        self.blocks = [WanTransformerBlock(inner, ffn_dim, num_attention_heads, qk_norm, cross_attn_norm, eps,
                                           added_kv_proj_dim) for _ in range(num_layers)]
        self.norm_out = FP32LayerNorm(inner, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner, out_channels * math.prod(self._patch_size))
        self.scale_shift_table = mx.zeros((1, 2, inner))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "WanTransformer3DModel":
        return cls(**config)

    def __call__(self, hidden_states: mx.array, timestep: mx.array, encoder_hidden_states: mx.array,
                 encoder_hidden_states_image: mx.array | None = None) -> mx.array:
        batch, frames, height, width, _ = hidden_states.shape
        p_t, p_h, p_w = self._patch_size
        grid = (frames // p_t, height // p_h, width // p_w)

        rotary_emb = self.rope(hidden_states)
        x = self.patch_embedding(hidden_states)
        x = x.reshape(batch, -1, x.shape[-1])  # tokens in (frame, row, column) order

        timestep = mx.array(timestep) if not isinstance(timestep, mx.array) else timestep
        per_token = timestep.shape[1] if timestep.ndim == 2 else None
        temb, timestep_proj, context, image_context = self.condition_embedder(
            timestep.reshape(-1), encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=per_token)
        timestep_proj = timestep_proj.reshape(*timestep_proj.shape[:-1], 6, -1)
        if image_context is not None:
            context = mx.concatenate([image_context, context], axis=1)

        for block in self.blocks:
            x = block(x, context, timestep_proj, rotary_emb)

        return self.unpatchify(self.head(x, temb), grid)

    def head(self, x: mx.array, temb: mx.array) -> mx.array:
        """The output norm modulated by temb ([B, dim], or [B, tokens, dim] per token), projected."""
        shift, scale = _modulation(self.scale_shift_table, temb[..., None, :], 2)
        x = (self.norm_out(x.astype(F32)) * (1 + scale) + shift).astype(x.dtype)
        return self.proj_out(x)

    def unpatchify(self, x: mx.array, grid: tuple[int, int, int]) -> mx.array:
        """[B, tokens, p_t * p_h * p_w * C] -> channels-last latents [B, F, H, W, C]."""
        (f, h, w), (p_t, p_h, p_w) = grid, self._patch_size
        x = x.reshape(x.shape[0], f, h, w, p_t, p_h, p_w, self.out_channels)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(x.shape[0], f * p_t, h * p_h, w * p_w, self.out_channels)
