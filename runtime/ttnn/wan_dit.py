"""The Wan DiT (diffusers' `WanTransformer3DModel`) on the TTNN ops interface, reading tt_dit's
parameters: the names, fusions and layouts tt-metal's ``models/tt_dit`` Wan transformer loads
(``attn1.to_qkv``, ``attn2.to_q`` + ``attn2.to_kv``, ``to_out``, ``ffn.ff1`` / ``ff2``, the
``norm2`` DistributedLayerNorm packing, ``patch_embedding.proj_weight``, float32 timestep path and
modulation tables). A cache for a mesh holds each tensor in per-device shards, laid out for its
tensor-parallel factor tp (heads interleaved per device, row-parallel biases padded): the loader
puts the shards back together (runtime/ttnn/loading.py) and this model undoes the tp layout where
it reads a fused output, so one device runs what the mesh would.

Written once: the host emulator and a device run the same code. Modules mirror diffusers' tree so
verify compares layer by layer: a fused projection's parts are modules under diffusers' names
(``attn1.to_q`` is the q part of ``to_qkv``'s output), and each module takes and returns the
reference's layouts. Precision follows tt_dit's transformer_wan.py / attention_wan.py: activations
bfloat16; the timestep embedding, ``time_proj``, the modulation sums, RoPE tables, ``norm_out``
and ``proj_out``'s output float32; the gates cast to bfloat16 before the gated residuals
(``ttnn.addcmul``). What tt_dit fuses beyond that (to_out with its residual, RMS norm with RoPE)
runs here as the separate ops diffusers' module boundaries need.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.runtime.ttnn.layers import GELU, Dropout, LayerNorm, Linear, RMSNorm, SiLU
from vidport.runtime.ttnn.module import Module, Parameters
from vidport.runtime.ttnn.ops import Tensor

F32 = "float32"
THETA = 10000.0


def rope_tables(head_dim: int, grid: tuple[int, int, int], max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' WanRotaryPosEmbed for a (frames, rows, columns) patch grid: cos and sin
    [1, tokens, 1, head_dim] in float32, each frequency repeated for its pair of channels; the
    head's channels split t / h / w as head_dim - 4 (head_dim // 6), 2 (head_dim // 6) twice."""
    h_dim = w_dim = 2 * (head_dim // 6)
    cos, sin = [], []
    for axis, dim in enumerate((head_dim - h_dim - w_dim, h_dim, w_dim)):
        if grid[axis] > max_seq_len:
            raise ValueError(f"{grid[axis]} positions exceed the model's {max_seq_len} RoPE positions")
        freqs = 1.0 / THETA ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)
        angles = np.repeat(np.outer(np.arange(grid[axis], dtype=np.float64), freqs), 2, axis=1)
        shape = [1, 1, 1, -1]
        shape[axis] = grid[axis]
        for table, fn in ((cos, np.cos), (sin, np.sin)):
            table.append(np.broadcast_to(fn(angles).astype(np.float32).reshape(shape), (*grid, dim)))
    tokens = math.prod(grid)
    return (np.concatenate(cos, axis=-1).reshape(1, tokens, 1, head_dim),
            np.concatenate(sin, axis=-1).reshape(1, tokens, 1, head_dim))


def tensor_parallel(params: Parameters) -> int:
    """The tensor-parallel factor the folder's tt_dit parameters are laid out for (1: a one-device
    cache, or another style's folder read through the tt_dit layout)."""
    plan = (params.manifest.get("cache_style") or {}).get("parallel_config")
    return int(plan["tensor_parallel"]["factor"]) if plan else 1


def regroup(ops: Any, fused: Tensor, parts: int, tp: int) -> Tensor:
    """A fused output laid out per tensor-parallel device ([.., tp, parts, n / tp]: tt_dit's
    _interleave_heads, the time_proj regrouping) back in diffusers' order ([.., parts, n])."""
    shape = ops.shape(fused)
    lead, width = shape[:-1], shape[-1] // parts
    x = ops.reshape(fused, (*lead, tp, parts, width // tp))
    n = len(lead)
    return ops.reshape(ops.permute(x, (*range(n), n + 1, n, n + 2)), (*lead, parts * width))


def first_device_bias(ops: Any, linear: Linear, tp: int) -> Linear:
    """tt_dit's RowParallelLinear: bias [1, out * tp], zeros after the first device's [1, out] (only
    it adds the bias before the reduce-scatter); the model adds that part once."""
    linear.bias = ops.split(linear.bias, tp)[0]
    return linear


def pair_rotation(head_dim: int) -> np.ndarray:
    """R with (x @ R)[2i] = -x[2i+1], (x @ R)[2i+1] = x[2i]: RoPE's rotated copy of interleaved pairs
    as one matmul (tt_dit's trans_mat for rotary_embedding_llama does this per tile)."""
    rotation = np.zeros((head_dim, head_dim), dtype=np.float32)
    even = np.arange(0, head_dim, 2)
    rotation[even + 1, even] = -1.0
    rotation[even, even + 1] = 1.0
    return rotation


class RotaryPosEmbed(Module):
    """diffusers' `rope`: host tables (tt_dit keeps diffusers' torch module as its fallback), float32."""

    def __init__(self, params: Parameters, head_dim: int, patch_size: tuple[int, int, int], max_seq_len: int) -> None:
        self.ops, self.head_dim, self.patch_size, self.max_seq_len = params.ops, head_dim, patch_size, max_seq_len

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        _, _, frames, height, width = self.ops.shape(hidden_states)
        grid = tuple(n // p for n, p in zip((frames, height, width), self.patch_size))
        cos, sin = rope_tables(self.head_dim, grid, self.max_seq_len)
        return self.ops.constant(cos, F32), self.ops.constant(sin, F32)


class PatchEmbedding(Module):
    """The patchify Conv3d as tt_dit runs it: patches flattened (t, h, w, channels) and one linear
    with `proj_weight` [kt*kh*kw*in, dim]. Takes and returns diffusers' layouts ([B, C, F, H, W] ->
    [B, dim, F', H', W'])."""

    def __init__(self, params: Parameters, prefix: str, patch_size: tuple[int, int, int]) -> None:
        self.ops, self.patch_size = params.ops, patch_size
        self.weight, self.bias = params.take(f"{prefix}.proj_weight"), params.take(f"{prefix}.proj_bias")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        ops = self.ops
        batch, channels, frames, height, width = ops.shape(input)
        (p_t, p_h, p_w), dim = self.patch_size, ops.shape(self.weight)[-1]
        grid = (frames // p_t, height // p_h, width // p_w)
        x = ops.reshape(input, (batch, channels, grid[0], p_t, grid[1], p_h, grid[2], p_w))
        x = ops.permute(x, (0, 2, 4, 6, 3, 5, 7, 1))
        x = ops.linear(ops.reshape(x, (batch, math.prod(grid), p_t * p_h * p_w * channels)), self.weight, self.bias)
        return ops.permute(ops.reshape(x, (batch, *grid, dim)), (0, 4, 1, 2, 3))


class Timesteps(Module):
    """diffusers' Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0): [cos | sin] of t times
    exp(-ln(10000) i / half), computed on the host in float32 as tt_dit feeds its float32 path."""

    def __init__(self, params: Parameters, channels: int) -> None:
        self.ops, self.channels = params.ops, channels

    def forward(self, timesteps: Any) -> Tensor:
        half = self.channels // 2
        exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32) / np.float32(half)
        angles = np.asarray(timesteps, dtype=np.float32).reshape(-1, 1) * np.exp(exponent)[None]
        return self.ops.constant(np.concatenate([np.cos(angles), np.sin(angles)], axis=-1), F32)


class TimestepEmbedding(Module):
    """linear_1, SiLU, linear_2, all float32 (tt_dit's WanTimeTextImageEmbedding(timestep_dtype=float32))."""

    def __init__(self, params: Parameters, prefix: str) -> None:
        self.linear_1 = Linear(params, f"{prefix}.linear_1", dtype=F32)
        self.act = SiLU(params, dtype=F32)
        self.linear_2 = Linear(params, f"{prefix}.linear_2", dtype=F32)
        self.float32_inputs = ("sample",)

    def forward(self, sample: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


class TextProjection(Module):
    """diffusers' PixArtAlphaTextProjection(act_fn="gelu_tanh"): bfloat16 linears."""

    def __init__(self, params: Parameters, prefix: str) -> None:
        self.linear_1 = Linear(params, f"{prefix}.linear_1")
        self.act_1 = GELU(params, approximate=True)
        self.linear_2 = Linear(params, f"{prefix}.linear_2")

    def forward(self, caption: Tensor) -> Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))


class TimeProjection(Linear):
    """time_proj, tt_dit's float32 RowParallelLinear: its 6 modulation groups regrouped per device
    (columns [tp, 6, dim / tp]) and its bias padded to [1, 6 dim tp]; output in diffusers' order."""

    def __init__(self, params: Parameters, prefix: str, tp: int) -> None:
        super().__init__(params, prefix, dtype=F32)
        self.tp = tp
        first_device_bias(self.ops, self, tp)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        return regroup(self.ops, super().forward(input), 6, self.tp)


class TimeTextEmbedding(Module):
    """diffusers' WanTimeTextImageEmbedding without the image branch (tt_dit's Wan has none):
    -> (temb [B, dim] or [B, tokens, dim], timestep_proj [.., 6 dim], text context, None)."""

    def __init__(self, params: Parameters, prefix: str, freq_dim: int, tp: int) -> None:
        self.ops = params.ops
        self.timesteps_proj = Timesteps(params, freq_dim)
        self.time_embedder = TimestepEmbedding(params, f"{prefix}.time_embedder")
        self.act_fn = SiLU(params, dtype=F32)
        self.time_proj = TimeProjection(params, f"{prefix}.time_proj", tp)
        self.text_embedder = TextProjection(params, f"{prefix}.text_embedder")

    def forward(self, timestep: Any, encoder_hidden_states: Tensor, encoder_hidden_states_image: Any = None,
                timestep_seq_len: int | None = None) -> tuple[Tensor, Tensor, Tensor, None]:
        if encoder_hidden_states_image is not None:
            raise ValueError("tt_dit's Wan transformer has no image embedder (Wan 2.1 I2V's CLIP branch)")
        sinusoids = self.timesteps_proj(timestep)
        if timestep_seq_len is not None:  # one timestep per token (Wan 2.2 TI2V): [B, tokens, freq]
            sinusoids = self.ops.reshape(sinusoids, (-1, timestep_seq_len, self.ops.shape(sinusoids)[-1]))
        temb = self.time_embedder(sinusoids)
        timestep_proj = self.time_proj(self.act_fn(temb))
        return temb, timestep_proj, self.text_embedder(encoder_hidden_states), None


class FusedPart(Module):
    """One of a fused projection's parts under diffusers' name (attn1.to_q of tt_dit's to_qkv), its
    heads gathered from every tensor-parallel device's slice (`regroup`). Called alone
    (verify's check on the reference's inputs) it runs the fused linear and keeps its part; inside
    the attention the fused output's part is recorded under its name by `observe`."""

    def __init__(self, fused: Linear, index: int, parts: int, tp: int) -> None:
        self.ops, self.index, self.parts, self.tp = fused.ops, index, parts, tp
        self.run_fused = fused.forward  # a bound method: the fused linear stays one module, not a child here

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        fused = regroup(self.ops, self.run_fused(input), self.parts, self.tp)
        return self.ops.split(fused, self.parts)[self.index]

    def observe(self, output: Tensor) -> Tensor:
        """Tell the golden tap about this part as Module.__call__ tells it about a call."""
        if Module.observer is not None:
            Module.observer(self, output)
        return output


class WanAttention(Module):
    """Self-attention (fused to_qkv, RoPE) or cross-attention (to_q, fused to_kv) with RMS norms on
    q and k across all heads; diffusers' call and layouts ([B, tokens, dim])."""

    def __init__(self, params: Parameters, prefix: str, heads: int, eps: float, cross: bool, tp: int) -> None:
        self.ops, self.heads, self.tp = params.ops, heads, tp
        if cross:
            self.to_q = Linear(params, f"{prefix}.to_q")
            self.to_kv = Linear(params, f"{prefix}.to_kv")
            self.to_k, self.to_v = (FusedPart(self.to_kv, i, 2, tp) for i in range(2))
        else:
            self.to_qkv = Linear(params, f"{prefix}.to_qkv")
            self.to_q, self.to_k, self.to_v = (FusedPart(self.to_qkv, i, 3, tp) for i in range(3))
        self.norm_q = RMSNorm(params, f"{prefix}.norm_q", eps)
        self.norm_k = RMSNorm(params, f"{prefix}.norm_k", eps)
        self.to_out = [Linear(params, f"{prefix}.to_out"), Dropout()]  # tt_dit's to_out is diffusers' to_out.0
        self.float32_inputs = ("rotary_emb",)

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None, attention_mask: Any = None,
                rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        ops = self.ops
        if attention_mask is not None:
            raise ValueError("Wan's attention takes no mask")
        if encoder_hidden_states is None:
            parts = ops.split(regroup(ops, self.to_qkv(hidden_states), 3, self.tp), 3)
            q, k, v = (part.observe(x) for part, x in zip((self.to_q, self.to_k, self.to_v), parts))
        else:
            q = self.to_q(hidden_states)
            kv = ops.split(regroup(ops, self.to_kv(encoder_hidden_states), 2, self.tp), 2)
            k, v = (part.observe(x) for part, x in zip((self.to_k, self.to_v), kv))
        q, k = self.norm_q(q), self.norm_k(k)
        batch, length, dim = ops.shape(q)
        head_dim = dim // self.heads

        def heads(x: Tensor) -> Tensor:  # [B, S, dim] -> [B, heads, S, head_dim]
            return ops.permute(ops.reshape(x, (batch, ops.shape(x)[1], self.heads, head_dim)), (0, 2, 1, 3))

        q, k, v = heads(q), heads(k), heads(v)
        if rotary_emb is not None:
            cos, sin = (ops.permute(t, (0, 2, 1, 3)) for t in rotary_emb)  # [1, S, 1, hd] -> [1, 1, S, hd]
            rotation = ops.constant(pair_rotation(head_dim))
            q, k = (ops.add(ops.mul(x, cos), ops.mul(ops.matmul(x, rotation), sin)) for x in (q, k))
        out = ops.scaled_dot_product_attention(q, k, v, head_dim ** -0.5)
        out = ops.reshape(ops.permute(out, (0, 2, 1, 3)), (batch, length, dim))
        return self.to_out[1](self.to_out[0](out))


class GELUProjection(Module):
    """diffusers' GELU(dim, inner, approximate="tanh") of FeedForward: `proj` is tt_dit's ffn.ff1."""

    def __init__(self, params: Parameters, prefix: str) -> None:
        self.ops = params.ops
        self.proj = Linear(params, prefix)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.ops.gelu(self.proj(hidden_states), approximate=True)


class FeedForward(Module):
    """diffusers' FeedForward(activation_fn="gelu-approximate"): net.0.proj = ff1, net.2 = ff2 (row-parallel)."""

    def __init__(self, params: Parameters, prefix: str, tp: int) -> None:
        self.net = [GELUProjection(params, f"{prefix}.ff1"), Dropout(),
                    first_device_bias(params.ops, Linear(params, f"{prefix}.ff2"), tp)]

    def forward(self, hidden_states: Tensor) -> Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states


class PackedLayerNorm(LayerNorm):
    """norm2, tt_dit's DistributedLayerNorm: weight and bias stored [dim / (32 tp), 32 tp] ROW_MAJOR,
    row r holding channels [32 r, 32 r + 32) of each device's dim / tp in turn; unpacked to [1, dim]."""

    def __init__(self, params: Parameters, prefix: str, eps: float, tp: int) -> None:
        super().__init__(params, prefix, eps)
        ops = self.ops
        self.weight, self.bias = (ops.reshape(ops.permute(ops.reshape(t, (-1, tp, 32)), (1, 0, 2)), (1, -1))
                                  for t in (self.weight, self.bias))


def _modulation(ops: Any, table: Tensor, temb: Tensor, parts: int) -> list[Tensor]:
    """table [1, 1, parts, dim] (float32) + temb [B, parts, dim] or per token [B, S, parts, dim],
    in float32, cut into `parts` tensors that broadcast against [B, S, dim]."""
    rank = len(ops.shape(temb))
    if rank == 3:
        table = ops.reshape(table, ops.shape(table)[1:])
    mod = ops.add(table, temb, dtype=F32)
    chunks = ops.split(mod, parts, dim=rank - 2)
    return chunks if rank == 3 else [ops.reshape(c, (*ops.shape(c)[:2], -1)) for c in chunks]


class WanTransformerBlock(Module):
    def __init__(self, params: Parameters, prefix: str, heads: int, eps: float, cross_attn_norm: bool,
                 tp: int) -> None:
        self.ops = params.ops
        self.norm1 = LayerNorm(params, None, eps)
        self.attn1 = WanAttention(params, f"{prefix}.attn1", heads, eps, cross=False, tp=tp)
        self.attn2 = WanAttention(params, f"{prefix}.attn2", heads, eps, cross=True, tp=tp)
        self.norm2 = PackedLayerNorm(params, f"{prefix}.norm2", eps, tp) if cross_attn_norm else None
        self.ffn = FeedForward(params, f"{prefix}.ffn", tp)
        self.norm3 = LayerNorm(params, None, eps)
        self.scale_shift_table = params.take(f"{prefix}.scale_shift_table")  # [1, 1, 6, dim] float32
        self.float32_inputs = ("temb", "rotary_emb")

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                rotary_emb: tuple[Tensor, Tensor]) -> Tensor:
        ops = self.ops
        shift, scale, gate, c_shift, c_scale, c_gate = _modulation(ops, self.scale_shift_table, temb, 6)
        gate, c_gate = ops.typecast(gate, "bfloat16"), ops.typecast(c_gate, "bfloat16")  # as tt_dit casts them

        norm = ops.addcmul(shift, self.norm1(hidden_states), ops.add(scale, 1.0, dtype=F32))
        hidden_states = ops.addcmul(hidden_states, self.attn1(norm, None, None, rotary_emb), gate)

        norm = self.norm2(hidden_states) if self.norm2 is not None else hidden_states
        hidden_states = ops.add(hidden_states, self.attn2(norm, encoder_hidden_states, None, None))

        norm = ops.addcmul(c_shift, self.norm3(hidden_states), ops.add(c_scale, 1.0, dtype=F32))
        return ops.addcmul(hidden_states, self.ffn(norm), c_gate)


class WanTransformer3DModel(Module):
    """diffusers' call: (latents [B, C, F, H, W], timestep [B] or [B, tokens], text context
    [B, L, text_dim]) -> [B, out_channels, F, H, W]. Built from the folder's config and its tt_dit
    parameters (`from_config`): a tt_dit cache for any mesh, or an as_tensor folder read through
    mappings/wan-dit/tt_dit/cache.yaml (runtime/ttnn/loading.py; how bfloat8_b weights are run, which
    the tt_dit style does not write)."""

    cache_styles = ("tt_dit", "as_tensor")
    parameter_layout = "tt_dit"

    def __init__(self, params: Parameters, config: dict[str, Any]) -> None:
        self.ops = params.ops
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        self.patch_size = tuple(config["patch_size"])
        self.out_channels = config.get("out_channels") or config["in_channels"]
        eps = config["eps"]
        self.rope = RotaryPosEmbed(params, head_dim, self.patch_size, config["rope_max_seq_len"])
        self.patch_embedding = PatchEmbedding(params, "patch_embedding", self.patch_size)
        self.condition_embedder = TimeTextEmbedding(params, "condition_embedder", config["freq_dim"],
                                                    tensor_parallel(params))
        tp = tensor_parallel(params)
        self.blocks = [WanTransformerBlock(params, f"blocks.{n}", heads, eps, config["cross_attn_norm"], tp)
                       for n in range(config["num_layers"])]
        self.norm_out = LayerNorm(params, None, eps, dtype=F32)
        self.proj_out = Linear(params, "proj_out", dtype=F32)
        self.scale_shift_table = params.take("scale_shift_table")  # [1, 2, dim] float32

    @classmethod
    def from_config(cls, config: dict[str, Any], params: Parameters) -> "WanTransformer3DModel":
        image = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
        unsupported = {k: config[k] for k in image if config.get(k)}
        if unsupported:
            raise VidportError(f"{params.folder}: a Wan model with an image branch ({unsupported}); tt_dit's Wan "
                               "transformer, which this TTNN model follows, has none",
                               hint="Wan 2.1 I2V 14B has no TTNN model here; Wan 2.1 / 2.2 T2V, TI2V 5B and the "
                                    "A14B experts do")
        if config.get("causal"):
            raise VidportError(f"{params.folder}: a causal (Self-Forcing) Wan model; this TTNN model attends over "
                               "every frame at once, as tt_dit's bidirectional Wan transformer does",
                               hint="a causal Wan has no TTNN model here")
        if config.get("qk_norm") != "rms_norm_across_heads":
            raise VidportError(f"{params.folder}: qk_norm {config.get('qk_norm')!r}; Wan uses 'rms_norm_across_heads'")
        return cls(params, config)

    def forward(self, hidden_states: Tensor, timestep: Any, encoder_hidden_states: Tensor,
                encoder_hidden_states_image: Any = None, return_dict: bool = True,
                attention_kwargs: Any = None) -> Tensor:
        ops = self.ops
        batch, _, frames, height, width = ops.shape(hidden_states)
        grid = tuple(n // p for n, p in zip((frames, height, width), self.patch_size))
        rotary_emb = self.rope(hidden_states)
        x = self.patch_embedding(hidden_states)
        dim = ops.shape(x)[1]
        x = ops.reshape(ops.permute(x, (0, 2, 3, 4, 1)), (batch, math.prod(grid), dim))

        timestep = np.asarray(timestep)
        per_token = timestep.shape[1] if timestep.ndim == 2 else None
        temb, timestep_proj, context, _ = self.condition_embedder(timestep.reshape(-1), encoder_hidden_states,
                                                                  encoder_hidden_states_image, per_token)
        timestep_proj = ops.reshape(timestep_proj, (*ops.shape(timestep_proj)[:-1], 6, dim))
        for block in self.blocks:
            x = block(x, context, timestep_proj, rotary_emb)

        temb = ops.reshape(temb, (*ops.shape(temb)[:-1], 1, dim))
        shift, scale = _modulation(ops, ops.reshape(self.scale_shift_table, (1, 1, 2, dim)), temb, 2)
        x = ops.addcmul(shift, self.norm_out(x), ops.add(scale, 1.0, dtype=F32), dtype=F32)
        x = self.proj_out(x)
        (p_t, p_h, p_w), (f, h, w) = self.patch_size, grid
        x = ops.permute(ops.reshape(x, (batch, f, h, w, p_t, p_h, p_w, self.out_channels)), (0, 7, 1, 4, 2, 5, 3, 6))
        return ops.reshape(x, (batch, self.out_channels, f * p_t, h * p_h, w * p_w))
