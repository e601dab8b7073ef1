"""The caches of a causal (Self-Forcing / CausVid) Wan DiT: per layer, the rotated self-attention
keys and values of every frame generated so far, and the cross-attention keys and values of the
prompt, computed once.

A block of latent frames attends to the cached frames and to itself. Only the pass that writes
(`write=True`, the clean pass at timestep 0 in the official inference) adds its keys and values;
the official code writes on every pass and overwrites the block's slots, so the clean pass's are
the ones later blocks see either way.

Rolling window (`local_attn_size` L frames, `sink_size` S frames): a block ending at frame e sees
the frames f < e with f < S (the sinks, kept for ever) or f >= e - (L - S), its own included;
that is what the official eviction leaves in its L-frame cache. Frames no later block can see are
dropped when a block is written, so the cache holds at most L frames.
"""
from __future__ import annotations

import mlx.core as mx

from vidport.runtime.wan_attention import ContextKV


class CausalWanCache:
    """Made empty for a new video; `CausalWanTransformer` fills it. `frames` is the number of
    latent frames written, which is where the next block starts."""

    def __init__(self, local_attn_size: int | None = None, sink_size: int = 0):
        if local_attn_size is not None and local_attn_size < 1:
            raise ValueError(f"local_attn_size {local_attn_size}: give a number of frames >= 1, or None for no window")
        if sink_size < 0 or (local_attn_size is not None and sink_size >= local_attn_size):
            raise ValueError(f"sink_size {sink_size}: needs 0 <= sink_size < local_attn_size ({local_attn_size})")
        if local_attn_size is None and sink_size:
            raise ValueError("sink_size needs a local_attn_size window")
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.frames = 0
        self.keys: list[mx.array] = []  # per layer [batch, tokens, heads, head_dim], rotated
        self.values: list[mx.array] = []
        self.cross: list[ContextKV] | None = None  # per layer, from the prompt (and image)
        self.dtype: mx.Dtype | None = None  # the context's, which the timestep embedding takes
        self._held: list[int] = []  # the frame index of each frame held, in cache order
        self._frame_tokens = 0

    def check_block(self, start_frame: int, frames: int, frame_tokens: int) -> None:
        """Blocks run in order and keep their size of frame in tokens; a window must leave room
        for the block beside the sinks (else the official eviction overwrites a sink)."""
        if start_frame != self.frames:
            raise ValueError(f"the block starts at frame {start_frame} but the cache holds {self.frames} frames: "
                             "blocks run in order, each starting where the written ones end")
        if self._held and frame_tokens != self._frame_tokens:
            raise ValueError(f"{frame_tokens} tokens a frame, the cached frames have {self._frame_tokens}")
        self.check_window(frames)

    def check_window(self, frames: int) -> None:
        """A window must leave room for a block of `frames` beside the sinks."""
        if self.local_attn_size is not None and frames > self.local_attn_size - self.sink_size:
            raise ValueError(f"a block of {frames} frames does not fit a window of {self.local_attn_size} frames "
                             f"with {self.sink_size} sink frames")

    def _visible_frames(self, end: int) -> list[int]:
        """Positions (in cache order) of the held frames a block ending at frame `end` sees."""
        if self.local_attn_size is None:
            return list(range(len(self._held)))
        first = end - (self.local_attn_size - self.sink_size)
        return [i for i, frame in enumerate(self._held) if frame < self.sink_size or frame >= first]

    def _token_runs(self, positions: list[int]) -> list[tuple[int, int]]:
        """Consecutive cache positions merged into token ranges."""
        runs: list[tuple[int, int]] = []
        for i in positions:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return [(a * self._frame_tokens, b * self._frame_tokens) for a, b in runs]

    def _select(self, array: mx.array, runs: list[tuple[int, int]]) -> mx.array:
        parts = [array[:, a:b] for a, b in runs]
        return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)

    def visible(self, frames: int) -> list[tuple[mx.array, mx.array]] | None:
        """Per layer, the cached (k, v) that a block of `frames` frames starting at `self.frames`
        attends to besides itself; None when there are none."""
        runs = self._token_runs(self._visible_frames(self.frames + frames))
        if not runs:
            return None
        return [(self._select(k, runs), self._select(v, runs)) for k, v in zip(self.keys, self.values)]

    def write(self, keys_values: list[tuple[mx.array, mx.array]], frames: int, frame_tokens: int) -> None:
        """Append a block's per-layer (k, v), then drop the frames no later block can see."""
        if self._held:
            self.keys = [mx.concatenate([old, k], axis=1) for old, (k, _) in zip(self.keys, keys_values)]
            self.values = [mx.concatenate([old, v], axis=1) for old, (_, v) in zip(self.values, keys_values)]
        else:
            self.keys, self.values = [k for k, _ in keys_values], [v for _, v in keys_values]
        self._frame_tokens = frame_tokens
        self._held += list(range(self.frames, self.frames + frames))
        self.frames += frames
        # the next block ends after `self.frames + 1` at the earliest: keep what it could see
        keep = self._visible_frames(self.frames + 1) if self.local_attn_size is not None else None
        if keep is not None and len(keep) < len(self._held):
            runs = self._token_runs(keep)
            self.keys = [self._select(k, runs) for k in self.keys]
            self.values = [self._select(v, runs) for v in self.values]
            self._held = [self._held[i] for i in keep]
        mx.eval(self.keys, self.values)

    @property
    def held_frames(self) -> list[int]:
        """The frame indices whose keys and values the cache holds now."""
        return list(self._held)

    @property
    def nbytes(self) -> int:
        """Memory of everything cached: self-attention keys/values and the cross-attention ones."""
        total = sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))
        for k, v, image in self.cross or []:
            total += k.nbytes + v.nbytes + (image[0].nbytes + image[1].nbytes if image else 0)
        return total
