"""The pieces around Wan's attention, mirroring diffusers name for name: float32 layer norms, the
GELU feed-forward, and `WanTimeTextImageEmbedding` (timestep, text and CLIP-image conditioning)."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.layers import gelu, gelu_tanh
from vidport.runtime.sd15_unet import TimestepEmbedding, Timesteps


class FP32LayerNorm(nn.Module):
    """diffusers' `FP32LayerNorm`: statistics and affine in float32, result in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = mx.ones((dim,))
            self.bias = mx.zeros((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        weight = self["weight"].astype(mx.float32) if "weight" in self else None
        bias = self["bias"].astype(mx.float32) if "bias" in self else None
        return mx.fast.layer_norm(x.astype(mx.float32), weight, bias, self.eps).astype(x.dtype)


class GELU(nn.Module):
    """diffusers' `GELU` activation block: a projection, then GELU (exact, or the tanh form)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def __call__(self, hidden_states: mx.array) -> mx.array:
        x = self.proj(hidden_states)
        return gelu_tanh(x) if self.approximate == "tanh" else gelu(x)


class FeedForward(nn.Module):
    """diffusers' `FeedForward` with a GELU: net = [GELU(proj), Dropout, Linear]."""

    def __init__(self, dim: int, inner_dim: int, dim_out: int | None = None, approximate: str = "none"):
        super().__init__()
        self.net = [GELU(dim, inner_dim, approximate), nn.Dropout(0.0), nn.Linear(inner_dim, dim_out or dim)]

    def __call__(self, hidden_states: mx.array) -> mx.array:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class PixArtAlphaTextProjection(nn.Module):
    """The text embedder: linear, tanh-GELU, linear (umT5 features -> model width)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approx="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def __call__(self, caption: mx.array) -> mx.array:
        return self.linear_2(self.act_1(self.linear_1(caption)))


class WanImageEmbedding(nn.Module):
    """CLIP image tokens -> model width (Wan 2.1 I2V / FLF2V). With `pos_embed_seq_len` (FLF2V),
    first- and last-frame tokens are joined into one sequence and a learned position added."""

    def __init__(self, in_features: int, out_features: int, pos_embed_seq_len: int | None = None):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_features)
        self.ff = FeedForward(in_features, in_features, out_features)
        self.norm2 = FP32LayerNorm(out_features)
        if pos_embed_seq_len is not None:
            self.pos_embed = mx.zeros((1, pos_embed_seq_len, in_features))

    def __call__(self, encoder_hidden_states_image: mx.array) -> mx.array:
        x = encoder_hidden_states_image
        if "pos_embed" in self:
            _, length, width = x.shape
            x = x.reshape(-1, 2 * length, width) + self.pos_embed
        return self.norm2(self.ff(self.norm1(x)))


class WanTimeTextImageEmbedding(nn.Module):
    """Returns (temb, timestep_proj, text context, image context) as diffusers does. The timestep
    features stay float32 into the time MLP (diffusers keeps `time_embedder` in float32)."""

    def __init__(self, dim: int, time_freq_dim: int, time_proj_dim: int, text_embed_dim: int,
                 image_embed_dim: int | None = None, pos_embed_seq_len: int | None = None):
        super().__init__()
        self.timesteps_proj = Timesteps(time_freq_dim, flip_sin_to_cos=True, shift=0)
        self.time_embedder = TimestepEmbedding(time_freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, time_proj_dim)
        self.text_embedder = PixArtAlphaTextProjection(text_embed_dim, dim)
        if image_embed_dim is not None:
            self.image_embedder = WanImageEmbedding(image_embed_dim, dim, pos_embed_seq_len)

    def __call__(self, timestep: mx.array, encoder_hidden_states: mx.array,
                 encoder_hidden_states_image: mx.array | None = None,
                 timestep_seq_len: int | None = None) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
        features = self.timesteps_proj(timestep)
        if timestep_seq_len is not None:  # Wan 2.2 TI2V: one timestep per token
            features = features.reshape(-1, timestep_seq_len, features.shape[-1])
        temb = self.time_embedder(features).astype(encoder_hidden_states.dtype)
        timestep_proj = self.time_proj(self.act_fn(temb))
        encoder_hidden_states = self.text_embedder(encoder_hidden_states)
        if encoder_hidden_states_image is not None:
            if "image_embedder" not in self:
                raise ValueError("image conditioning given to a model without an image embedder")
            encoder_hidden_states_image = self.image_embedder(encoder_hidden_states_image)
        return temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image
