"""The LTX-2 audio-video DiT in MLX, mirroring diffusers' `LTX2VideoTransformer3DModel` name for name
(LTX-2 19B dev / distilled, LTX-2.3).

Both streams are patch-token sequences as diffusers takes them: video [B, tokens, in_channels]
(the pipeline packs the latents), audio [B, audio tokens, audio_in_channels]. Each block runs
self-attention, text cross-attention, audio-to-video and video-to-audio cross-attention and a
feed-forward on each stream, all AdaLN-modulated by the timesteps. `use_cross_timestep` (the
config's: LTX-2.0 False, LTX-2.3 True; a call may override it) says whether the cross-modal
modulation follows the other stream's sigma or the stream's own timestep.
"""
from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from vidport.runtime.causal_wan import ALL_TOKENS, AllTokens
from vidport.runtime.ltx2.dit_attention import FeedForward, LTX2AdaLayerNormSingle, LTX2Attention, RMSNorm
from vidport.runtime.ltx2.rope import LTX2AudioVideoRotaryPosEmbed
from vidport.runtime.wan_embeddings import PixArtAlphaTextProjection

Rotary = tuple[mx.array, mx.array]


def _mod_params(table: mx.array, temb: mx.array) -> list[mx.array]:
    """table [n, D] + temb [B, T', n * D] -> n tensors [B, T', D] (T' = 1 or one per token)."""
    rows = table.shape[0]
    values = table[None, None] + temb.reshape(*temb.shape[:2], rows, -1)
    return [values[:, :, i] for i in range(rows)]


def _array(value: Any) -> mx.array:
    return value if isinstance(value, mx.array) else mx.array(np.asarray(value))


class LTX2VideoTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, cross_attention_dim: int,
                 audio_dim: int, audio_num_attention_heads: int, audio_attention_head_dim: int,
                 audio_cross_attention_dim: int, video_gated_attn: bool = False, video_cross_attn_adaln: bool = False,
                 audio_gated_attn: bool = False, audio_cross_attn_adaln: bool = False, attention_bias: bool = True,
                 attention_out_bias: bool = True, eps: float = 1e-6, elementwise_affine: bool = False,
                 rope_type: str = "interleaved", ff_bias: bool = True, audio_ff_bias: bool = True,
                 perturbed_attn: bool = False):
        super().__init__()
        self.perturbed_attn = perturbed_attn

        def attn(query_dim, heads, head_dim, context_dim, gated):
            return LTX2Attention(query_dim, heads, heads, head_dim, attention_bias, context_dim, attention_out_bias,
                                 rope_type=rope_type, apply_gated_attention=gated)

        def norm(width):
            return RMSNorm(width, eps, elementwise_affine)

        video = (num_attention_heads, attention_head_dim)
        audio = (audio_num_attention_heads, audio_attention_head_dim)
        self.norm1, self.attn1 = norm(dim), attn(dim, *video, None, video_gated_attn)
        self.audio_norm1, self.audio_attn1 = norm(audio_dim), attn(audio_dim, *audio, None, audio_gated_attn)
        self.norm2, self.attn2 = norm(dim), attn(dim, *video, cross_attention_dim, video_gated_attn)
        self.audio_norm2 = norm(audio_dim)
        self.audio_attn2 = attn(audio_dim, *audio, audio_cross_attention_dim, audio_gated_attn)
        # both cross-modal attentions run at the audio stream's heads
        self.audio_to_video_norm, self.audio_to_video_attn = norm(dim), attn(dim, *audio, audio_dim, video_gated_attn)
        self.video_to_audio_norm = norm(audio_dim)
        self.video_to_audio_attn = attn(audio_dim, *audio, dim, audio_gated_attn)
        self.norm3, self.ff = norm(dim), FeedForward(dim, ff_bias)
        self.audio_norm3, self.audio_ff = norm(audio_dim), FeedForward(audio_dim, audio_ff_bias)

        self.video_cross_attn_adaln, self.audio_cross_attn_adaln = video_cross_attn_adaln, audio_cross_attn_adaln
        self.scale_shift_table = mx.zeros((9 if video_cross_attn_adaln else 6, dim))
        self.audio_scale_shift_table = mx.zeros((9 if audio_cross_attn_adaln else 6, audio_dim))
        self.cross_attn_adaln = video_cross_attn_adaln or audio_cross_attn_adaln
        if self.cross_attn_adaln:
            self.prompt_scale_shift_table = mx.zeros((2, dim))
            self.audio_prompt_scale_shift_table = mx.zeros((2, audio_dim))
        self.video_a2v_cross_attn_scale_shift_table = mx.zeros((5, dim))
        self.audio_a2v_cross_attn_scale_shift_table = mx.zeros((5, audio_dim))

    def _text_attention(self, x: mx.array, context: mx.array, norm: nn.Module, attn: LTX2Attention,
                        query_mod: list[mx.array] | None, prompt_table: mx.array | None,
                        temb_prompt: mx.array | None, mask: mx.array | None) -> mx.array:
        """One stream's text cross-attention; LTX-2.3 modulates the query (and gates the result)
        and the text (by the sigma-conditioned prompt table, or the table alone)."""
        normed = norm(x)
        if query_mod is not None:
            shift_q, scale_q, _ = query_mod
            normed = normed * (1 + scale_q) + shift_q
        if prompt_table is not None:
            shift_kv, scale_kv = (_mod_params(prompt_table, temb_prompt) if temb_prompt is not None
                                  else [prompt_table[None, None, i] for i in range(2)])
            context = context * (1 + scale_kv) + shift_kv
        out = attn(normed, encoder_hidden_states=context, attention_mask=mask)
        return x + (out * query_mod[2] if query_mod is not None else out)

    def __call__(self, hidden_states: mx.array, audio_hidden_states: mx.array, encoder_hidden_states: mx.array,
                 audio_encoder_hidden_states: mx.array, temb: mx.array, temb_audio: mx.array,
                 temb_ca_scale_shift: mx.array, temb_ca_audio_scale_shift: mx.array, temb_ca_gate: mx.array,
                 temb_ca_audio_gate: mx.array, temb_prompt: mx.array | None = None,
                 temb_prompt_audio: mx.array | None = None, video_rotary_emb: Rotary | None = None,
                 audio_rotary_emb: Rotary | None = None, ca_video_rotary_emb: Rotary | None = None,
                 ca_audio_rotary_emb: Rotary | None = None, encoder_attention_mask: mx.array | None = None,
                 audio_encoder_attention_mask: mx.array | None = None, self_attention_mask: mx.array | None = None,
                 audio_self_attention_mask: mx.array | None = None, a2v_cross_attention_mask: mx.array | None = None,
                 v2a_cross_attention_mask: mx.array | None = None, use_a2v_cross_attention: bool = True,
                 use_v2a_cross_attention: bool = True, perturbation_mask: mx.array | None = None,
                 all_perturbed: Any = None, tokens: AllTokens = ALL_TOKENS) -> tuple[mx.array, mx.array]:
        """`tokens`: which video tokens this process holds (the audio stream is whole); the two
        attentions whose keys are video tokens gather every process's."""
        x, a = hidden_states, audio_hidden_states
        video_mod = _mod_params(self.scale_shift_table, temb)
        audio_mod = _mod_params(self.audio_scale_shift_table, temb_audio)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = video_mod[:6]
        a_shift_msa, a_scale_msa, a_gate_msa, a_shift_mlp, a_scale_mlp, a_gate_mlp = audio_mod[:6]
        # STG's value shortcut: only a model with the perturbed processor (LTX-2.3) takes it
        perturb = ({"perturbation_mask": perturbation_mask, "all_perturbed": all_perturbed} if self.perturbed_attn
                   else {})

        # 1. self-attention
        normed = self.norm1(x) * (1 + scale_msa) + shift_msa
        out = self.attn1(normed, None, self_attention_mask, video_rotary_emb, key_tokens=tokens, **perturb)
        x = x + out * gate_msa
        normed = self.audio_norm1(a) * (1 + a_scale_msa) + a_shift_msa
        a = a + self.audio_attn1(normed, None, audio_self_attention_mask, audio_rotary_emb, **perturb) * a_gate_msa

        # 2. text cross-attention
        x = self._text_attention(x, encoder_hidden_states, self.norm2, self.attn2,
                                 video_mod[6:9] if self.video_cross_attn_adaln else None,
                                 self["prompt_scale_shift_table"] if self.cross_attn_adaln else None,
                                 temb_prompt, encoder_attention_mask)
        a = self._text_attention(a, audio_encoder_hidden_states, self.audio_norm2, self.audio_attn2,
                                 audio_mod[6:9] if self.audio_cross_attn_adaln else None,
                                 self["audio_prompt_scale_shift_table"] if self.cross_attn_adaln else None,
                                 temb_prompt_audio, audio_encoder_attention_mask)

        # 3. audio-to-video (q: video, k/v: audio) and video-to-audio (q: audio, k/v: video)
        if use_a2v_cross_attention or use_v2a_cross_attention:
            normed_x, normed_a = self.audio_to_video_norm(x), self.video_to_audio_norm(a)
            v_a2v_scale, v_a2v_shift, v_v2a_scale, v_v2a_shift = _mod_params(
                self.video_a2v_cross_attn_scale_shift_table[:4], temb_ca_scale_shift)
            (a2v_gate,) = _mod_params(self.video_a2v_cross_attn_scale_shift_table[4:], temb_ca_gate)
            a_a2v_scale, a_a2v_shift, a_v2a_scale, a_v2a_shift = _mod_params(
                self.audio_a2v_cross_attn_scale_shift_table[:4], temb_ca_audio_scale_shift)
            (v2a_gate,) = _mod_params(self.audio_a2v_cross_attn_scale_shift_table[4:], temb_ca_audio_gate)
            if use_a2v_cross_attention:
                out = self.audio_to_video_attn(normed_x * (1 + v_a2v_scale) + v_a2v_shift,
                                               normed_a * (1 + a_a2v_scale) + a_a2v_shift,
                                               a2v_cross_attention_mask, ca_video_rotary_emb, ca_audio_rotary_emb)
                x = x + a2v_gate * out
            if use_v2a_cross_attention:
                out = self.video_to_audio_attn(normed_a * (1 + a_v2a_scale) + a_v2a_shift,
                                               normed_x * (1 + v_v2a_scale) + v_v2a_shift,
                                               v2a_cross_attention_mask, ca_audio_rotary_emb, ca_video_rotary_emb,
                                               key_tokens=tokens)
                a = a + v2a_gate * out

        # 4. feed-forward
        x = x + self.ff(self.norm3(x) * (1 + scale_mlp) + shift_mlp) * gate_mlp
        a = a + self.audio_ff(self.audio_norm3(a) * (1 + a_scale_mlp) + a_shift_mlp) * a_gate_mlp
        return x, a


class LTX2VideoTransformer3DModel(nn.Module):
    """Takes diffusers' config (`from_config`; plus `use_cross_timestep`, how the detected version
    runs) and diffusers' call; returns (video, audio) token outputs."""

    def __init__(self, in_channels: int = 128, out_channels: int | None = 128, patch_size: int = 1,
                 patch_size_t: int = 1, num_attention_heads: int = 32, attention_head_dim: int = 128,
                 cross_attention_dim: int = 4096, vae_scale_factors: Sequence[int] = (8, 32, 32),
                 pos_embed_max_pos: int = 20, base_height: int = 2048, base_width: int = 2048,
                 gated_attn: bool = False, cross_attn_mod: bool = False, audio_in_channels: int = 128,
                 audio_out_channels: int | None = 128, audio_patch_size: int = 1, audio_patch_size_t: int = 1,
                 audio_num_attention_heads: int = 32, audio_attention_head_dim: int = 64,
                 audio_cross_attention_dim: int = 2048, audio_scale_factor: int = 4, audio_pos_embed_max_pos: int = 20,
                 audio_sampling_rate: int = 16000, audio_hop_length: int = 160, audio_gated_attn: bool = False,
                 audio_cross_attn_mod: bool = False, num_layers: int = 48, activation_fn: str = "gelu-approximate",
                 qk_norm: str = "rms_norm_across_heads", norm_elementwise_affine: bool = False,
                 norm_eps: float = 1e-6, caption_channels: int = 3840, attention_bias: bool = True,
                 attention_out_bias: bool = True, rope_theta: float = 10000.0, rope_double_precision: bool = True,
                 causal_offset: int = 1, timestep_scale_multiplier: int = 1000,
                 cross_attn_timestep_scale_multiplier: int = 1000, rope_type: str = "interleaved",
                 use_prompt_embeddings: bool = True, perturbed_attn: bool = False, ff_bias: bool = True,
                 audio_ff_bias: bool = True, use_prompt_adaln_single: bool = True,
                 use_keyframes_abs_pos_embedding: bool = False, use_cross_timestep: bool = False):
        super().__init__()
        if activation_fn != "gelu-approximate" or qk_norm != "rms_norm_across_heads":
            raise ValueError(f"activation_fn {activation_fn!r} / qk_norm {qk_norm!r}: LTX-2 uses "
                             "'gelu-approximate' and 'rms_norm_across_heads'")
        inner = num_attention_heads * attention_head_dim
        audio_inner = audio_num_attention_heads * audio_attention_head_dim
        self.use_cross_timestep = use_cross_timestep
        self.use_prompt_embeddings = use_prompt_embeddings
        self.gate_scale = cross_attn_timestep_scale_multiplier / timestep_scale_multiplier

        self.proj_in = nn.Linear(in_channels, inner)
        self.audio_proj_in = nn.Linear(audio_in_channels, audio_inner)
        if use_keyframes_abs_pos_embedding:
            self.keyframes_abs_pos_embedding = mx.zeros((1, inner))
        if use_prompt_embeddings:
            self.caption_projection = PixArtAlphaTextProjection(caption_channels, inner)
            self.audio_caption_projection = PixArtAlphaTextProjection(caption_channels, audio_inner)

        self.time_embed = LTX2AdaLayerNormSingle(inner, 9 if cross_attn_mod else 6)
        self.audio_time_embed = LTX2AdaLayerNormSingle(audio_inner, 9 if audio_cross_attn_mod else 6)
        self.av_cross_attn_video_scale_shift = LTX2AdaLayerNormSingle(inner, 4)
        self.av_cross_attn_audio_scale_shift = LTX2AdaLayerNormSingle(audio_inner, 4)
        self.av_cross_attn_video_a2v_gate = LTX2AdaLayerNormSingle(inner, 1)
        self.av_cross_attn_audio_v2a_gate = LTX2AdaLayerNormSingle(audio_inner, 1)
        self.scale_shift_table = mx.zeros((2, inner))
        self.audio_scale_shift_table = mx.zeros((2, audio_inner))
        self.prompt_modulation = (cross_attn_mod or audio_cross_attn_mod) and use_prompt_adaln_single
        if self.prompt_modulation:
            self.prompt_adaln = LTX2AdaLayerNormSingle(inner, 2)
            self.audio_prompt_adaln = LTX2AdaLayerNormSingle(audio_inner, 2)

        rope = {"theta": rope_theta, "causal_offset": causal_offset, "double_precision": rope_double_precision,
                "rope_type": rope_type}
        video_patch = {"patch_size": patch_size, "patch_size_t": patch_size_t}
        audio_patch = {"patch_size": audio_patch_size, "patch_size_t": audio_patch_size_t,
                       "sampling_rate": audio_sampling_rate, "hop_length": audio_hop_length}
        self.rope = LTX2AudioVideoRotaryPosEmbed(
            inner, **video_patch, base_num_frames=pos_embed_max_pos, base_height=base_height, base_width=base_width,
            scale_factors=vae_scale_factors, modality="video", num_attention_heads=num_attention_heads, **rope)
        self.audio_rope = LTX2AudioVideoRotaryPosEmbed(
            audio_inner, **audio_patch, base_num_frames=audio_pos_embed_max_pos, scale_factors=[audio_scale_factor],
            modality="audio", num_attention_heads=audio_num_attention_heads, **rope)
        # the cross-modal attentions rotate by time alone, on a common time base (diffusers gives
        # the audio one its default scale factors, which time-only coordinates never read)
        cross_max = max(pos_embed_max_pos, audio_pos_embed_max_pos)
        self.cross_attn_rope = LTX2AudioVideoRotaryPosEmbed(
            audio_cross_attention_dim, **video_patch, base_num_frames=cross_max, base_height=base_height,
            base_width=base_width, modality="video", num_attention_heads=num_attention_heads, **rope)
        self.cross_attn_audio_rope = LTX2AudioVideoRotaryPosEmbed(
            audio_cross_attention_dim, **audio_patch, base_num_frames=cross_max, modality="audio",
            num_attention_heads=audio_num_attention_heads, **rope)

        self.transformer_blocks = [
            LTX2VideoTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim, audio_inner,
                                      audio_num_attention_heads, audio_attention_head_dim, audio_cross_attention_dim,
                                      gated_attn, cross_attn_mod, audio_gated_attn, audio_cross_attn_mod,
                                      attention_bias, attention_out_bias, norm_eps, norm_elementwise_affine,
                                      rope_type, ff_bias, audio_ff_bias, perturbed_attn)
            for _ in range(num_layers)]

        self.norm_out = nn.LayerNorm(inner, eps=1e-6, affine=False)
        self.proj_out = nn.Linear(inner, out_channels or in_channels)
        self.audio_norm_out = nn.LayerNorm(audio_inner, eps=1e-6, affine=False)
        self.audio_proj_out = nn.Linear(audio_inner, audio_out_channels or audio_in_channels)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LTX2VideoTransformer3DModel":
        return cls(**config)

    @staticmethod
    def _modulate(x: mx.array, table: mx.array, embedded: mx.array) -> mx.array:
        """The output AdaLN: (shift, scale) = table [2, D] + the embedded timestep [B, T', D]."""
        values = table[None, None] + embedded[:, :, None]
        return x * (1 + values[:, :, 1]) + values[:, :, 0]

    @staticmethod
    def _text_mask(mask: Any, dtype: mx.Dtype) -> mx.array | None:
        """A multiplicative [B, S] mask -> diffusers' additive bias [B, 1, S] (-10000 where masked)."""
        if mask is None:
            return None
        mask = _array(mask)
        return ((1 - mask.astype(dtype)) * -10000.0)[:, None] if mask.ndim == 2 else mask

    def __call__(self, hidden_states: mx.array, audio_hidden_states: mx.array, encoder_hidden_states: mx.array,
                 audio_encoder_hidden_states: mx.array, timestep: Any, audio_timestep: Any = None,
                 sigma: Any = None, audio_sigma: Any = None, encoder_attention_mask: Any = None,
                 audio_encoder_attention_mask: Any = None, num_frames: int | None = None, height: int | None = None,
                 width: int | None = None, fps: float = 24.0, audio_num_frames: int | None = None,
                 video_coords: Any = None, audio_coords: Any = None, isolate_modalities: bool = False,
                 spatio_temporal_guidance_blocks: list[int] | None = None, perturbation_mask: Any = None,
                 use_cross_timestep: bool | None = None, video_self_attention_mask: Any = None,
                 video_keyframes_mask: Any = None, attention_kwargs: None = None,
                 tokens: AllTokens = ALL_TOKENS) -> tuple[mx.array, mx.array]:
        """diffusers' forward. `timestep` [B] or [B, video tokens] (already times 1000); `sigma` /
        `audio_sigma` drive LTX-2.3's prompt modulation and, with `use_cross_timestep`, the
        cross-modal one. `use_cross_timestep=None` takes the config's (the detected version's).
        `tokens`: which video tokens this process computes, with their RoPE tables and per-token
        modulation (all; runtime.parallel_ltx2's sequence plan: this rank's share), the output
        gathered."""
        use_cross_timestep = self.use_cross_timestep if use_cross_timestep is None else use_cross_timestep
        dtype = self.proj_in.weight.dtype
        batch = hidden_states.shape[0]
        timestep = _array(timestep)
        audio_timestep = timestep if audio_timestep is None else _array(audio_timestep)
        sigma = None if sigma is None else _array(sigma)
        audio_sigma = sigma if audio_sigma is None else _array(audio_sigma)
        encoder_attention_mask = self._text_mask(encoder_attention_mask, dtype)
        audio_encoder_attention_mask = self._text_mask(audio_encoder_attention_mask, dtype)
        if video_self_attention_mask is not None:
            video_self_attention_mask = (1 - _array(video_self_attention_mask).astype(dtype)) * -10000.0

        # 1. RoPE tables
        if video_coords is None:
            video_coords = self.rope.prepare_video_coords(batch, num_frames, height, width, fps)
        if audio_coords is None:
            audio_coords = self.audio_rope.prepare_audio_coords(batch, audio_num_frames)
        video_coords, audio_coords = np.asarray(video_coords, np.float32), np.asarray(audio_coords, np.float32)
        video_coords = tokens.part(video_coords, 2)  # [B, axes, tokens, 2]: tables are per token
        video_rotary_emb, audio_rotary_emb = self.rope(video_coords), self.audio_rope(audio_coords)
        ca_video_rotary_emb = self.cross_attn_rope(video_coords[:, 0:1])
        ca_audio_rotary_emb = self.cross_attn_audio_rope(audio_coords[:, 0:1])

        # 2. input projections
        x = self.proj_in(hidden_states)
        a = self.audio_proj_in(audio_hidden_states)
        if "keyframes_abs_pos_embedding" in self and video_keyframes_mask is not None:
            marker = (_array(video_keyframes_mask) > 0).astype(x.dtype)
            x = x + marker * self.keyframes_abs_pos_embedding.astype(x.dtype)
        x = tokens.part(x, 1)

        # 3. timestep modulation: per stream, for the prompt (LTX-2.3) and across streams
        def embed(module: LTX2AdaLayerNormSingle, t: mx.array) -> tuple[mx.array, mx.array]:
            mod, embedded = module(t.reshape(-1))
            return mod.reshape(batch, -1, mod.shape[-1]), embedded.reshape(batch, -1, embedded.shape[-1])

        temb, embedded_timestep = embed(self.time_embed, timestep)
        temb_audio, audio_embedded_timestep = embed(self.audio_time_embed, audio_timestep)
        temb_prompt = temb_prompt_audio = None
        if self.prompt_modulation:
            temb_prompt = embed(self.prompt_adaln, sigma)[0]
            temb_prompt_audio = embed(self.audio_prompt_adaln, audio_sigma)[0]
        video_ca_t = audio_sigma if use_cross_timestep else timestep
        audio_ca_t = sigma if use_cross_timestep else audio_timestep
        video_ca_scale_shift = embed(self.av_cross_attn_video_scale_shift, video_ca_t)[0]
        video_ca_gate = embed(self.av_cross_attn_video_a2v_gate, video_ca_t.astype(mx.float32) * self.gate_scale)[0]
        audio_ca_scale_shift = embed(self.av_cross_attn_audio_scale_shift, audio_ca_t)[0]
        audio_ca_gate = embed(self.av_cross_attn_audio_v2a_gate, audio_ca_t.astype(mx.float32) * self.gate_scale)[0]

        def own(t: mx.array) -> mx.array:  # this process's rows of a per-token tensor (i2v's timesteps)
            return tokens.part(t, 1) if t.shape[1] > 1 else t

        temb, video_ca_scale_shift, video_ca_gate = own(temb), own(video_ca_scale_shift), own(video_ca_gate)
        if video_self_attention_mask is not None:
            video_self_attention_mask = own(video_self_attention_mask)  # [B, queries, keys]: this rank's queries

        # 4. text (LTX-2.0 projects it here; LTX-2.3's connectors already did)
        context, audio_context = encoder_hidden_states, audio_encoder_hidden_states
        if self.use_prompt_embeddings:
            context = self.caption_projection(context).reshape(batch, -1, x.shape[-1])
            audio_context = self.audio_caption_projection(audio_context).reshape(batch, -1, a.shape[-1])

        # 5. blocks (STG: the listed blocks' self-attention takes the values where the mask is 0)
        stg_blocks = set(spatio_temporal_guidance_blocks or [])
        if stg_blocks and perturbation_mask is None:
            perturbation_mask = mx.zeros((batch,))
        if perturbation_mask is not None:
            perturbation_mask = _array(perturbation_mask)
            if perturbation_mask.ndim == 1:  # [B] -> [B, 1, 1]: one switch per sample
                perturbation_mask = perturbation_mask.reshape(-1, 1, 1)
        all_perturbed = perturbation_mask is not None and not bool(mx.any(perturbation_mask != 0))
        for index, block in enumerate(self.transformer_blocks):
            stg = index in stg_blocks
            x, a = block(x, a, context, audio_context, temb, temb_audio, video_ca_scale_shift, audio_ca_scale_shift,
                         video_ca_gate, audio_ca_gate, temb_prompt, temb_prompt_audio, video_rotary_emb,
                         audio_rotary_emb, ca_video_rotary_emb, ca_audio_rotary_emb, encoder_attention_mask,
                         audio_encoder_attention_mask, video_self_attention_mask, None, None, None,
                         not isolate_modalities, not isolate_modalities,
                         perturbation_mask if stg else None, all_perturbed if stg else False, tokens)
            tokens.settle(x, a, what=f"DiT block {index}")
        x = tokens.gather(x, 1)

        # 6. output modulation and projections
        video = self.proj_out(self._modulate(self.norm_out(x), self.scale_shift_table, embedded_timestep))
        audio = self.audio_proj_out(self._modulate(self.audio_norm_out(a), self.audio_scale_shift_table,
                                                   audio_embedded_timestep))
        return video, audio
