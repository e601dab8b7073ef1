"""The CLIP vision encoder in MLX (Wan I2V's open-clip ViT-H/14 image encoder), mirroring
transformers' `CLIPVisionModel` tree name for name.

Images (batch, channels, height, width), as transformers takes them -> patch tokens with a class
token in front, position embeddings, a pre-norm, transformer layers (shared with the CLIP text
encoder: the same layer, run without a causal mask), and a post-norm of the class token. Wan
conditions on the penultimate layer's hidden states (`hidden_states(...)[-2]`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.clip_text import CLIPEncoder
from vidport.runtime.layers import Conv2d


class CLIPVisionEmbeddings(nn.Module):
    """Patchify (a stride-`patch` convolution, run channels-last), prepend the class token, add
    the learned position table."""

    def __init__(self, hidden_size: int, image_size: int, patch_size: int, num_channels: int):
        super().__init__()
        self.image_size = image_size
        self.num_positions = (image_size // patch_size) ** 2 + 1
        self.class_embedding = mx.zeros((hidden_size,))
        self.patch_embedding = Conv2d(num_channels, hidden_size, patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.num_positions, hidden_size)

    def __call__(self, pixel_values: mx.array, interpolate_pos_encoding: bool = False) -> mx.array:
        batch, _, height, width = pixel_values.shape
        if interpolate_pos_encoding:
            raise NotImplementedError("position-table interpolation (other image sizes) is not ported")
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"input image size ({height}*{width}) doesn't match model ({self.image_size}*{self.image_size})")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.transpose(0, 2, 3, 1).astype(weight.dtype))
        patches = patches.reshape(batch, -1, weight.shape[0])  # row-major over the grid, as torch's flatten
        tokens = mx.concatenate([mx.broadcast_to(self.class_embedding, (batch, 1, weight.shape[0])), patches], axis=1)
        return tokens + self.position_embedding(mx.arange(self.num_positions)[None])


class VisionOutput(NamedTuple):
    last_hidden_state: mx.array
    pooler_output: mx.array  # the post-normed class token


# CLIPVisionConfig arguments this port reads; the defaults are transformers' own.
_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
             "layer_norm_eps": 1e-5}


class CLIPVisionModel(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                 num_channels: int, image_size: int, patch_size: int, hidden_act: str, layer_norm_eps: float):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(hidden_size, image_size, patch_size, num_channels)
        self.pre_layrnorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)  # sic: transformers' name
        self.encoder = CLIPEncoder(num_hidden_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                   heads=num_attention_heads, activation=hidden_act, eps=layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CLIPVisionModel":
        """From a transformers CLIPVisionConfig dict (entries such as `projection_dim` or dropout
        do not change this model's inference)."""
        return cls(**{key: config.get(key, default) for key, default in _DEFAULTS.items()})

    def __call__(self, pixel_values: mx.array, interpolate_pos_encoding: bool = False) -> VisionOutput:
        hidden_states = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        last_hidden_state = self.encoder(inputs_embeds=hidden_states)
        return VisionOutput(last_hidden_state, self.post_layernorm(last_hidden_state[:, 0, :]))

    def hidden_states(self, pixel_values: mx.array) -> list[mx.array]:
        """The encoder's input, then every layer's output (transformers' `output_hidden_states`);
        Wan I2V's image conditioning is `[-2]`."""
        states = [self.pre_layrnorm(self.embeddings(pixel_values))]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return states
