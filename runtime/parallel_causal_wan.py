"""Parallel plans for the causal Wan DiT of Self-Forcing / CausVid (`--set parallel=tensor|sequence`
under `mlx.launch`), each giving every rank the same x0 after every step, equal to the single-
process run:

- tensor: each block's heads and FFN columns split as the Wan DiT's are
  (runtime.parallel_wan.shard_block: MLX's AllToShardedLinear / ShardedToAllLinear, q/k norms
  across every rank's heads by ShardedRMSNorm). The KV cache is filled by the sharded
  projections, so each rank caches its own heads' keys and values: the cache (self- and
  cross-attention) is 1/N per rank, like the weights. Heads and FFN width must divide by N.
- sequence: the tokens of the block being generated (frames x rows x columns after the patch
  embedding) are split contiguously across ranks, each with its slice of the RoPE tables and of the
  per-frame modulation. Each rank projects q/k/v for its tokens and all-gathers the keys and values
  (no all-to-all in MLX: see runtime.parallel_wan); its queries then attend to the cached frames
  and to the whole block, as one process does. The gathered keys and values are what the cache
  keeps, so every rank holds the full cache (no further traffic to read it; the cache memory is
  not divided). A block's tokens must divide by N.
- cfg: refused: Self-Forcing was distilled without classifier-free guidance, so a step is one DiT
  pass and there is no second pass to give another rank.

Every DiT block's output is evaluated under the watchdog (runtime.distributed), so a lost or hung
rank stops the run within `collective_timeout` of its last block.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from vidport.converter.core.errors import VidportError
from vidport.runtime.causal_wan import AllTokens, CausalWanTransformer
from vidport.runtime.causal_wan_cache import CausalWanCache
from vidport.runtime.distributed import World
from vidport.runtime.parallel_wan import read_shards, shard_block

LAUNCH_HINT = ('vidport generate --launch "-n 2 --backend ring" ... (or mlx.launch -n 2 --python PYTHON -- '
               'vidport generate ...)')


class CausalPlan:
    """One process: the causal DiT as it is."""

    name: str | None = None

    def __init__(self, world: World):
        self.world = world

    def check(self, dit_config: dict[str, Any], call_tokens: tuple[int, ...]) -> None:
        """Refuse, before any weight loads, a plan this run's ranks and model cannot take;
        `call_tokens`: the patch tokens of each kind of DiT call the run makes (a block; i2v's
        image frame)."""
        if self.world.size > 1:
            raise VidportError(f"{self.world.size} ranks but no parallel plan: every rank would repeat the whole run",
                               hint="add --set parallel=tensor|sequence")

    def describe(self, dit_config: dict[str, Any]) -> str:
        return "single process"

    def load(self, folder: Path) -> nn.Module:
        """The causal DiT of the folder, as this rank holds it."""
        return CausalWanTransformer.load(folder)


class _Parallel(CausalPlan):
    def check(self, dit_config: dict[str, Any], call_tokens: tuple[int, ...]) -> None:
        if self.world.size == 1:
            raise VidportError(f"--set parallel={self.name}: this process was not started by mlx.launch (1 rank)",
                               hint=LAUNCH_HINT)


class CausalTensorPlan(_Parallel):
    name = "tensor"

    def check(self, dit_config: dict[str, Any], call_tokens: tuple[int, ...]) -> None:
        super().check(dit_config, call_tokens)
        n = self.world.size
        for key in ("num_attention_heads", "ffn_dim"):
            if dit_config[key] % n:
                raise VidportError(f"--set parallel=tensor: the DiT's {key} {dit_config[key]} does not split across "
                                   f"{n} ranks", hint="launch a number of processes that divides it, or use sequence")

    def describe(self, dit_config: dict[str, Any]) -> str:
        n, heads, ffn = self.world.size, dit_config["num_attention_heads"], dit_config["ffn_dim"]
        return (f"tensor over {n} ranks: each rank {heads // n} of {heads} heads and {ffn // n} of {ffn} FFN columns "
                f"of every block, loaded as shards tensor by tensor; the KV cache holds each rank's heads (1/{n})")

    def load(self, folder: Path) -> nn.Module:
        model = CausalWanTransformer.load(folder)  # lazy: nothing read yet
        for block in model.blocks:
            shard_block(block, self.world)
        read_shards(model)
        model.blocks = [GuardedCausalBlock(block, index, self.world) for index, block in enumerate(model.blocks)]
        return model


class CausalSequencePlan(_Parallel):
    name = "sequence"

    def check(self, dit_config: dict[str, Any], call_tokens: tuple[int, ...]) -> None:
        super().check(dit_config, call_tokens)
        for tokens in call_tokens:
            if tokens % self.world.size:
                raise VidportError(f"--set parallel=sequence: a DiT call's {tokens} tokens do not split into "
                                   f"{self.world.size} equal parts",
                                   hint="change --height/--width, or the number of processes")

    def describe(self, dit_config: dict[str, Any]) -> str:
        return (f"sequence over {self.world.size} ranks: each block's tokens split, keys and values all-gathered in "
                f"each of {dit_config['num_layers']} self-attentions, full weights and KV cache on every rank")

    def load(self, folder: Path) -> nn.Module:
        return SequenceParallelCausalWan(CausalWanTransformer.load(folder), self.world)


class CausalCfgPlan(_Parallel):
    name = "cfg"

    def check(self, dit_config: dict[str, Any], call_tokens: tuple[int, ...]) -> None:
        raise VidportError("--set parallel=cfg: Self-Forcing runs without classifier-free guidance (it was distilled "
                           "without it), so each step is one DiT pass and there is no second pass to give a rank",
                           hint="use --set parallel=tensor or parallel=sequence")


PLANS: dict[str | None, type[CausalPlan]] = {None: CausalPlan, "cfg": CausalCfgPlan, "sequence": CausalSequencePlan,
                                             "tensor": CausalTensorPlan}


def causal_plan(name: str | None, world: World) -> CausalPlan:
    return PLANS[name](world)


def cache_report(cache: CausalWanCache) -> dict[str, int]:
    """This rank's KV cache bytes: the self-attention keys/values and all of it with the prompt's."""
    own = sum(k.nbytes + v.nbytes for k, v in zip(cache.keys, cache.values))
    return {"cache_self_bytes": own, "cache_bytes": cache.nbytes}


class GuardedCausalBlock(nn.Module):
    """A sharded block as the causal DiT uses it (`around` with its attentions), its output
    evaluated under the watchdog: each wait on the other ranks is bounded."""

    def __init__(self, block: nn.Module, index: int, world: World):
        super().__init__()
        self.block = block
        self._label = f"DiT block {index}"
        self._world = world

    @property
    def attn1(self) -> nn.Module:
        return self.block.attn1

    @property
    def attn2(self) -> nn.Module:
        return self.block.attn2

    def around(self, hidden_states: mx.array, temb: mx.array, self_attention: Callable[[mx.array], mx.array],
               cross_attention: Callable[[mx.array], mx.array]) -> mx.array:
        out = self.block.around(hidden_states, temb, self_attention, cross_attention)
        self._world.evaluate(out, what=self._label)
        return out


class RankTokens(AllTokens):
    """This rank's contiguous share of a block's tokens (see the module doc)."""

    def __init__(self, world: World):
        self._world = world

    def part(self, x: mx.array, axis: int) -> mx.array:
        share = x.shape[axis] // self._world.size
        return x[(slice(None),) * axis + (slice(self._world.rank * share, (self._world.rank + 1) * share),)]

    def gather(self, x: mx.array, axis: int) -> mx.array:
        """[.., tokens / N, ..] on every rank -> [.., tokens, ..] in rank order."""
        return mx.distributed.all_gather(x.swapaxes(0, axis), group=self._world.group).swapaxes(0, axis)

    def settle(self, *arrays: Any, what: str) -> None:
        self._world.evaluate(*arrays, what=what)


class SequenceParallelCausalWan(nn.Module):
    """CausalWanTransformer's block forward with this rank's share of the block's tokens; the same call."""

    def __init__(self, dit: CausalWanTransformer, world: World):
        super().__init__()
        self.dit = dit
        self._tokens = RankTokens(world)

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return self.dit(*args, **kwargs, tokens=self._tokens)
