"""Self-Forcing (and CausVid) on MLX: Wan 2.1 made causal and autoregressive, generating a block of
latent frames at a time in a few steps and streaming the video out as each block is final, as the
official `CausalInferencePipeline` runs it:

- per block (3 latent frames in the released models): the block's noise is denoised at the few-step
  schedule's timesteps (runtime/self_forcing_schedule.py), the DiT predicting x0 at each and x0
  noised again with fresh noise before the next; every frame of the block sees every earlier block
  through the KV cache (runtime/causal_wan.py) and no later one;
- then one pass of the clean block at timestep 0 writes its keys and values to the cache, for the
  blocks after it;
- the block's latents are decoded at once by the Wan VAE's causal cache (`FrameDecoder`) and handed
  to the writer, so the file grows while later blocks are generated;
- no classifier-free guidance (the distilled models were trained without it);
- i2v: the image's latent is the first latent frame, written to the cache by a pass at timestep 0
  (the official `initial_latent` with `independent_first_frame`); the generated blocks follow it.
  A DiT with image cross-attention also gets the CLIP image tokens.
- a rolling cache (`--set local_attn_size=N sink_size=S`, in latent frames, as the official options)
  bounds memory for long videos;
- on several processes (`--set parallel=tensor|sequence` under mlx.launch: runtime.parallel_causal_wan)
  every rank runs the same loop on its share of the DiT; rank 0 alone decodes and writes.

Noise from a seed, or every draw from a file (`noise` (1, C, F, h, w): each block's starting noise;
`renoise` (steps - 1, 1, C, F, h, w): the fresh noise of each re-noising, frame by frame), so runs
are reproducible and comparable with the reference (golden/self_forcing_parity.py).
"""
from __future__ import annotations

import json
import secrets
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.runtime.distributed import World
from vidport.runtime.parallel_causal_wan import CausalPlan, cache_report
from vidport.runtime.parallel_wan import weight_report
from vidport.runtime.pipelines.folder import PipelineFolder
from vidport.runtime.pipelines.protocol import DecodeCallback, Generation, Request, Step, StepCallback
from vidport.runtime.pipelines.wan import TEXT_LENGTH, WanPipeline
from vidport.runtime.pipelines.wan_checks import check_request
from vidport.runtime.pipelines.wan_image import vae_pixels
from vidport.runtime.pipelines.wan_latents import FrameDecoder, LatentStats, first_frame_latent, module_dtype
from vidport.runtime.self_forcing_schedule import DEFAULT_SHIFT, DEFAULT_STEPS, TRAIN_TIMESTEPS, FewStepSchedule

BLOCKS_DEFAULT = 7  # the released models' 21 latent frames (81 video frames)
DRAWS = ("noise", "renoise")


def causal_settings(folder: PipelineFolder) -> dict[str, Any]:
    """How the DiT runs, from its conversion manifest (the self-forcing family records it); a
    bidirectional Wan DiT is refused: it cannot run block by block."""
    settings = folder.components["transformer"].get("settings") or {}
    if not settings.get("causal"):
        raise VidportError(f"{folder.path / 'transformer'}: a bidirectional Wan DiT (its manifest records no causal "
                           "settings), not a Self-Forcing / CausVid one",
                           hint="convert the Self-Forcing checkpoint: vidport convert self-forcing CKPT --base "
                                "WAN_FOLDER --out DIR; run a Wan DiT with a Wan pipeline (vidport convert wan)")
    return settings


@contextmanager
def stop_as_error(ranks: World) -> Iterator[None]:
    """On several ranks, mlx.launch stops the others with SIGTERM once one fails; Python's default
    would end rank 0 on the spot and leave the video it streams half-written. Here the first
    SIGTERM raises instead (the later ones are ignored), so the writer removes its partial file."""
    if ranks.size == 1 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise VidportError(f"rank {ranks.rank}: stopped by mlx.launch (another rank failed); no output written")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class SelfForcingPipeline(WanPipeline):
    """A converted Self-Forcing pipeline folder (`vidport convert self-forcing CKPT --base WAN`)."""

    name = "self-forcing"
    decode_unit = "latent frame"
    streams_frames = True

    def __init__(self, folder: PipelineFolder):
        self.causal = causal_settings(folder)
        super().__init__(folder)
        if self.layout.task != "t2v":
            raise VidportError(f"{folder.path}: a {self.layout.task} Wan DiT ({self.folder.config('transformer')['in_channels']} "
                               "input channels); Self-Forcing runs a text-to-video DiT, an image as its first frame",
                               hint="convert a Self-Forcing / CausVid text-to-video checkpoint")
        self.block_frames = int(self.causal.get("num_frame_per_block", 3))

    @classmethod
    def from_folder(cls, path: str | Path) -> "SelfForcingPipeline":
        return cls(PipelineFolder.open_mlx(path, "self-forcing", "a Self-Forcing"))

    def model(self, name: str):
        if name == "transformer" and name not in self._models:
            from vidport.runtime.causal_wan import CausalWanTransformer

            path = self.folder.path / name  # under a parallel plan, as this rank holds it
            self._models[name] = self._plan.load(path) if self._plan else CausalWanTransformer.load(path)
        return super().model(name)

    # ------------------------------------------------------------------ the protocol

    @property
    def tasks(self) -> tuple[str, ...]:
        """Text to video; and image to video, the image's latent the first frame the blocks follow."""
        return ("i2v",) if self.layout.image_tokens else ("t2v", "i2v")

    def settings(self, task: str) -> set[str]:
        common = {"prompt", "frames", "steps", "height", "width", "seed", "noise", "fps", "prompt_embeds",
                  "max_sequence_length", "timestep_shift", "local_attn_size", "sink_size", "parallel",
                  "collective_timeout", "dump_steps"}
        return common | {"image"} if task == "i2v" else common

    def defaults(self, task: str) -> Request:
        """The official inference's: 7 blocks (81 frames; 85 with the image's frame), the 4-step
        schedule at shift 5, 480 x 832, 16 fps, the cache window the checkpoint was trained with."""
        height, width = self.default_size()
        window = self.causal.get("local_attn_size", -1)
        return Request(task=task, frames=self.frames_for(BLOCKS_DEFAULT, task), steps=DEFAULT_STEPS, height=height,
                       width=width, fps=16,
                       extra={"max_sequence_length": TEXT_LENGTH, "timestep_shift": DEFAULT_SHIFT,
                              "local_attn_size": None if window in (None, -1) else int(window),
                              "sink_size": int(self.causal.get("sink_size", 0))})

    def frames_for(self, blocks: int, task: str) -> int:
        """Video frames of `blocks` generated blocks (plus the image's latent frame for i2v)."""
        latent = blocks * self.block_frames + (task == "i2v")
        return 1 + self.layout.temporal * (latent - 1)

    def validate(self, request: Request) -> None:
        """Refuse what cannot run, from configs alone."""
        task = request.task
        self.check_frames(request.frames, task)
        check_request(self.layout, task, num_frames=request.frames, height=request.height, width=request.width,
                      has_image=request.image is not None, has_image_encoder=self.has("image_encoder"),
                      steps=request.steps)
        if request.steps > TRAIN_TIMESTEPS:
            raise VidportError(f"{request.steps} steps: at most {TRAIN_TIMESTEPS}",
                               hint=f"the models were distilled for {DEFAULT_STEPS}")
        if not float(request.extra["timestep_shift"]) > 0:
            raise VidportError(f"timestep_shift {request.extra['timestep_shift']}: give a positive number (official: 5)")
        self.new_cache(request)
        embeds = request.prompt_embeds or (None, None)
        if embeds[1] is not None:
            raise VidportError("a negative prompt's embeddings: Self-Forcing runs without classifier-free guidance",
                               hint="drop negative_prompt_embeds from the file")
        if embeds[0] is not None and (np.ndim(embeds[0]) != 3 or np.shape(embeds[0])[::2] != (1, self.layout.text_dim)):
            raise VidportError(f"prompt embeddings of shape {list(np.shape(embeds[0]))}: expected (1, tokens, "
                               f"{self.layout.text_dim})", hint="UMT5 states of this pipeline's text encoder, one prompt")
        if embeds[0] is None:
            if request.prompt is None:
                raise VidportError("no prompt", hint="pass --prompt TEXT")
            if not self.has("text_encoder") or not (self.folder.tokenizer / "tokenizer.json").exists():
                raise VidportError(f"{self.folder.path}: no UMT5 text encoder and tokenizer to encode the prompt with",
                                   hint="convert with --base WAN_FOLDER, or pass --prompt-embeds")
        self.check_draws(request)
        self.plan(request).check(self.folder.config("transformer"), self.call_tokens(request))

    # ------------------------------------------------------------------ parallel runs

    def plan(self, request: Request) -> CausalPlan:
        """The request's parallel plan over this process's ranks (runtime.parallel_causal_wan)."""
        from vidport.runtime.distributed import parse_plan, parse_timeout, world
        from vidport.runtime.parallel_causal_wan import causal_plan

        ranks = world()
        ranks.watchdog.timeout = parse_timeout(request.extra.get("collective_timeout"))
        return causal_plan(parse_plan(request.extra.get("parallel")), ranks)

    def call_tokens(self, request: Request) -> tuple[int, ...]:
        """Patch tokens of each kind of DiT call at this request's size: a block of latent frames,
        and for i2v the image's frame."""
        _, _, _, height, width = self.latent_shape(request.frames, request.height, request.width)
        _, p_h, p_w = self.layout.patch
        frame = (height // p_h) * (width // p_w)
        return (self.block_frames * frame, frame) if request.task == "i2v" else (self.block_frames * frame,)

    def check_frames(self, frames: int, task: str) -> None:
        """Whole blocks only: 1 + 4 * (3n - 1) frames (i2v: 1 + 4 * 3n, the image's frame first)."""
        per_block = self.layout.temporal * self.block_frames
        first = self.frames_for(1, task)
        if frames >= first and (frames - first) % per_block == 0:
            return
        below = first + max(0, (frames - first) // per_block) * per_block
        fits = sorted({below, below + per_block} - {frames})
        raise VidportError(f"{frames} frames: this model generates blocks of {self.block_frames} latent frames "
                           f"({per_block} video frames), so it makes {first} + {per_block}k frames"
                           + (" (the image's frame first)" if task == "i2v" else ""),
                           hint="use --frames " + " or ".join(str(f) for f in fits))

    def check_draws(self, request: Request) -> None:
        draws = request.draws()
        unknown = sorted(set(draws) - set(DRAWS))
        if unknown:
            raise VidportError(f"noise draws {unknown}: Self-Forcing takes {', '.join(DRAWS)}",
                               hint="noise (1, C, latent frames, h, w); renoise (steps - 1, 1, C, latent frames, h, w)")
        shape = self.latent_shape(request.frames, request.height, request.width)
        expected = {"noise": shape, "renoise": (request.steps - 1, *shape)}
        for name, value in draws.items():
            if tuple(np.shape(value)) != expected[name]:
                raise VidportError(f"noise draw {name} has shape {tuple(np.shape(value))}; this request needs "
                                   f"{expected[name]}", hint="save the draws for the same --frames/--height/--width/--steps")

    # ------------------------------------------------------------------ sizes and pieces

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.layout.temporal + 1

    def blocks(self, request: Request) -> int:
        """Generated blocks (the i2v image's frame is not one)."""
        return (self.latent_frames(request.frames) - (request.task == "i2v")) // self.block_frames

    def new_cache(self, request: Request):
        """An empty KV cache with the request's window, refused here if the window cannot hold a block."""
        from vidport.runtime.causal_wan_cache import CausalWanCache

        window, sinks = request.extra["local_attn_size"], int(request.extra["sink_size"])
        try:
            cache = CausalWanCache(None if window in (None, -1) else int(window), sinks)
            cache.check_window(self.block_frames)
        except ValueError as err:
            raise VidportError(f"--set local_attn_size={window} sink_size={sinks}: {err}",
                               hint=f"a window of at least {self.block_frames} + sink_size latent frames, or -1 "
                                    "for none") from err
        return cache

    def _draws(self, request: Request, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(noise, renoise) channels-last: the file's, else drawn from the seed."""
        draws = request.draws()
        shape = self.latent_shape(request.frames, request.height, request.width)
        noise_key, renoise_key = mx.random.split(mx.random.key(seed))
        noise = draws.get("noise")
        if noise is None:
            noise = np.array(mx.random.normal(shape, key=noise_key))
        renoise = draws.get("renoise")
        if renoise is None:
            renoise = np.array(mx.random.normal((request.steps - 1, *shape), key=renoise_key))
        return (np.asarray(noise, np.float32).transpose(0, 2, 3, 4, 1),
                np.asarray(renoise, np.float32).transpose(0, 1, 3, 4, 5, 2))

    # ------------------------------------------------------------------ the loop

    def run(self, request: Request, on_step: StepCallback | None = None,
            on_decode: DecodeCallback | None = None) -> Generation:
        """The official loop. `extra`: `parallel` (runtime.parallel_causal_wan; rank 0 alone decodes
        and writes), `collective_timeout`, and the debug setting `dump_steps=DIR`: rank 0 saves each
        step's x0 (step_NNN.npy, blocks in turn) and the frames (frames.npy), every rank its DiT
        weight and KV cache bytes (rankR_weights.json)."""
        plan = self._plan = self.plan(request)
        ranks, dump = plan.world, request.extra.get("dump_steps")
        seed = ranks.agree(secrets.randbits(31) if request.seed is None else int(request.seed))
        began = time.perf_counter()
        model = self.model("transformer")
        dtype = module_dtype(model)
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
        context = self._text_states(request, guided=False)[0].astype(dtype)
        if request.release_weights:
            self._models.pop("text_encoder", None)
        vae_config = self.folder.config("vae")
        stats = LatentStats(vae_config["latents_mean"], vae_config["latents_std"])
        noise, renoise = self._draws(request, seed)
        schedule = FewStepSchedule.official(request.steps, float(request.extra["timestep_shift"]))
        cache = self.new_cache(request)
        decode_here = request.decode and ranks.is_main  # the other ranks only compute
        decoder = FrameDecoder(self.model("vae")) if decode_here else None
        latent_total = noise.shape[1]
        blocks = self.blocks(request)
        written = 0  # latent frames generated (or given) so far
        outputs: list[np.ndarray] = []
        kept: list[np.ndarray] = []
        seconds: list[float] = []
        stats_out: dict[str, float] = {}
        decode_seconds = 0.0

        def decode(latents: np.ndarray) -> None:
            nonlocal decode_seconds
            if decoder is None:
                return
            clock = time.perf_counter()
            frames = decoder(stats.denormalize(mx.array(latents)),
                             (lambda: on_decode(decoder.decoded, latent_total)) if on_decode else None)[0]
            decode_seconds += time.perf_counter() - clock
            if writer is not None:
                writer.append(frames)
            if writer is None or dump:
                kept.append(frames)
            stats_out.setdefault("first frame seconds", time.perf_counter() - began)

        writing = request.writer(None, None) if request.writer and decode_here else nullcontext()
        with stop_as_error(ranks), writing as writer, \
                ranks.watchdog.cleanup(getattr(writer, "abort", None) or (lambda: None)):
            if request.task == "i2v":
                image = self._first_frame(request, stats, dtype, model, context, cache)
                outputs.append(image)
                decode(image)
                written = 1
            for block in range(blocks):
                frames = slice(written, written + self.block_frames)
                x = noise[:, frames]
                for index, t in enumerate(schedule.timesteps):
                    clock = time.perf_counter()
                    flow = model(mx.array(x).astype(dtype), np.full(self.block_frames, t, np.float32), context,
                                 cache)
                    ranks.evaluate(flow, what=f"block {block + 1} step {index + 1}")
                    x0 = schedule.x0(x, np.array(flow.astype(mx.float32)), index)
                    if dump and ranks.is_main:
                        step = block * len(schedule) + index
                        np.save(Path(dump) / f"step_{step:03d}.npy", x0.transpose(0, 4, 1, 2, 3))
                    if index + 1 < len(schedule):
                        x = schedule.renoise(x0, renoise[index][:, frames], index + 1)
                    seconds.append(time.perf_counter() - clock)
                    if on_step:
                        on_step(Step(block * len(schedule) + index, blocks * len(schedule), t,
                                     mx.array(x0.transpose(0, 4, 1, 2, 3)), f"block {block + 1}/{blocks}"))
                outputs.append(x0)
                decode(x0)
                if block + 1 < blocks:  # the clean pass: what later blocks attend to
                    model(mx.array(x0).astype(dtype), np.zeros(self.block_frames, np.float32), context, cache,
                          write=True)
                written += self.block_frames

        latents = np.concatenate(outputs, axis=1)
        stats_out["cache MiB"] = cache.nbytes / 2**20
        if dump:
            report = {**weight_report(model), **cache_report(cache)}
            (Path(dump) / f"rank{ranks.rank}_weights.json").write_text(json.dumps(report))
            if kept and ranks.is_main:
                np.save(Path(dump) / "frames.npy", np.concatenate(kept))
        elapsed = time.perf_counter() - began
        if request.decode:
            stats_out["frames per second"] = (1 + self.layout.temporal * (latent_total - 1)) / elapsed
        frames_out = np.concatenate(kept) if kept and writer is None else None  # a writer took them
        return Generation(frames_out, mx.array(latents.transpose(0, 4, 1, 2, 3)),
                            None if "noise" in request.draws() else seed, schedule.timesteps, request.fps,
                            f"Self-Forcing few-step (shift {schedule.shift:g}, {self.block_frames} latent frames a block)",
                            seconds, decode_seconds, stats=stats_out)

    def _first_frame(self, request: Request, stats: LatentStats, dtype: mx.Dtype, model, context: mx.array,
                     cache) -> np.ndarray:
        """i2v: the image's normalized latent (1, 1, h, w, C), written to the cache at timestep 0
        (with the CLIP image tokens where the DiT cross-attends to them)."""
        pixels = vae_pixels(request.image, request.height, request.width)
        latent = np.array(first_frame_latent(self.model("vae"), stats, pixels))
        tokens = self.image_tokens(request.image).astype(dtype) if self.layout.image_tokens else None
        model(mx.array(latent).astype(dtype), np.zeros(1, np.float32), context, cache, image_context=tokens,
              write=True)
        return latent
