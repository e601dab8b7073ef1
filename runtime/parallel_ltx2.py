"""Parallel plans for the LTX-2 audio-video DiT (`--set parallel=cfg|sequence|tensor` under `mlx.launch`), each
giving every rank the same video and audio latents after every step, equal to the single-process
run:

- cfg: the guided passes of a step (runtime.pipelines.ltx2_denoise.pass_names: conditional,
  unconditional, STG's perturbed pass on LTX-2.3, modality isolation's) are dealt round-robin to
  the ranks (2 up to as many as there are passes: the dev recipe on LTX-2.0 has 3, on LTX-2.3 4).
  Each rank runs its passes at batch 1, then one all_gather of every rank's predictions (video
  and audio velocities flattened into one row a pass; a rank with a pass fewer sends zeros in its
  place: ceil(passes / N) x N x (video + audio latent values) a step) and every rank combines the
  guidance and steps the schedulers itself. In one process the CFG pair runs as one batch of
  2, as diffusers does; the difference is rounding only.
- tensor: each block's attention heads (video and audio self-attention, their text cross-
  attention, and the audio-to-video and video-to-audio attention, which run at the audio
  stream's heads) and both feed-forwards split with MLX's own sharded layers: AllToShardedLinear
  for to_q/to_k/to_v, LTX-2.3's per-head gate logits and the FFN's first linear,
  ShardedToAllLinear for to_out.0 and the FFN's second. LTX-2 normalises q and k over all heads at
  once (qk_norm rms_norm_across_heads), so they take runtime.parallel_wan's ShardedRMSNorm (one
  all_sum of one value per token); each attention rotates its heads by its slice of the RoPE
  tables (SPLIT tables per head, INTERLEAVED per channel). Video and audio heads must divide by N.
  Tensors are read lazily and sliced one at a time (as the Wan plan does): no rank holds the model.
- sequence: the video tokens are split contiguously across ranks after the input projection
  (each rank its slice of the video RoPE tables, the cross-modal ones included, and of per-token
  modulation: i2v's timesteps); the audio tokens (a few hundred) stay whole on every rank. The
  DiT's own blocks run with a hook (runtime.causal_wan.AllTokens; here RankTokens): in the video
  self-attention each rank's queries attend to the rotated keys and the values of every rank
  (all-gathered); the text cross-attention, the audio-to-video attention (video queries, audio
  keys) and the video FFN are per video token, so local; the video-to-audio attention (audio
  queries, video keys) gathers the video keys and values too, so every rank computes the same
  audio stream, whose self-attention, text attention and FFN each rank repeats. The video output
  tokens are all-gathered before the output projection. Per block 2 x 2 gathers of video tokens
  (keys and values of the two attentions); full weights on every rank. Every stage's video tokens
  must divide by N (refused otherwise: padding would change the softmax).

Every DiT block's output is evaluated under the watchdog (runtime.distributed) under tensor and
sequence, and the gather of the passes under cfg, so a lost or hung rank stops the run within
`collective_timeout`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear

from vidport.converter.core.errors import VidportError
from vidport.runtime.distributed import World
from vidport.runtime.parallel_causal_wan import RankTokens
from vidport.runtime.parallel_wan import GuardedBlock, ShardedRMSNorm, read_shards
from vidport.runtime.pipelines.ltx2_denoise import Prediction, run_passes

ATTENTIONS = ("attn1", "audio_attn1", "attn2", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
LAUNCH_HINT = ('vidport generate --launch "-n 2 --backend ring" ... (or mlx.launch -n 2 --python PYTHON -- '
               'vidport generate ...)')


def load_dit(folder: Path, low_memory: bool = False) -> nn.Module:
    """The whole DiT of a converted folder (`low_memory`: its blocks' weights streamed from disk)."""
    if low_memory:
        from vidport.runtime.streamed_blocks import load_streamed

        return load_streamed(folder)
    from vidport.runtime.loading import load_model

    return load_model(folder)


class LTX2Plan:
    """One process: the DiT as it is, the passes as diffusers batches them."""

    name: str | None = None

    def __init__(self, world: World):
        self.world = world

    def check(self, dit_config: dict[str, Any], passes: list[str], video_tokens: tuple[int, ...],
              low_memory: bool) -> None:
        """Refuse, before any weight loads, a plan this run's ranks, model and guidance cannot
        take; `passes`: the DiT passes of one step, `video_tokens`: each stage's video tokens."""
        if self.world.size > 1:
            raise VidportError(f"{self.world.size} ranks but no parallel plan: every rank would repeat the whole run",
                               hint="add --set parallel=cfg|sequence|tensor")

    def describe(self, dit_config: dict[str, Any], passes: list[str]) -> str:
        return "single process"

    def load(self, folder: Path, low_memory: bool = False) -> nn.Module:
        """The DiT of the folder, as this rank holds it."""
        return load_dit(folder, low_memory)

    def passes(self, names: list[str], one: Callable[[str], Prediction],
               pair: Callable[[], dict[str, Prediction]]) -> dict[str, Prediction]:
        """The predictions of one step's passes, every one of them on every rank."""
        return run_passes(names, one, pair)

    def evaluate(self, *arrays: mx.array, what: str) -> None:
        self.world.evaluate(*arrays, what=what)


class _Parallel(LTX2Plan):
    def check(self, dit_config: dict[str, Any], passes: list[str], video_tokens: tuple[int, ...],
              low_memory: bool) -> None:
        if self.world.size == 1:
            raise VidportError(f"--set parallel={self.name}: this process was not started by mlx.launch (1 rank)",
                               hint=LAUNCH_HINT)


class LTX2CfgPlan(_Parallel):
    name = "cfg"

    def check(self, dit_config: dict[str, Any], passes: list[str], video_tokens: tuple[int, ...],
              low_memory: bool) -> None:
        super().check(dit_config, passes, video_tokens, low_memory)
        if len(passes) == 1:
            raise VidportError("--set parallel=cfg: this run makes one DiT pass a step (no CFG, STG or modality "
                               "guidance: the distilled recipe, or guidance scales off), so none to give another rank",
                               hint="use --set parallel=tensor, or the dev recipe's guidance")
        if self.world.size > len(passes):
            raise VidportError(f"--set parallel=cfg: {self.world.size} ranks but {len(passes)} DiT passes a step "
                               f"({', '.join(passes)})", hint=f"launch 2 to {len(passes)} processes")

    def describe(self, dit_config: dict[str, Any], passes: list[str]) -> str:
        n = self.world.size
        shares = "; ".join(f"rank {r} {' + '.join(passes[r::n])}" for r in range(n))
        return (f"cfg over {n} ranks: the {len(passes)} guidance passes of each step shared ({shares}); one all_gather "
                "a step")

    def passes(self, names: list[str], one: Callable[[str], Prediction],
               pair: Callable[[], dict[str, Prediction]]) -> dict[str, Prediction]:
        world, n = self.world, self.world.size
        slots = math.ceil(len(names) / n)
        own = [one(name) for name in names[world.rank::n]]
        mx.eval(own)  # this rank's own work: no wait on the others
        video, audio = own[0]
        flat = [mx.concatenate([v.reshape(-1), a.reshape(-1)]) for v, a in own]
        flat += [mx.zeros_like(flat[0])] * (slots - len(flat))  # every rank sends as many
        gathered = mx.distributed.all_gather(mx.stack(flat), group=world.group)  # [N * slots, video + audio]
        world.evaluate(gathered, what="gathering the guidance passes")
        at = {name: (i % n) * slots + i // n for i, name in enumerate(names)}  # rank-major, then slot
        return {name: (gathered[at[name], :video.size].reshape(video.shape),
                       gathered[at[name], video.size:].reshape(audio.shape)) for name in names}


class LTX2TensorPlan(_Parallel):
    name = "tensor"

    def check(self, dit_config: dict[str, Any], passes: list[str], video_tokens: tuple[int, ...],
              low_memory: bool) -> None:
        super().check(dit_config, passes, video_tokens, low_memory)
        if low_memory:
            raise VidportError("--set parallel=tensor with --low-memory: the streamed DiT reads whole blocks from "
                               "disk, the tensor plan holds each rank's slices of them",
                               hint="drop --low-memory: each rank holds 1/N of the blocks")
        n = self.world.size
        for key in ("num_attention_heads", "audio_num_attention_heads"):
            if dit_config[key] % n:
                raise VidportError(f"--set parallel=tensor: the DiT's {key} {dit_config[key]} does not split across "
                                   f"{n} ranks",
                                   hint="launch a number of processes that divides it, or use cfg or sequence")

    def describe(self, dit_config: dict[str, Any], passes: list[str]) -> str:
        n, heads, audio = self.world.size, dit_config["num_attention_heads"], dit_config["audio_num_attention_heads"]
        return (f"tensor over {n} ranks: each rank {heads // n} of {heads} video heads, {audio // n} of {audio} audio "
                f"heads (self, text and audio-video attention) and 1/{n} of both feed-forwards of every block, loaded "
                "as shards tensor by tensor")

    def load(self, folder: Path, low_memory: bool = False) -> nn.Module:
        from vidport.runtime.loading import load_model

        model = load_model(folder)  # lazy: nothing read yet
        for block in model.transformer_blocks:
            shard_ltx2_block(block, self.world)
        read_shards(model)
        model.transformer_blocks = [GuardedLTX2Block(block, i, self.world)
                                    for i, block in enumerate(model.transformer_blocks)]
        return model


class LTX2SequencePlan(_Parallel):
    name = "sequence"

    def check(self, dit_config: dict[str, Any], passes: list[str], video_tokens: tuple[int, ...],
              low_memory: bool) -> None:
        super().check(dit_config, passes, video_tokens, low_memory)
        for tokens in video_tokens:
            if tokens % self.world.size:
                raise VidportError(f"--set parallel=sequence: {tokens} video tokens (latent frames x rows x columns) "
                                   f"do not split into {self.world.size} equal parts",
                                   hint="change --frames/--height/--width, or the number of processes")

    def describe(self, dit_config: dict[str, Any], passes: list[str]) -> str:
        n, layers = self.world.size, dit_config["num_layers"]
        return (f"sequence over {n} ranks: video tokens split (1/{n} each), keys and values all-gathered in each of "
                f"{layers} video self-attentions and {layers} video-to-audio attentions; audio tokens whole on every "
                "rank; full weights on every rank")

    def load(self, folder: Path, low_memory: bool = False) -> nn.Module:
        return SequenceParallelLTX2(load_dit(folder, low_memory), self.world)


PLANS: dict[str | None, type[LTX2Plan]] = {None: LTX2Plan, "cfg": LTX2CfgPlan, "sequence": LTX2SequencePlan,
                                           "tensor": LTX2TensorPlan}


def ltx2_plan(name: str | None, world: World) -> LTX2Plan:
    return PLANS[name](world)


# ---------------------------------------------------------------------------------------------- tensor


class HeadShard(nn.Module):
    """A sharded LTX2Attention, given the rotary tables of all heads: it passes on this rank's
    slice (SPLIT tables [B, heads, T, half] by head, INTERLEAVED [B, T, channels] by channel; the
    rank's heads are a contiguous run of both)."""

    def __init__(self, attn: nn.Module, world: World):
        super().__init__()
        self.attn = attn
        self._rank, self._size = world.rank, world.size

    def _own(self, rotary: tuple[mx.array, mx.array] | None) -> tuple[mx.array, mx.array] | None:
        if rotary is None:
            return None
        split = rotary[0].ndim == 4
        share = rotary[0].shape[1 if split else -1] // self._size
        own = slice(self._rank * share, (self._rank + 1) * share)
        return tuple(t[:, own] if split else t[..., own] for t in rotary)

    def __call__(self, hidden_states: mx.array, encoder_hidden_states: mx.array | None = None,
                 attention_mask: mx.array | None = None, query_rotary_emb: tuple[mx.array, mx.array] | None = None,
                 key_rotary_emb: tuple[mx.array, mx.array] | None = None, **perturbation: Any) -> mx.array:
        return self.attn(hidden_states, encoder_hidden_states, attention_mask, self._own(query_rotary_emb),
                         self._own(key_rotary_emb), **perturbation)


def shard_ltx2_block(block: nn.Module, world: World) -> None:
    """Split one LTX2VideoTransformerBlock's heads (all six attentions) and both FFNs' columns
    across the ranks, in place."""
    group = world.group
    for name in ATTENTIONS:
        attn = getattr(block, name)
        for proj in ("to_q", "to_k", "to_v", "to_gate_logits"):
            if proj in attn:
                setattr(attn, proj, shard_linear(getattr(attn, proj), "all-to-sharded", group=group))
        attn.to_out[0] = shard_linear(attn.to_out[0], "sharded-to-all", group=group)
        attn.norm_q = ShardedRMSNorm.from_norm(attn.norm_q, world)
        attn.norm_k = ShardedRMSNorm.from_norm(attn.norm_k, world)
        attn.heads //= world.size
        setattr(block, name, HeadShard(attn, world))
    for ff in (block.ff, block.audio_ff):
        ff.net[0].proj = shard_linear(ff.net[0].proj, "all-to-sharded", group=group)
        ff.net[2] = shard_linear(ff.net[2], "sharded-to-all", group=group)


class GuardedLTX2Block(GuardedBlock):
    """GuardedBlock (its (video, audio) output evaluated under the watchdog), answering the
    pipeline's question of the block: does it take STG's perturbation."""

    @property
    def perturbed_attn(self) -> bool:
        return self.block.perturbed_attn


# ---------------------------------------------------------------------------------------------- sequence


class SequenceParallelLTX2(nn.Module):
    """The LTX-2 DiT's own forward on this rank's share of the video tokens (see the module doc);
    the same call, and what the pipeline reads of the DiT (its dtype, its blocks)."""

    def __init__(self, dit: nn.Module, world: World):
        super().__init__()
        self.dit = dit
        self._tokens = RankTokens(world)

    @property
    def proj_in(self) -> nn.Module:
        return self.dit.proj_in

    @property
    def transformer_blocks(self) -> list[nn.Module]:
        return self.dit.transformer_blocks

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[mx.array, mx.array]:
        return self.dit(*args, **kwargs, tokens=self._tokens)
