"""LTX-2 text/image to video with sound on MLX, step for step as diffusers runs it:

- dev (`recipe=dev`): one stage at the requested size, LTX2Pipeline's schedule (sigmas 1 .. 1/steps
  shifted by the token count) and LTX-2's guidance (CFG, STG, modality isolation, rescale:
  runtime/pipelines/ltx2_denoise.py);
- distilled (`recipe=distilled`): diffusers' documented two-stage chain: LTX2Pipeline at half the
  size over the 8 distilled sigmas, LTX2LatentUpsamplePipeline (2x), LTX2Pipeline again at full
  size over the 3 stage-2 sigmas from the upsampled latents re-noised to the first of them. Both
  stages take the sigmas as they are (no shift), as ltx-pipelines' distilled pipeline does;
- image-to-video (LTX2ImageToVideoPipeline): the image's latent is the first latent frame, kept
  clean by the denoise mask (its tokens get timestep 0 and are not stepped).

Video and audio latents are denoised together by the one DiT; the soundtrack is decoded by the
audio VAE and the vocoder. The video VAE decodes in tiles and hands frames to the writer as they
are final. Latents are packed tokens inside (runtime/pipelines/ltx2_latents.py), diffusers'
unpacked layouts at the edges (noise draws, step callbacks).

On several processes (`--set parallel=cfg|sequence|tensor` under mlx.launch: runtime.parallel_ltx2) every
rank denoises; rank 0 alone decodes and writes."""
from __future__ import annotations

import json
import secrets
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.runtime.pipelines.folder import PipelineFolder
from vidport.runtime.pipelines.ltx2_checks import LTX2Layout, check_request, layout_of
from vidport.runtime.parallel_ltx2 import LTX2Plan, load_dit
from vidport.runtime.parallel_wan import weight_report
from vidport.runtime.pipelines.ltx2_denoise import Guidance, Text, denoise, pass_names
from vidport.runtime.pipelines.ltx2_latents import (DISTILLED_SIGMAS, STAGE_2_SIGMAS, Grid, audio_latent_frames,
                                                    calculate_shift, dev_sigmas, first_frame_mask, keep_masked,
                                                    pack_audio, pack_video, unpack_audio, unpack_video)
from vidport.runtime.pipelines.protocol import DecodeCallback, Generation, Pipeline, Request, Step, StepCallback

__all__ = ["LTX2Pipeline", "check_components"]

# the guidance of diffusers' LTX2Pipeline.__call__ (audio scales: None = the video ones); the
# distilled model runs unguided, one DiT pass per step
GUIDANCE_DEFAULTS = {"stg_scale": 1.0, "stg_blocks": [28], "modality_scale": 3.0, "guidance_rescale": 0.7,
                     "audio_guidance": 7.0, "audio_stg_scale": None, "audio_modality_scale": None,
                     "audio_guidance_rescale": None}
DISTILLED_GUIDANCE = {"stg_scale": 0.0, "modality_scale": 1.0, "guidance_rescale": 0.0, "audio_guidance": 1.0}
DRAWS = ("noise", "audio_noise", "stage2_noise", "stage2_audio_noise", "decode_noise")


def check_components(configs: dict[str, dict[str, Any]]) -> None:
    """Refuse, at conversion, components that do not fit each other."""
    layout_of(configs)


class LTX2Pipeline(Pipeline):
    """A converted LTX-2 folder (`vidport convert ltx2`); models load on first use."""

    name = "ltx2"
    decode_unit = "frames"
    streams_frames = True

    def __init__(self, folder: PipelineFolder):
        self.folder = folder
        self.layout: LTX2Layout = layout_of(folder.configs())
        self._models: dict[str, Any] = {}
        self._plan: LTX2Plan | None = None  # the run's parallel plan; None: one process

    @classmethod
    def from_folder(cls, path: str | Path) -> "LTX2Pipeline":
        return cls(PipelineFolder.open_mlx(path, "ltx2", "an LTX-2"))

    def model(self, name: str, low_memory: bool = False) -> Any:
        """A component, loaded on first use; the DiT with `low_memory` keeps its blocks' weights on
        disk and reads each block's just before it runs (runtime/streamed_blocks.py)."""
        if name not in self._models:
            from vidport.runtime.loading import load_model

            self.folder.config(name)  # a clear error where the component is missing
            path = self.folder.path / name
            if name == "transformer":  # under a parallel plan, as this rank holds it
                self._models[name] = self._plan.load(path, low_memory) if self._plan else load_dit(path, low_memory)
            else:
                self._models[name] = load_model(path)
        return self._models[name]

    def release(self, *names: str) -> None:
        for name in names:
            self._models.pop(name, None)

    # ------------------------------------------------------------------ protocol

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("t2v", "i2v")

    def default_recipe(self) -> str:
        """distilled where the release says so (its file or folder name), else dev."""
        inputs = self.folder.manifest.get("inputs", {})
        named = " ".join(str(value.get("path", "")) for value in inputs.values() if isinstance(value, dict))
        return "distilled" if "distilled" in named.lower() and self.layout.has_upsampler else "dev"

    def defaults(self, task: str) -> Request:
        extra = {"recipe": self.default_recipe(), "audio": self.layout.has_audio, "max_sequence_length": 1024,
                 "decode_timestep": 0.0, "tiling": True, "low_memory": False,
                 # how the detected version runs (LTX-2.0: false; diffusers' pipelines pass true for every version)
                 "use_cross_timestep": bool(self.folder.config("transformer").get("use_cross_timestep", True)),
                 **GUIDANCE_DEFAULTS,
                 "stg_blocks": [min(28, self.layout.num_layers - 1)]}
        if task == "i2v":
            extra.update(resize=False, image_crf=33)
        return Request(task=task, negative_prompt="", frames=121, steps=40, guidance=4.0, height=512, width=768,
                       fps=24, extra=extra)

    def settings(self, task: str) -> set[str]:
        taken = {"prompt", "negative_prompt", "frames", "steps", "guidance", "height", "width", "seed", "noise",
                 "fps", "prompt_embeds", *GUIDANCE_DEFAULTS, "recipe", "audio", "max_sequence_length",
                 "decode_timestep", "tiling", "use_cross_timestep", "low_memory", "parallel", "collective_timeout",
                 "dump_steps"}
        return taken | ({"image", "resize", "image_crf"} if task == "i2v" else set())

    def resolve(self, request: Request) -> Request:
        """The distilled recipe's steps (8 + 3) and guidance (none) unless given."""
        resolved = super().resolve(request)
        if resolved.extra["recipe"] != "distilled":
            return resolved
        given = request.extra
        extra = {**resolved.extra, **{k: v for k, v in DISTILLED_GUIDANCE.items() if k not in given}}
        return replace(resolved, extra=extra, steps=request.steps or len(DISTILLED_SIGMAS),
                       guidance=request.guidance if request.guidance is not None else 1.0)

    def validate(self, request: Request) -> None:
        extra = request.extra
        if extra["recipe"] not in ("dev", "distilled"):
            raise VidportError(f"recipe {extra['recipe']!r}: LTX-2 runs dev or distilled",
                               hint="--set recipe=dev (one stage, guided) or --set recipe=distilled (two stages)")
        two_stage = extra["recipe"] == "distilled"
        check_request(self.layout, request.frames, request.height, request.width, two_stage)
        if two_stage and not self.layout.has_upsampler:
            raise VidportError(f"{self.folder.path}: the distilled recipe upsamples latents, and this folder has no "
                               "latent_upsampler/", hint="convert with --input upsampler=FILE, or --set recipe=dev")
        if two_stage and request.steps != len(DISTILLED_SIGMAS):
            raise VidportError(f"--steps {request.steps}: the distilled recipe runs its {len(DISTILLED_SIGMAS)} "
                               "trained sigmas", hint="drop --steps, or --set recipe=dev")
        if not two_stage and request.steps < 2 and self.folder.scheduler_config.get("shift_terminal"):
            raise VidportError(f"--steps {request.steps}: the schedule is stretched to end at "
                               f"{self.folder.scheduler_config['shift_terminal']}, which takes at least 2 steps",
                               hint="--steps 2 or more (40 is the release's)")
        if extra["audio"] and not self.layout.has_audio:
            raise VidportError(f"{self.folder.path}: a video-only pipeline (no audio_vae/ and vocoder/) cannot make "
                               "a soundtrack", hint="drop --audio; the video is made without sound")
        bad = [b for b in extra["stg_blocks"] if not 0 <= int(b) < self.layout.num_layers]
        if bad:
            raise VidportError(f"stg_blocks {bad}: the DiT has blocks 0..{self.layout.num_layers - 1}",
                               hint=f"--set stg_blocks=[{self.layout.num_layers - 1}]")
        if request.task == "i2v":
            from vidport.runtime.pipelines.ltx2_image import check_aspect

            if request.image is None:
                raise VidportError("i2v needs an image", hint="vidport generate i2v --image IMG ...")
            if not extra["resize"]:
                check_aspect(request.image, request.height, request.width)
        if request.prompt_embeds is None and not request.prompt and request.prompt is not None:
            raise VidportError("an empty prompt", hint="describe the video with --prompt")
        if request.prompt_embeds is None and not self.layout.has_text_encoder:
            raise VidportError(f"{self.folder.path}: no text_encoder/ to encode the prompt with",
                               hint="convert with --input gemma=DIR, or pass --prompt-embeds FILE.npz")
        unknown = sorted(set(request.draws()) - set(DRAWS))
        if unknown:
            raise VidportError(f"noise draws {unknown}: LTX-2 takes {', '.join(DRAWS)}",
                               hint="save the draws in diffusers' layouts as one .npz")
        for name, shape in self.draw_shapes(request).items():
            given = request.draws().get(name)
            if given is not None and tuple(np.shape(given)) != shape:
                raise VidportError(f"noise draw {name} has shape {tuple(np.shape(given))}; this request needs {shape}",
                                   hint="save the draws for the same --frames/--height/--width, or drop --noise")
        self.plan(request).check(self.folder.config("transformer"), self.step_passes(request),
                                 tuple(grid.tokens for grid in self.stage_grids(request)), bool(extra["low_memory"]))

    # ------------------------------------------------------------------ parallel runs

    def plan(self, request: Request) -> LTX2Plan:
        """The request's parallel plan over this process's ranks (runtime.parallel_ltx2)."""
        from vidport.runtime.distributed import parse_plan, parse_timeout, world
        from vidport.runtime.parallel_ltx2 import ltx2_plan

        ranks = world()
        ranks.watchdog.timeout = parse_timeout(request.extra.get("collective_timeout"))
        return ltx2_plan(parse_plan(request.extra.get("parallel")), ranks)

    def describe_plan(self, request: Request) -> str:
        """The plan in one line, printed at the start of a run."""
        return self.plan(request).describe(self.folder.config("transformer"), self.step_passes(request))

    def step_passes(self, request: Request) -> list[str]:
        """The DiT passes of each step under the request's guidance, from the DiT's config."""
        return pass_names(self.guidance(request), bool(self.folder.config("transformer").get("perturbed_attn")))

    # ------------------------------------------------------------------ sizes

    def grid(self, frames: int, height: int, width: int, fps: float) -> Grid:
        lay = self.layout
        return Grid((frames - 1) // lay.temporal + 1, height // lay.spatial, width // lay.spatial,
                    audio_latent_frames(frames, fps, lay.audio_rate, lay.hop_length, lay.audio_compression))

    def stage_grids(self, request: Request) -> list[Grid]:
        """Each stage's latent sizes: the requested size, or half of it then all of it (distilled)."""
        full = self.grid(request.frames, request.height, request.width, request.fps)
        if request.extra["recipe"] != "distilled":
            return [full]
        return [self.grid(request.frames, request.height // 2, request.width // 2, request.fps), full]

    def draw_shapes(self, request: Request) -> dict[str, tuple[int, ...]]:
        """Each noise draw's shape, diffusers' unpacked layouts."""
        audio_width = self.folder.config("transformer")["audio_in_channels"]
        mel = audio_width // self.layout.audio_channels
        shapes = {}
        for prefix, grid in zip(("", "stage2_"), self.stage_grids(request)):
            shapes[prefix + "noise"] = (1, self.layout.latent_channels, grid.frames, grid.height, grid.width)
            shapes[prefix + "audio_noise"] = (1, self.layout.audio_channels, grid.audio_frames, mel)
        shapes["decode_noise"] = shapes[("stage2_" if len(self.stage_grids(request)) > 1 else "") + "noise"]
        return shapes

    # ------------------------------------------------------------------ conditioning

    def encode_prompt(self, prompts: list[str], max_length: int) -> tuple[mx.array, mx.array]:
        """Gemma 3's hidden states, every layer stacked (B, S, hidden x layers), and the mask, as
        LTX2Pipeline._get_gemma_prompt_embeds tokenizes them (left padding, pad = eos)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.folder.tokenizer), local_files_only=True)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokens = tokenizer([p.strip() for p in prompts], padding="max_length", max_length=max_length,
                           truncation=True, add_special_tokens=True, return_tensors="np")
        ids, mask = mx.array(tokens.input_ids.astype(np.int32)), mx.array(tokens.attention_mask.astype(np.int32))
        states = self.model("text_encoder").stacked_hidden_states(ids, mask)
        states = states.reshape(*states.shape[:2], -1).astype(mx.float32)
        mx.eval(states)
        return states, mask

    def text_states(self, request: Request, guided: bool) -> tuple[mx.array, mx.array]:
        """(states, mask) of [negative, prompt] under guidance, else of the prompt: the given
        embeddings where the request has them (an array, or (array, mask)), else encoded."""
        given = list(request.prompt_embeds or (None, None))
        needed = [0, 1] if guided else [0]
        if any(given[i] is None for i in needed):
            texts = [request.prompt or "", request.negative_prompt or ""]
            states, mask = self.encode_prompt([texts[i] for i in needed], request.extra["max_sequence_length"])
            for row, i in enumerate(needed):
                if given[i] is None:
                    given[i] = (states[row:row + 1], mask[row:row + 1])
        pairs = []
        for item in given[: len(needed)]:
            states, mask = item if isinstance(item, tuple) else (item, None)
            states = mx.array(np.asarray(states, np.float32))
            mask = mx.ones(states.shape[:2], mx.int32) if mask is None else mx.array(np.asarray(mask)).astype(mx.int32)
            pairs.append((states, mask))
        order = [1, 0] if guided else [0]  # diffusers batches [negative, prompt]
        return (mx.concatenate([pairs[i][0] for i in order]), mx.concatenate([pairs[i][1] for i in order]))

    def connect(self, states: mx.array, mask: mx.array, guided: bool) -> Text:
        video, audio, binary = self.model("connectors")(states, mask, padding_side="left")
        if not guided:
            return Text(video, audio, binary)
        return Text(video[1:], audio[1:], binary[1:], negative=Text(video[:1], audio[:1], binary[:1]))

    def image_latents(self, request: Request) -> mx.array:
        """The image's normalized latent, packed (1, h w, C): the first latent frame's tokens."""
        from vidport.runtime.pipelines.ltx2_image import image_pixels

        pixels = image_pixels(request.image, request.height, request.width, int(request.extra["image_crf"]))
        vae = self.model("vae")
        latent = vae.encode_mean(mx.array(pixels).astype(vae.latents_mean.dtype)).astype(mx.float32)
        latent = (latent - vae.latents_mean) / vae.latents_std  # diffusers' i2v: no scaling factor here
        return latent.reshape(1, -1, latent.shape[-1])

    # ------------------------------------------------------------------ the run

    def guidance(self, request: Request) -> Guidance:
        extra = request.extra
        return Guidance(cfg=request.guidance, stg=extra["stg_scale"], modality=extra["modality_scale"],
                        rescale=extra["guidance_rescale"], audio_cfg=extra["audio_guidance"] or 0.0,
                        audio_stg=extra["audio_stg_scale"] or 0.0, audio_modality=extra["audio_modality_scale"] or 0.0,
                        audio_rescale=extra["audio_guidance_rescale"] or 0.0,
                        stg_blocks=tuple(int(b) for b in extra["stg_blocks"]))

    def schedulers(self, sigmas: Any, tokens: int, shifted: bool) -> tuple[Any, Any]:
        """The video and the audio scheduler over `sigmas`: shifted by the token count (dev), or as
        they are (distilled: dynamic shifting and the terminal stretch off)."""
        from vidport.runtime.schedulers import from_config

        config = dict(self.folder.scheduler_config)
        if not shifted:
            config.update(use_dynamic_shifting=False, shift_terminal=None)
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 1024), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.95), config.get("max_shift", 2.05))
        pair = (from_config(config), from_config(config))
        for scheduler in pair:
            scheduler.set_timesteps(mu=mu if config.get("use_dynamic_shifting") else None, sigmas=sigmas)
        return pair

    def run(self, request: Request, on_step: StepCallback | None = None,
            on_decode: DecodeCallback | None = None) -> Generation:
        """diffusers' chain. `extra`: `parallel` (runtime.parallel_ltx2; rank 0 alone decodes),
        `collective_timeout`, and the debug setting `dump_steps=DIR`: rank 0 saves each step's video
        and audio latents (step_NNN.npy, audio_step_NNN.npy, stages in turn), the frames
        (frames.npy) and the waveform (audio.npy), every rank its DiT weight bytes
        (rankR_weights.json)."""
        draws = request.draws()
        plan = self._plan = self.plan(request)
        ranks, dump = plan.world, request.extra.get("dump_steps")
        seed = ranks.agree(secrets.randbits(31) if request.seed is None else int(request.seed))
        keys = dict(zip(DRAWS, mx.random.split(mx.random.key(seed), len(DRAWS))))  # one per draw
        shapes = self.draw_shapes(request)

        def draw(name: str) -> mx.array:
            if name in draws:
                return mx.array(np.asarray(draws[name], np.float32))
            return mx.random.normal(shapes[name], key=keys[name])

        guidance = self.guidance(request)
        states, mask = self.text_states(request, guidance.uses_cfg)
        if request.release_weights:
            self.release("text_encoder")
        text = self.connect(states, mask, guidance.uses_cfg)
        if request.release_weights:
            self.release("connectors")

        grids = self.stage_grids(request)
        two_stage = len(grids) > 1
        total = sum(len(s) for s in ([DISTILLED_SIGMAS, STAGE_2_SIGMAS] if two_stage else [range(request.steps)]))
        dit = self.model("transformer", low_memory=bool(request.extra["low_memory"]))
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
            report = weight_report(dit, "transformer_blocks")
            (Path(dump) / f"rank{ranks.rank}_weights.json").write_text(json.dumps(report))
        cross = bool(request.extra["use_cross_timestep"])
        intermediates: dict[str, np.ndarray] = {}

        def hook(stage: int, grid: Grid, offset: int):
            def report(index: int, _total: int, t: float, v: mx.array, a: mx.array) -> None:
                if dump and ranks.is_main:
                    np.save(Path(dump) / f"step_{offset + index:03d}.npy", np.array(unpack_video(v, grid)))
                    np.save(Path(dump) / f"audio_step_{offset + index:03d}.npy",
                            np.array(unpack_audio(a, self.layout.audio_channels)))
                if on_step:
                    on_step(Step(offset + index, total, t, unpack_video(v, grid),
                                 f"stage {stage}" if two_stage else None,
                                 audio_latents=unpack_audio(a, self.layout.audio_channels)))
            return report

        video, audio, token_mask = self.start(request, grids[0], draw)
        sigmas = DISTILLED_SIGMAS if two_stage else dev_sigmas(request.steps)
        stages = [denoise(dit, video, audio, grids[0], text, guidance,
                          self.schedulers(sigmas, grids[0].tokens, shifted=not two_stage), request.fps,
                          token_mask, hook(1, grids[0], 0), cross, plan)]
        if two_stage:
            upsampled = self.upsample(stages[0].video, grids[0])
            intermediates["upsampled"] = np.array(upsampled)
            video, audio, token_mask = self.restart(request, grids[1], upsampled, stages[0].audio, draw)
            stages.append(denoise(dit, video, audio, grids[1], text, guidance,
                                  self.schedulers(STAGE_2_SIGMAS, grids[1].tokens, shifted=False), request.fps,
                                  token_mask, hook(2, grids[1], len(DISTILLED_SIGMAS)), cross, plan))
        final, grid = stages[-1], grids[-1]
        latents = unpack_video(final.video, grid)
        result = Generation(None, latents, None if draws else seed, sum((s.timesteps for s in stages), []),
                            request.fps, "FlowMatchEulerDiscreteScheduler", sum((s.seconds for s in stages), []),
                            intermediates=intermediates)
        result.audio_latents = unpack_audio(final.audio, self.layout.audio_channels)
        if not request.decode or not ranks.is_main:  # the other ranks only compute
            return result
        if request.release_weights:
            self.release("transformer", "latent_upsampler")
        began = time.perf_counter()
        if request.extra["audio"]:
            result.audio, result.sample_rate = self.decode_audio(final.audio)
        frames = self.decode_video(latents, draw("decode_noise"), request, result, on_decode, keep=bool(dump))
        result.frames = None if request.writer else frames  # a writer took them
        result.decode_seconds = time.perf_counter() - began
        if dump:
            np.save(Path(dump) / "frames.npy", frames)
            if result.audio is not None:
                np.save(Path(dump) / "audio.npy", result.audio)
        return result

    # ------------------------------------------------------------------ latents in and out

    def start(self, request: Request, grid: Grid, draw: Callable[[str], mx.array]
              ) -> tuple[mx.array, mx.array, mx.array | None]:
        """Stage 1's packed video and audio latents (noise; i2v: the image's latent as the first
        frame) and the i2v token mask."""
        video, audio = pack_video(draw("noise")), pack_audio(draw("audio_noise"))
        if request.task != "i2v":
            return video, audio, None
        size = {"height": grid.height * self.layout.spatial, "width": grid.width * self.layout.spatial}
        first = self.image_latents(replace(request, **size))
        return mx.concatenate([first, video[:, first.shape[1]:]], axis=1), audio, first_frame_mask(grid)

    def restart(self, request: Request, grid: Grid, upsampled: mx.array, audio: mx.array,
                draw: Callable[[str], mx.array]) -> tuple[mx.array, mx.array, mx.array | None]:
        """Stage 2's start: the upsampled latents and stage 1's audio re-noised to the first stage-2
        sigma (i2v: the first frame kept clean)."""
        s = STAGE_2_SIGMAS[0]
        video = pack_video(self.normalize(upsampled))
        token_mask = first_frame_mask(grid) if request.task == "i2v" else None
        video = keep_masked(token_mask, video, s * pack_video(draw("stage2_noise")) + (1 - s) * video)
        return video, s * pack_audio(draw("stage2_audio_noise")) + (1 - s) * audio, token_mask

    def normalize(self, latents: mx.array) -> mx.array:
        """Raw (B, C, F, h, w) -> the DiT's normalized latents (diffusers' _normalize_latents)."""
        vae, scale = self.model("vae"), self.folder.config("vae").get("scaling_factor", 1.0)
        mean, std = (s.reshape(1, -1, 1, 1, 1) for s in (vae.latents_mean, vae.latents_std))
        return (latents - mean) * scale / std

    def denormalize(self, latents: mx.array) -> mx.array:
        vae, scale = self.model("vae"), self.folder.config("vae").get("scaling_factor", 1.0)
        mean, std = (s.reshape(1, -1, 1, 1, 1) for s in (vae.latents_mean, vae.latents_std))
        return latents * std / scale + mean

    def upsample(self, tokens: mx.array, grid: Grid) -> mx.array:
        """Stage 1's latents through the latent upsampler (LTX2LatentUpsamplePipeline on
        denormalized latents): raw (1, C, F, 2h, 2w)."""
        raw = self.denormalize(unpack_video(tokens, grid))
        upsampler = self.model("latent_upsampler")
        up = upsampler(raw.transpose(0, 2, 3, 4, 1).astype(upsampler.initial_conv.weight.dtype))
        up = up.astype(mx.float32).transpose(0, 4, 1, 2, 3)
        mx.eval(up)
        return up

    def decode_audio(self, tokens: mx.array) -> tuple[np.ndarray, int]:
        """Packed normalized audio latents -> waveform (samples, channels) and its sample rate."""
        audio_vae, vocoder = self.model("audio_vae"), self.model("vocoder")
        mel = audio_vae.decode(audio_vae.denormalize_latents(tokens.astype(audio_vae.latents_mean.dtype)))
        waveform = vocoder(mel.transpose(0, 3, 1, 2).astype(mx.float32))
        return np.array(waveform[0].astype(mx.float32)).T, int(vocoder.output_sampling_rate)

    def decode_video(self, latents: mx.array, noise: mx.array, request: Request, result: Generation,
                     on_decode: DecodeCallback | None, keep: bool = False) -> np.ndarray | None:
        """Decode in tiles; frames go to the request's writer as they are final (then none are
        kept unless `keep`), else they are returned (frames, H, W, 3) in [0, 1]."""
        from vidport.runtime.ltx2.video_vae_tiling import Tiling, decode_stream

        vae = self.model("vae")
        temb = None
        if "time_embedder" in vae.decoder:
            t = float(request.extra["decode_timestep"])
            latents = (1 - t) * latents + t * noise
            temb = mx.array([t], mx.float32)
        z = self.denormalize(latents).transpose(0, 2, 3, 4, 1).astype(vae.latents_mean.dtype)
        tiling = Tiling(temporal=True) if request.extra["tiling"] else Tiling(spatial=False, temporal=False)
        done, kept = 0, []
        with request.writer(result.audio, result.sample_rate) if request.writer else nullcontext() as writer:
            for chunk in decode_stream(vae, z, temb, tiling=tiling):
                frames = np.array(mx.clip(chunk[0].astype(mx.float32) / 2 + 0.5, 0, 1))
                if writer is not None:
                    writer.append(frames)
                if writer is None or keep:
                    kept.append(frames)
                done += len(frames)
                if on_decode:
                    on_decode(done, request.frames)
        return np.concatenate(kept) if kept else None
