"""AnimateDiff motion modules on the TTNN ops interface, mirroring diffusers' `MotionAdapter` tree
name for name (norm, proj_in, transformer_blocks.N.attn1.to_q, ...). Written once: the host
emulator and a device run the same code. Attention stays on the ops interface throughout.
"""
from __future__ import annotations

from typing import Any

from vidport.runtime.motion_config import MotionConfig
from vidport.runtime.ttnn.layers import Dropout, GroupNorm, LayerNorm, Linear, SinusoidalPositionalEmbedding
from vidport.runtime.ttnn.module import Module, Parameters
from vidport.runtime.ttnn.ops import Tensor


class Attention(Module):
    """Multi-head self-attention over frames (q/k/v without bias, to_out with)."""

    def __init__(self, params: Parameters, prefix: str, dim: int, heads: int) -> None:
        self.ops, self.heads, self.scale = params.ops, heads, (dim // heads) ** -0.5
        self.to_q = Linear(params, f"{prefix}.to_q", bias=False)
        self.to_k = Linear(params, f"{prefix}.to_k", bias=False)
        self.to_v = Linear(params, f"{prefix}.to_v", bias=False)
        self.to_out = [Linear(params, f"{prefix}.to_out.0"), Dropout()]

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None) -> Tensor:
        ops = self.ops
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length, dim = ops.shape(hidden_states)

        def heads(x: Tensor) -> Tensor:  # [B, S, D] -> [B, heads, S, D/heads]
            return ops.permute(ops.reshape(x, (batch, ops.shape(x)[1], self.heads, -1)), (0, 2, 1, 3))

        q, k, v = heads(self.to_q(hidden_states)), heads(self.to_k(context)), heads(self.to_v(context))
        out = ops.scaled_dot_product_attention(q, k, v, self.scale)
        out = ops.reshape(ops.permute(out, (0, 2, 1, 3)), (batch, length, dim))
        return self.to_out[1](self.to_out[0](out))


class GEGLU(Module):
    def __init__(self, params: Parameters, prefix: str) -> None:
        self.ops = params.ops
        self.proj = Linear(params, f"{prefix}.proj")

    def forward(self, hidden_states: Tensor) -> Tensor:
        hidden, gate = self.ops.split(self.proj(hidden_states), 2, dim=-1)
        return self.ops.mul(hidden, self.ops.gelu(gate))


class FeedForward(Module):
    def __init__(self, params: Parameters, prefix: str) -> None:
        self.net = [GEGLU(params, f"{prefix}.net.0"), Dropout(), Linear(params, f"{prefix}.net.2")]

    def forward(self, hidden_states: Tensor) -> Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class TemporalTransformerBlock(Module):
    """diffusers `BasicTransformerBlock` as AnimateDiff configures it: two self-attentions, each
    after a LayerNorm and the sinusoidal positions, then a GEGLU feed-forward."""

    def __init__(self, params: Parameters, prefix: str, dim: int, heads: int, max_seq_length: int) -> None:
        self.ops = params.ops
        self.norm1 = LayerNorm(params, f"{prefix}.norm1")
        self.pos_embed = SinusoidalPositionalEmbedding(params, dim, max_seq_length)
        self.attn1 = Attention(params, f"{prefix}.attn1", dim, heads)
        self.norm2 = LayerNorm(params, f"{prefix}.norm2")
        self.attn2 = Attention(params, f"{prefix}.attn2", dim, heads)
        self.norm3 = LayerNorm(params, f"{prefix}.norm3")
        self.ff = FeedForward(params, f"{prefix}.ff")

    def forward(self, hidden_states: Tensor) -> Tensor:
        add = self.ops.add
        hidden_states = add(self.attn1(self.pos_embed(self.norm1(hidden_states))), hidden_states)
        hidden_states = add(self.attn2(self.pos_embed(self.norm2(hidden_states))), hidden_states)
        return add(self.ff(self.norm3(hidden_states)), hidden_states)


class TemporalTransformer(Module):
    """diffusers `AnimateDiffTransformer3D`: (batch*frames, C, H, W) and num_frames in, same out."""

    def __init__(self, params: Parameters, prefix: str, channels: int, heads: int, layers: int, groups: int,
                 max_seq_length: int) -> None:
        self.ops = params.ops
        self.norm = GroupNorm(params, f"{prefix}.norm", groups, eps=1e-6)
        self.proj_in = Linear(params, f"{prefix}.proj_in")
        self.transformer_blocks = [TemporalTransformerBlock(params, f"{prefix}.transformer_blocks.{i}", channels, heads,
                                                            max_seq_length) for i in range(layers)]
        self.proj_out = Linear(params, f"{prefix}.proj_out")

    def forward(self, hidden_states: Tensor, num_frames: int = 1) -> Tensor:
        ops = self.ops
        batch_frames, channels, height, width = ops.shape(hidden_states)
        batch = batch_frames // num_frames
        x = ops.reshape(hidden_states, (batch, num_frames, channels, height, width))
        x = self.norm(ops.permute(x, (0, 2, 1, 3, 4)))  # (B, C, F, H, W): statistics over frames and pixels
        x = ops.reshape(ops.permute(x, (0, 3, 4, 2, 1)), (batch * height * width, num_frames, channels))
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)
        x = self.proj_out(x)
        x = ops.permute(ops.reshape(x, (batch, height, width, num_frames, channels)), (0, 3, 4, 1, 2))
        return ops.add(ops.reshape(x, (batch_frames, channels, height, width)), hidden_states)


class MotionModules(Module):
    def __init__(self, params: Parameters, prefix: str, channels: int, layers: int, transformer_layers: int,
                 heads: int, groups: int, max_seq_length: int) -> None:
        self.motion_modules = [TemporalTransformer(params, f"{prefix}.motion_modules.{m}", channels, heads,
                                                   transformer_layers, groups, max_seq_length) for m in range(layers)]


class MotionAdapter(Module):
    """The container diffusers loads motion modules into; built from its config and a folder's parameters."""

    def __init__(self, params: Parameters, config: MotionConfig) -> None:
        if config.conv_in_channels:
            raise ValueError("motion adapters with conv_in (SparseCtrl) are not supported")
        common = (config.groups, config.max_seq_length)
        self.down_blocks = [MotionModules(params, *block, *common) for block in config.down_blocks()]
        mid = config.mid_block()
        self.mid_block = MotionModules(params, *mid, *common) if mid else None
        self.up_blocks = [MotionModules(params, *block, *common) for block in config.up_blocks()]

    @classmethod
    def from_config(cls, config: dict[str, Any], params: Parameters) -> "MotionAdapter":
        return cls(params, MotionConfig.read(config))
