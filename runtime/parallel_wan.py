"""Parallel plans for the Wan DiT (`--set parallel=cfg|sequence|tensor` under `mlx.launch`), each
giving every rank the same latents after every step, equal to the single-process run:

- cfg: rank 0 runs the conditional pass, rank 1 the unconditional one; one all_gather of the
  two predictions a step, then both ranks take the same scheduler step. Two ranks, guidance > 1.
- sequence: the patch tokens are split contiguously across ranks after the patch embedding (each
  rank its slice of the RoPE tables and, for per-token timesteps, of the modulation). Each rank
  projects q/k/v for its tokens, all-gathers the keys and values of every rank and attends with
  its own queries over all of them; cross-attention and the FFN are per token, so local; the
  output tokens are all-gathered before unpatchify. Why all-gather K/V: MLX has no all-to-all, so
  Ulysses (heads <-> tokens) is out, and ring attention would need a send/recv ring and an
  online-softmax merge; gathering K/V is exact (one softmax over all keys, as one process does)
  and costs 2 x layers x (tokens x inner) values per DiT call (each rank receives (N-1)/N of it).
  The tokens must divide by N (refused otherwise; no padding, which would change the softmax).
- tensor: each block's attention heads and FFN columns split with MLX's own sharded layers
  (AllToShardedLinear for to_q/to_k/to_v/add_k_proj/add_v_proj and the FFN's first linear,
  ShardedToAllLinear for to_out.0 and the FFN's second, their quantized forms for a quantized
  folder). Wan normalises q and k over all heads at once, so `ShardedRMSNorm` sums the squares
  over every rank's heads (one all_sum of one value per token) and applies its slice of the
  weight. Heads and FFN width must divide by N.

Weights under tensor: the folder's tensors are read lazily (mx.load), sliced, and evaluated one
tensor at a time, so a rank keeps its slice and drops the rest; the peak is one whole tensor
above the rank's share, and no rank holds the whole model.

Every DiT block's output is evaluated under the watchdog (runtime.distributed), so a lost or hung
rank stops the run within `collective_timeout` of its last block.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_flatten

from vidport.converter.core.errors import VidportError
from vidport.runtime.distributed import World
from vidport.runtime.loading import load_model

F32 = mx.float32


class WanPlan:
    """One process: the pipeline's own loop (the conditional and unconditional passes in turn)."""

    name: str | None = None

    def __init__(self, world: World):
        self.world = world

    def check(self, dit_configs: list[dict[str, Any]], tokens: int, guided: bool) -> None:
        """Refuse, before any weight loads, a plan this run's ranks and model cannot take."""
        if self.world.size > 1:
            raise VidportError(f"{self.world.size} ranks but no parallel plan: every rank would repeat the whole run",
                               hint="add --set parallel=cfg|sequence|tensor")

    def describe(self, dit_config: dict[str, Any]) -> str:
        return "single process"

    def load(self, folder: Path) -> nn.Module:
        """A DiT of the folder, as this rank holds it."""
        return load_model(folder)

    def predict(self, model: Any, x: mx.array, timestep: mx.array, context: mx.array, negative: mx.array | None,
                image_context: mx.array | None, scale: float) -> mx.array:
        """The guided velocity: diffusers' uncond + scale * (cond - uncond), batch 1 each pass."""
        prediction = model(x, timestep, context, image_context)
        if negative is None:
            return prediction
        unconditional = model(x, timestep, negative, image_context)
        return unconditional + scale * (prediction - unconditional)


class _Parallel(WanPlan):
    def check(self, dit_configs: list[dict[str, Any]], tokens: int, guided: bool) -> None:
        if self.world.size == 1:
            raise VidportError(f"--set parallel={self.name}: this process was not started by mlx.launch (1 rank)",
                               hint='vidport generate --launch "-n 2 --backend ring" ... (or mlx.launch -n 2 '
                                    '--python PYTHON -- vidport generate ...)')


class CfgPlan(_Parallel):
    name = "cfg"

    def check(self, dit_configs: list[dict[str, Any]], tokens: int, guided: bool) -> None:
        super().check(dit_configs, tokens, guided)
        if not guided:
            raise VidportError("--set parallel=cfg: this run has no classifier-free guidance (--guidance <= 1), so "
                               "no second pass to give rank 1", hint="use --guidance > 1, or another plan")
        if self.world.size != 2:
            raise VidportError(f"--set parallel=cfg runs on exactly 2 ranks (conditional, unconditional), not "
                               f"{self.world.size}", hint="launch 2 processes, or use tensor/sequence")

    def describe(self, dit_config: dict[str, Any]) -> str:
        return "cfg over 2 ranks: rank 0 the conditional pass, rank 1 the unconditional; one all_gather a step"

    def predict(self, model: Any, x: mx.array, timestep: mx.array, context: mx.array, negative: mx.array | None,
                image_context: mx.array | None, scale: float) -> mx.array:
        own = model(x, timestep, context if self.world.is_main else negative, image_context)
        both = mx.distributed.all_gather(own[None], group=self.world.group)
        return both[1] + scale * (both[0] - both[1])


class SequencePlan(_Parallel):
    name = "sequence"

    def check(self, dit_configs: list[dict[str, Any]], tokens: int, guided: bool) -> None:
        super().check(dit_configs, tokens, guided)
        if tokens % self.world.size:
            raise VidportError(f"--set parallel=sequence: {tokens} tokens do not split into {self.world.size} equal "
                               "parts", hint="change --frames/--height/--width, or the number of processes")

    def describe(self, dit_config: dict[str, Any]) -> str:
        return (f"sequence over {self.world.size} ranks: tokens split, keys and values all-gathered in each of "
                f"{dit_config['num_layers']} self-attentions, full weights on every rank")

    def load(self, folder: Path) -> nn.Module:
        return SequenceParallelDiT(load_model(folder), self.world)


class TensorPlan(_Parallel):
    name = "tensor"

    def check(self, dit_configs: list[dict[str, Any]], tokens: int, guided: bool) -> None:
        super().check(dit_configs, tokens, guided)
        n = self.world.size
        for config in dit_configs:
            for key in ("num_attention_heads", "ffn_dim"):
                if config[key] % n:
                    raise VidportError(f"--set parallel=tensor: the DiT's {key} {config[key]} does not split across "
                                       f"{n} ranks", hint="launch a number of processes that divides it, or use "
                                                          "cfg/sequence")

    def describe(self, dit_config: dict[str, Any]) -> str:
        n = self.world.size
        return (f"tensor over {n} ranks: each rank {dit_config['num_attention_heads'] // n} of "
                f"{dit_config['num_attention_heads']} heads and {dit_config['ffn_dim'] // n} of {dit_config['ffn_dim']} "
                "FFN columns of every block, loaded as shards tensor by tensor")

    def load(self, folder: Path) -> nn.Module:
        model = load_model(folder)  # lazy: nothing read yet
        for block in model.blocks:
            shard_block(block, self.world)
        read_shards(model)
        return GuardedBlock.wrap(model, self.world)


PLANS: dict[str | None, type[WanPlan]] = {None: WanPlan, "cfg": CfgPlan, "sequence": SequencePlan,
                                          "tensor": TensorPlan}


def wan_plan(name: str | None, world: World) -> WanPlan:
    return PLANS[name](world)


def read_shards(model: nn.Module) -> None:
    """Read a lazily loaded model whose layers were sharded: one tensor read, sliced and kept at a
    time, so the peak is one whole tensor above this rank's share."""
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)
    mx.clear_cache()


def weight_report(model: nn.Module, blocks_name: str = "blocks") -> dict[str, int]:
    """Bytes of this rank's DiT weights, in its blocks (the list `blocks_name`) and elsewhere, and
    MLX's active memory (`--set dump_steps=DIR` writes it per rank: the tensor plan's share is
    measured, not assumed)."""
    blocks = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if f".{blocks_name}." in f".{k}")
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return {"block_bytes": blocks, "other_bytes": total - blocks, "active_memory": mx.get_active_memory()}


# ---------------------------------------------------------------------------------------------- tensor


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a feature axis whose channels are split across ranks (Wan's q/k norm across all
    heads): the sum of squares is all-summed, each rank scales by its slice of the weight."""

    def __init__(self, weight: mx.array, full_dim: int, eps: float, world: World):
        super().__init__()
        self.weight = weight
        self.full_dim = full_dim
        self.eps = eps
        self._group = world.group

    @classmethod
    def from_norm(cls, norm: nn.RMSNorm, world: World) -> "ShardedRMSNorm":
        full = norm.weight.shape[0]
        share = full // world.size
        weight = mx.contiguous(norm.weight[world.rank * share:(world.rank + 1) * share])
        return cls(weight, full, norm.eps, world)

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(F32)
        squares = mx.distributed.all_sum(mx.sum(x32 * x32, axis=-1, keepdims=True), group=self._group)
        return (x32 * mx.rsqrt(squares / self.full_dim + self.eps) * self.weight.astype(F32)).astype(x.dtype)


def shard_block(block: nn.Module, world: World) -> None:
    """Split one WanTransformerBlock's heads and FFN columns across the ranks, in place."""
    group, n = world.group, world.size
    for attn in (block.attn1, block.attn2):
        for name in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj"):
            if name in attn:
                setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
        attn.to_out[0] = shard_linear(attn.to_out[0], "sharded-to-all", group=group)
        for name in ("norm_q", "norm_k", "norm_added_k"):
            if name in attn:
                setattr(attn, name, ShardedRMSNorm.from_norm(getattr(attn, name), world))
        attn.heads //= n
    block.ffn.net[0].proj = shard_linear(block.ffn.net[0].proj, "all-to-sharded", group=group)
    block.ffn.net[2] = shard_linear(block.ffn.net[2], "sharded-to-all", group=group)


class GuardedBlock(nn.Module):
    """A block whose output is evaluated under the watchdog: each wait on the other ranks is bounded."""

    def __init__(self, block: nn.Module, index: int, world: World):
        super().__init__()
        self.block = block
        self._label = f"DiT block {index}"
        self._world = world

    @classmethod
    def wrap(cls, model: nn.Module, world: World) -> nn.Module:
        model.blocks = [cls(block, i, world) for i, block in enumerate(model.blocks)]
        return model

    def __call__(self, *args: Any) -> mx.array:
        out = self.block(*args)
        self._world.evaluate(out, what=self._label)
        return out


# ---------------------------------------------------------------------------------------------- sequence


class SequenceParallelDiT(nn.Module):
    """WanTransformer3DModel's forward with this rank's share of the tokens (see the module doc)."""

    def __init__(self, dit: nn.Module, world: World):
        super().__init__()
        self.dit = dit
        self._world = world

    def _gather_tokens(self, x: mx.array) -> mx.array:
        """[batch, tokens / N, ...] on every rank -> [batch, tokens, ...] in rank order."""
        return mx.distributed.all_gather(x.swapaxes(0, 1), group=self._world.group).swapaxes(0, 1)

    def _self_attention(self, attn: nn.Module, norm: mx.array, rotary: tuple[mx.array, mx.array]) -> mx.array:
        q = attn.queries(norm, rotary)
        k, v, _ = attn.keys_values(norm, rotary)
        return attn.output(q, (self._gather_tokens(k), self._gather_tokens(v), None))

    def __call__(self, hidden_states: mx.array, timestep: mx.array, encoder_hidden_states: mx.array,
                 encoder_hidden_states_image: mx.array | None = None) -> mx.array:
        dit, world = self.dit, self._world
        batch, frames, height, width, _ = hidden_states.shape
        p_t, p_h, p_w = dit._patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        cos, sin = dit.rope(hidden_states)
        x = dit.patch_embedding(hidden_states)
        x = x.reshape(batch, -1, x.shape[-1])
        share = x.shape[1] // world.size
        own = slice(world.rank * share, (world.rank + 1) * share)

        timestep = mx.array(timestep) if not isinstance(timestep, mx.array) else timestep
        per_token = timestep.shape[1] if timestep.ndim == 2 else None
        temb, timestep_proj, context, image_context = dit.condition_embedder(
            timestep.reshape(-1), encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=per_token)
        timestep_proj = timestep_proj.reshape(*timestep_proj.shape[:-1], 6, -1)
        if per_token is not None:  # one timestep per token: each rank its tokens' modulation
            temb, timestep_proj = temb[:, own], timestep_proj[:, own]
        if image_context is not None:
            context = mx.concatenate([image_context, context], axis=1)

        rotary, x = (cos[own], sin[own]), x[:, own]
        for index, block in enumerate(dit.blocks):
            x = block.around(x, timestep_proj,
                             lambda norm, attn=block.attn1: self._self_attention(attn, norm, rotary),
                             lambda norm, attn=block.attn2: attn(norm, context, None, None))
            world.evaluate(x, what=f"DiT block {index}")
        return dit.unpatchify(self._gather_tokens(dit.head(x, temb)), grid)
