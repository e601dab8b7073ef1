"""Wan text-to-video, image-to-video and text/image-to-video on MLX, step for step as diffusers'
WanPipeline / WanImageToVideoPipeline run them:

- T2V (Wan 2.1; Wan 2.2 A14B): the DiT denoises noise under UMT5 text states, with classifier-free
  guidance against a negative prompt. A two-expert (A14B) folder runs `transformer` while the
  timestep is at or above `boundary_ratio` x num_train_timesteps, then `transformer_2` (with
  `guidance_2`).
- I2V (Wan 2.1): CLIP image tokens (penultimate layer) join the cross-attention, and the latents
  of [first frame, black frames...] behind a first-frame mask are concatenated to the DiT's input.
- TI2V (Wan 2.2 5B, `expand_timesteps`): the first latent frame is replaced by the image's latent
  and its tokens get timestep 0; without an image it is text-to-video with per-token timesteps.

The pipeline protocol (runtime/pipelines/protocol.py): `from_folder`, `tasks`, `defaults`,
`check`, `generate`. Everything a request needs is checked from configs before any model loads;
latents are channels-last inside, diffusers' (1, C, F, h, w) at the edges.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.runtime.parallel_vae import parse_tiling, split_tiled_decode
from vidport.runtime.wan_vae_tiling import TileGrid
from vidport.runtime.parallel_wan import WanPlan, weight_report
from vidport.runtime.pipelines.folder import PipelineFolder
from vidport.runtime.pipelines.protocol import DecodeCallback, Generation, Pipeline, Request, Step, StepCallback
from vidport.runtime.pipelines.wan_checks import WanLayout, check_components, check_request, layout_of
from vidport.runtime.pipelines.wan_image import clip_pixels, load_image, read_clip_config, vae_pixels
from vidport.runtime.pipelines.wan_latents import (LatentStats, decode_frames, first_frame_latent, first_frame_mask,
                                                   i2v_condition, module_dtype, to_unit_range, token_timesteps)
from vidport.runtime.wan_vae_layers import unpatchify
from vidport.runtime.wan_vae_tiling import Tiling

__all__ = ["WanPipeline", "check_components"]
DEFAULT_AREA = 480 * 832  # Wan's 480p
TEXT_LENGTH = 512  # UMT5 tokens: diffusers' and the official code's text_len


class WanPipeline(Pipeline):
    """A converted Wan pipeline folder (`vidport convert wan`); models load on first use, so an
    A14B run that never crosses the boundary loads one expert."""

    name = "wan"
    decode_unit = "latent frame"

    def __init__(self, folder: PipelineFolder):
        self.folder = folder
        index_file = folder.path / "model_index.json"
        self.model_index = json.loads(index_file.read_text()) if index_file.exists() else {}
        self.layout: WanLayout = layout_of(folder.configs(), self.model_index)
        self._models: dict[str, Any] = {}
        self._plan: WanPlan | None = None  # the run's parallel plan; None: one process

    @classmethod
    def from_folder(cls, path: str | Path) -> "WanPipeline":
        """Everything decidable without weights: the folder and that its components fit each other.
        The scheduler (and a class swap or flow shift) is checked with each request."""
        folder = PipelineFolder.open_mlx(path, "wan", "a Wan")
        if (folder.components["transformer"].get("settings") or {}).get("causal"):
            raise VidportError(f"{folder.path / 'transformer'}: a causal (Self-Forcing / CausVid) DiT, which runs block "
                               "by block over a KV cache, not over the whole video",
                               hint="convert it as a Self-Forcing pipeline: vidport convert self-forcing CKPT --base "
                                    "WAN_FOLDER --out DIR")
        return cls(folder)

    @property
    def task(self) -> str:
        """t2v, i2v or ti2v: what the DiT was trained for."""
        return self.layout.task

    def expert_at(self, t: Any) -> str:
        """The DiT that denoises at timestep `t`: `transformer`, or (A14B) below the boundary
        `transformer_2`. Compared in float32, as diffusers' torch comparison does."""
        ratio = self.layout.boundary_ratio
        if ratio is None:
            return "transformer"
        boundary = np.float32(ratio * self.folder.scheduler_config.get("num_train_timesteps", 1000))
        return "transformer" if np.float32(t) >= boundary else "transformer_2"

    def model(self, name: str):
        if name not in self._models:
            from vidport.runtime.loading import load_model

            self.folder.config(name)  # a clear error where the component is missing
            is_dit = name in ("transformer", "transformer_2") and self._plan is not None
            self._models[name] = self._plan.load(self.folder.path / name) if is_dit else load_model(
                self.folder.path / name)
        return self._models[name]

    def has(self, name: str) -> bool:
        return name in self.folder.components

    # ------------------------------------------------------------------ the protocol

    @property
    def tasks(self) -> tuple[str, ...]:
        """The DiT's own task; a TI2V model also runs text-to-video."""
        return ("ti2v", "t2v") if self.task == "ti2v" else (self.task,)

    def settings(self, task: str) -> set[str]:
        common = {"prompt", "negative_prompt", "frames", "steps", "guidance", "guidance_2", "height", "width", "seed",
                  "noise", "scheduler", "flow_shift", "fps", "prompt_embeds", "max_sequence_length",
                  "parallel", "collective_timeout", "dump_steps", "vae_tiling"}
        return common | {"image"} if task != "t2v" else common

    def defaults(self, task: str) -> Request:
        """Wan's: 81 frames, 50 steps, guidance 5, 480 x 832 (an image's aspect ratio at that area),
        16 fps, the folder's scheduler and flow shift, prompts encoded to 512 tokens."""
        height, width = self.default_size()
        return Request(task=task, negative_prompt="", frames=81, steps=50, guidance=5.0, height=height, width=width,
                       fps=16, scheduler=self.folder.scheduler_config.get("_class_name"),
                       extra={"max_sequence_length": TEXT_LENGTH})

    def resolve(self, request: Request) -> Request:
        """The image as an RGB PIL image; without a size, the image's aspect ratio at 480p's area."""
        if request.image is not None:
            image = load_image(request.image)
            height, width = self.default_size(image)
            request = replace(request, image=image, height=request.height or height, width=request.width or width)
        return super().resolve(request)

    def scheduler_for(self, request: Request) -> dict[str, Any]:
        """The folder's scheduler config, its class swapped by `scheduler` and its shift set by
        `flow_shift` (UniPC's flow_shift, flow-match Euler's shift), checked buildable."""
        config = self.folder.scheduler(request.scheduler)
        if request.flow_shift is not None:
            key = {"UniPCMultistepScheduler": "flow_shift", "FlowMatchEulerDiscreteScheduler": "shift"}.get(
                config["_class_name"])
            if key is None:
                raise VidportError(f"--flow-shift: {config['_class_name']} has no flow schedule",
                                   hint="Wan runs UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler")
            config[key] = float(request.flow_shift)
        return config

    def validate(self, request: Request) -> None:
        """Refuse what cannot run, from configs alone."""
        check_request(self.layout, request.task, num_frames=request.frames, height=request.height,
                      width=request.width, has_image=request.image is not None,
                      has_image_encoder=self.has("image_encoder"), guidance_scale_2=request.guidance_2,
                      steps=request.steps)
        text_dim, length = self.layout.text_dim, request.extra["max_sequence_length"]
        for embeds in request.prompt_embeds or ():
            if embeds is not None and (np.ndim(embeds) != 3 or np.shape(embeds)[::2] != (1, text_dim)):
                raise VidportError(f"prompt embeddings of shape {list(np.shape(embeds))}: expected (1, tokens, "
                                   f"{text_dim})", hint="UMT5 states of this pipeline's text encoder, one prompt")
        if self.layout.image_tokens:  # the DiT splits image tokens off its context by a text length of 512
            lengths = {np.shape(e)[1] for e in request.prompt_embeds or () if e is not None}
            if lengths - {TEXT_LENGTH} or length != TEXT_LENGTH:
                raise VidportError(f"text states of {sorted(lengths) or length} tokens: a Wan 2.1 I2V DiT takes "
                                   f"exactly {TEXT_LENGTH} (it finds the image tokens by that length)",
                                   hint=f"encode prompts to {TEXT_LENGTH} tokens")
        embeds = request.prompt_embeds or (None, None)
        if embeds[0] is None and request.prompt is None:
            raise VidportError("no prompt", hint="pass --prompt TEXT")
        if embeds[0] is None or (request.guidance > 1.0 and embeds[1] is None):
            if not self.has("text_encoder"):
                raise VidportError(f"{self.folder.path}: no text_encoder/ to encode the prompt with",
                                   hint="pass prompt embeddings instead")
            if not (self.folder.tokenizer / "tokenizer.json").exists():
                raise VidportError(f"{self.folder.tokenizer}: no tokenizer.json to encode the prompt with",
                                   hint="copy the UMT5 fast tokenizer (tokenizer.json) there, or pass prompt "
                                        "embeddings")
        draws = request.draws()
        if set(draws) - {"noise"}:
            raise VidportError(f"noise draws {sorted(draws)}: Wan takes the initial noise alone",
                               hint="save one array, (1, C, latent frames, h, w), as .npy")
        expected = self.latent_shape(request.frames, request.height, request.width)
        if "noise" in draws and tuple(np.shape(draws["noise"])) != expected:
            raise VidportError(f"noise has shape {tuple(np.shape(draws['noise']))}; this request needs {expected} "
                               "(1, latent channels, latent frames, height/s, width/s)",
                               hint="save the noise for the same --frames/--height/--width, or drop --noise")
        self.scheduler_for(request)
        self.tiling(request)
        self.plan(request).check([self.folder.config(name) for name in ("transformer", "transformer_2")
                                  if self.has(name)], self.tokens(request), request.guidance > 1.0)

    # ------------------------------------------------------------------ parallel runs

    def plan(self, request: Request) -> WanPlan:
        """The request's parallel plan over this process's ranks (runtime.parallel_wan)."""
        from vidport.runtime.distributed import parse_plan, parse_timeout, world
        from vidport.runtime.parallel_wan import wan_plan

        ranks = world()
        ranks.watchdog.timeout = parse_timeout(request.extra.get("collective_timeout"))
        return wan_plan(parse_plan(request.extra.get("parallel")), ranks)

    def describe_plan(self, request: Request) -> str:
        """The plan in one line, printed at the start of a run: the DiT's, then the VAE decode's."""
        plan = self.plan(request)
        return f"{plan.describe(self.folder.config('transformer'))}; {self.describe_decode(request, plan.world.size)}"

    # ------------------------------------------------------------------ decode

    def tiling(self, request: Request) -> Tiling | None:
        """`--set vae_tiling`: the VAE decodes in diffusers' overlapping spatial tiles (its
        `enable_tiling`), or whole frames (None, the default)."""
        return parse_tiling(request.extra.get("vae_tiling"), self.layout.spatial)

    def tile_grid(self, request: Request) -> TileGrid | None:
        tiling = self.tiling(request)
        if tiling is None:
            return None
        _, _, _, height, width = self.latent_shape(request.frames, request.height, request.width)
        return TileGrid.of(height, width, tiling, self.layout.spatial)

    def describe_decode(self, request: Request, ranks: int) -> str:
        """Who decodes: whole frames on rank 0 (the decoder is causal in time, so frames do not
        split exactly), or the tiles of a tiled decode dealt across the ranks (runtime.parallel_vae)."""
        grid = self.tile_grid(request)
        if grid is None:
            return "decode: rank 0, whole frames (--set vae_tiling=true splits tiles across ranks)"
        return grid.describe(self.tiling(request), ranks)

    def decode(self, request: Request, latents: mx.array, stats: LatentStats,
               on_decode: DecodeCallback | None) -> np.ndarray | None:
        """Denormalized frames on rank 0, None on the others. With tiling over several ranks every
        rank decodes its share of the tiles (runtime.parallel_vae); else rank 0 decodes alone."""
        ranks, tiling, grid = self._plan.world, self.tiling(request), self.tile_grid(request)
        split = grid is not None and grid.tiled and ranks.size > 1
        if not (split or ranks.is_main):
            return None
        if request.release_weights:
            for name in ("transformer", "transformer_2"):
                self._models.pop(name, None)
        vae = self.model("vae")
        vae.tiling = tiling
        if not split:
            return decode_frames(vae, stats.denormalize(latents), on_decode)[0]
        out = split_tiled_decode(vae, stats.denormalize(latents).astype(module_dtype(vae)), tiling, ranks)
        if out is None:
            return None
        if vae.patch_size:
            out = unpatchify(out, vae.patch_size)
        if on_decode:
            on_decode(latents.shape[1], latents.shape[1])
        return to_unit_range(out)[0]

    def tokens(self, request: Request) -> int:
        """Patch tokens of the DiT's input for this request's size."""
        _, _, frames, height, width = self.latent_shape(request.frames, request.height, request.width)
        p_t, p_h, p_w = self.layout.patch
        return (frames // p_t) * (height // p_h) * (width // p_w)

    # ------------------------------------------------------------------ sizes

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        lay = self.layout
        return (1, lay.z_dim, (frames - 1) // lay.temporal + 1, height // lay.spatial, width // lay.spatial)

    def default_size(self, image=None) -> tuple[int, int]:
        """480 x 832, or with an image its aspect ratio at that area, in multiples the models take."""
        mult_h, mult_w = self.layout.multiple
        if image is None:
            return 480 // mult_h * mult_h, 832 // mult_w * mult_w
        aspect = image.height / image.width
        height = round((DEFAULT_AREA * aspect) ** 0.5)
        return max(mult_h, height // mult_h * mult_h), max(mult_w, round(height / aspect) // mult_w * mult_w)

    # ------------------------------------------------------------------ conditioning

    def encode_prompt(self, prompt: str, negative_prompt: str = "", max_sequence_length: int = TEXT_LENGTH
                      ) -> tuple[mx.array, mx.array]:
        """(prompt, negative) UMT5 states, each (1, max_sequence_length, text_dim), zero past the
        prompt's tokens, as diffusers' WanPipeline.encode_prompt."""
        from vidport.runtime.pipelines.wan_text import UMT5Tokenizer, encode_prompts

        states = encode_prompts(UMT5Tokenizer(self.folder.tokenizer), self.model("text_encoder"),
                                [prompt, negative_prompt or ""], max_sequence_length)
        mx.eval(states)
        return states[0:1], states[1:2]

    def image_tokens(self, image) -> mx.array:
        """CLIP's penultimate hidden states of the image (Wan 2.1 I2V)."""
        pixels = mx.array(clip_pixels(image, read_clip_config(self.folder.path / "image_processor")))
        encoder = self.model("image_encoder")
        return encoder.hidden_states(pixels.astype(module_dtype(encoder)))[-2]

    def _text_states(self, request: Request, guided: bool) -> tuple[mx.array, mx.array | None]:
        """Given embeddings where the request has them, else the prompts encoded."""
        given = [mx.array(np.asarray(e, np.float32)) if e is not None else None
                 for e in request.prompt_embeds or (None, None)]
        if given[0] is None or (guided and given[1] is None):
            encoded = self.encode_prompt(request.prompt or "", request.negative_prompt,
                                         request.extra["max_sequence_length"])
            given = [g if g is not None else e for g, e in zip(given, encoded)]
        return given[0], given[1] if guided else None

    def _image_conditions(self, request: Request, stats: LatentStats, dtype: mx.Dtype
                          ) -> tuple[mx.array | None, mx.array | None]:
        """(CLIP image tokens, latent condition): I2V's tokens and [mask, latents of the first frame
        and black frames]; TI2V's first-frame latent; nothing without an image."""
        if request.image is None:
            return None, None
        pixels = vae_pixels(request.image, request.height, request.width)
        if self.layout.task != "i2v":
            return None, first_frame_latent(self.model("vae"), stats, pixels)
        tokens = self.image_tokens(request.image).astype(dtype) if self.layout.image_tokens else None
        return tokens, i2v_condition(self.model("vae"), stats, pixels, request.frames)

    def _model_input(self, latents: mx.array, condition: mx.array | None, mask: mx.array | None,
                     t: Any) -> tuple[mx.array, mx.array]:
        """(DiT input, timestep): TI2V puts the given first frame in place and gives its tokens
        timestep 0; I2V concatenates the condition's channels; T2V takes the latents as they are."""
        if mask is not None:
            x = (1 - mask) * condition + mask * latents if condition is not None else latents
            return x, token_timesteps(mask, float(t), self.layout.patch, latents.shape[0])
        x = mx.concatenate([latents, condition], axis=-1) if condition is not None else latents
        return x, mx.full((latents.shape[0],), np.float32(t))

    # ------------------------------------------------------------------ the loop

    def run(self, request: Request, on_step: StepCallback | None = None,
            on_decode: DecodeCallback | None = None) -> Generation:
        """diffusers' WanPipeline (t2v, also a TI2V model without an image) or
        WanImageToVideoPipeline (i2v, ti2v). `release_weights`: the text and image encoders go once
        encoded, A14B's high-noise expert once the low-noise one takes over (timesteps only fall),
        so one 14B expert is resident at a time; the next run reads them again.
        `extra`: `parallel` (runtime.parallel_wan), `vae_tiling` (the decode in tiles; over several
        ranks split across them, else rank 0 alone decodes), `collective_timeout`, and
        the debug setting `dump_steps=DIR`: rank 0 saves each step's latents (step_NNN.npy) and the
        frames (frames.npy), every rank its DiT weight bytes (rankR_weights.json)."""
        from vidport.runtime.schedulers import from_config

        draws = request.draws()
        plan = self._plan = self.plan(request)
        ranks, dump = plan.world, request.extra.get("dump_steps")
        seed = ranks.agree(secrets.randbits(31) if request.seed is None else int(request.seed))
        dtype = module_dtype(self.model("transformer"))
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
            (Path(dump) / f"rank{ranks.rank}_weights.json").write_text(json.dumps(weight_report(self.model("transformer"))))
        guided = request.guidance > 1.0
        context, negative = self._text_states(request, guided)
        context, negative = context.astype(dtype), negative.astype(dtype) if guided else None
        vae_config = self.folder.config("vae")
        stats = LatentStats(vae_config["latents_mean"], vae_config["latents_std"])
        image_context, condition = self._image_conditions(request, stats, dtype)
        if request.release_weights:
            for name in ("text_encoder", "image_encoder"):
                self._models.pop(name, None)

        shape = self.latent_shape(request.frames, request.height, request.width)
        start = (mx.array(np.asarray(draws["noise"], np.float32)) if "noise" in draws
                 else mx.random.normal(shape, key=mx.random.key(seed)))
        latents = start.transpose(0, 2, 3, 4, 1)  # channels-last
        mask = None
        if self.task == "ti2v":  # per-token timesteps; 0 on a given first frame
            mask = first_frame_mask(latents.shape) if condition is not None else mx.ones((1, *latents.shape[1:4], 1))

        config = self.scheduler_for(request)
        scheduler = from_config(config)
        scheduler.set_timesteps(request.steps)
        if self.task != "i2v":
            scheduler.set_begin_index(0)  # as WanPipeline does; the I2V pipeline finds its index by timestep
        guidance_2 = request.guidance_2 if request.guidance_2 is not None else request.guidance
        two_experts = self.layout.boundary_ratio is not None
        timesteps, seconds = list(scheduler.timesteps), []
        for index, t in enumerate(timesteps):
            began = time.perf_counter()
            expert = self.expert_at(t)
            if expert == "transformer_2" and request.release_weights:
                self._models.pop("transformer", None)
            model, scale = self.model(expert), request.guidance if expert == "transformer" else guidance_2
            x, timestep = self._model_input(latents, condition, mask, t)
            prediction = plan.predict(model, x.astype(dtype), timestep, context, negative, image_context, scale)
            latents = scheduler.step(prediction, t, latents)
            ranks.evaluate(latents, what=f"step {index + 1}")
            if dump and ranks.is_main:
                np.save(Path(dump) / f"step_{index:03d}.npy", np.array(latents.transpose(0, 4, 1, 2, 3)))
            seconds.append(time.perf_counter() - began)
            if on_step:
                on_step(Step(index, len(timesteps), float(t), latents.transpose(0, 4, 1, 2, 3),
                             expert if two_experts else None))
        if mask is not None and condition is not None:
            latents = (1 - mask) * condition + mask * latents

        result = Generation(None, latents.transpose(0, 4, 1, 2, 3), None if "noise" in draws else seed,
                            [float(t) for t in timesteps], request.fps, config["_class_name"], seconds)
        if request.decode:
            began = time.perf_counter()
            result.frames = self.decode(request, latents, stats, on_decode)
            if ranks.is_main:
                result.decode_seconds = time.perf_counter() - began
                if dump:
                    np.save(Path(dump) / "frames.npy", result.frames)
        return result
