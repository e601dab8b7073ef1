"""AnimateDiff on MLX: text-to-video, and image-to-video with diffusers'
`AnimateDiffVideoToVideoPipeline` semantics on the image repeated over the frames.

The loop is diffusers' own, step for step, so that with the same prompt embeddings and the same
noise both give the same latents at every step (golden/pipeline_parity.py checks it): latents
(batch, channels, frames, h, w); classifier-free guidance as one batch [negative, prompt] with the
prompt repeated per frame; the scheduler from the folder's scheduler_config.json; the VAE decode
in slices of frames. Every request is checked before any model runs, and where the answer
depends only on configs (a motion module that does not fit the UNet, a scheduler the runtime
lacks) before any weight is loaded.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.runtime.pipelines.folder import PipelineFolder
from vidport.runtime.pipelines.inputs import image_array, image_to_pixels
from vidport.runtime.pipelines.protocol import DecodeCallback, Generation, Pipeline, Request, Step, StepCallback
from vidport.runtime.pipelines.tokenizer import PromptTokenizer
from vidport.runtime.schedulers import from_config


def check_components(configs: dict[str, dict[str, Any]]) -> None:
    """From configs alone: the motion module fits the UNet, the UNet reads the text encoder's
    states and the VAE's latents. Called by the converter (the spec's `checks`) and on loading."""
    from vidport.runtime.unet_config import read_unet_config
    from vidport.runtime.unet_motion import check_compatible

    unet = configs["unet"]
    if "motion_adapter" in configs:
        check_compatible(read_unet_config(unet), configs["motion_adapter"])
    text = configs.get("text_encoder", {}).get("hidden_size")
    if text is not None and unet.get("cross_attention_dim") != text:
        raise VidportError(f"the UNet cross-attends to {unet.get('cross_attention_dim')}-wide states, the text "
                           f"encoder gives {text}", hint="use the text encoder of the same SD release as the UNet")
    latent = configs.get("vae", {}).get("latent_channels")
    if latent is not None and unet.get("in_channels") != latent:
        raise VidportError(f"the UNet takes {unet.get('in_channels')} latent channels, the VAE makes {latent}")


class AnimateDiffPipeline(Pipeline):
    """A converted AnimateDiff folder (`vidport convert animatediff`): `from_folder` reads configs
    and tokenizer and checks the components fit; each model loads on first use."""

    name = "animatediff"

    def __init__(self, folder: PipelineFolder, tokenizer: PromptTokenizer):
        self.folder, self.tokenizer = folder, tokenizer
        self.models: dict[str, Any] = {}
        vae_config = folder.config("vae")
        self.vae_scale_factor = 2 ** (len(vae_config.get("block_out_channels", [64] * 4)) - 1)
        self.latent_channels = folder.config("unet").get("in_channels", 4)
        self.scaling_factor = float(vae_config.get("scaling_factor", 0.18215))

    @classmethod
    def from_folder(cls, path: str | Path) -> "AnimateDiffPipeline":
        """Everything decidable without weights: the folder, the components fit each other, the
        tokenizer loads. The scheduler (and a `--scheduler` swap) is checked with each request."""
        folder = PipelineFolder.open(path)
        if folder.target != "mlx":
            raise VidportError(f"{folder.path}: converted for target '{folder.target}'; the runtime runs mlx folders")
        if "motion_adapter" not in folder.components:
            raise VidportError(f"{folder.path}: a {folder.pipeline} pipeline without motion_adapter/",
                               hint="generating video needs a motion module: vidport convert animatediff ... --motion MOTION")
        check_components(folder.configs())
        return cls(folder, PromptTokenizer(folder.tokenizer))

    def model(self, name: str):
        """unet (with the motion module), vae or text_encoder, loaded strictly on first use."""
        if name not in self.models:
            from vidport.runtime.loading import load_model
            from vidport.runtime.unet_motion import load_unet_motion

            path = self.folder.path
            self.models[name] = (load_unet_motion(path / "unet", path / "motion_adapter") if name == "unet"
                                 else load_model(path / name))
        return self.models[name]

    # ------------------------------------------------------------------ the protocol
    @property
    def tasks(self) -> tuple[str, ...]:
        return ("t2v", "i2v")

    def settings(self, task: str) -> set[str]:
        common = {"prompt", "negative_prompt", "frames", "steps", "guidance", "height", "width", "seed", "noise",
                  "scheduler", "decode_slice", "fps", "prompt_embeds"}
        return common | {"image", "strength"} if task == "i2v" else common

    def defaults(self, task: str) -> Request:
        """diffusers' AnimateDiff defaults: 16 frames, 25 steps, guidance 7.5, the UNet's sample size
        (SD 1.5: 512 x 512; an image's size for i2v), 8 fps, the folder's scheduler; i2v strength 0.8."""
        height, width = self.default_size()
        return Request(task=task, negative_prompt="", frames=16, steps=25, guidance=7.5, height=height, width=width,
                       fps=8, scheduler=self.folder.scheduler_config.get("_class_name"), decode_slice=1,
                       strength=0.8 if task == "i2v" else None)

    def noise_names(self, task: str) -> tuple[str, ...]:
        """The draws a request may supply: the initial noise; i2v also the VAE sample's."""
        return ("noise", "encode_noise") if task == "i2v" else ("noise",)

    def resolve(self, request: Request) -> Request:
        """An i2v image as uint8 (H, W, 3), its size the video's unless given."""
        if request.image is not None:
            image = image_array(request.image)
            request = replace(request, image=image, height=request.height or image.shape[0],
                              width=request.width or image.shape[1])
        return super().resolve(request)

    def validate(self, request: Request) -> None:
        """Refuse what cannot run, from configs alone."""
        frames, height, width, steps = request.frames, request.height, request.width, request.steps
        if request.prompt is None and request.prompt_embeds is None:
            raise VidportError("no prompt", hint="pass --prompt TEXT")
        if not 1 <= frames <= self.max_frames:
            raise VidportError(f"{frames} frames: the motion module has {self.max_frames} positions",
                               hint=f"ask for 1 to {self.max_frames} frames (--frames)")
        f = self.vae_scale_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            raise VidportError(f"{width}x{height}: width and height must be positive multiples of {f} (the VAE's factor)",
                               hint=f"use --width {max(f, width // f * f)} --height {max(f, height // f * f)}")
        if steps < 1:
            raise VidportError(f"{steps} steps: at least one is needed", hint="pass --steps 1 or more")
        if request.decode_slice < 1:
            raise VidportError(f"--decode-slice {request.decode_slice}: at least one frame at a time")
        if request.task == "i2v":
            strength = request.strength
            if request.image is None:
                raise VidportError("i2v needs an image", hint="pass --image PATH, or run t2v for text alone")
            if not 0.0 < strength <= 1.0:
                raise VidportError(f"strength {strength}: must be in (0, 1]", hint="pass --strength in (0, 1]")
            if min(int(steps * strength), steps) < 1:
                raise VidportError(f"strength {strength} with {steps} steps leaves no step to denoise",
                                   hint=f"raise --strength to at least {1 / steps:.3g} or --steps")
            if request.image.shape[:2] != (height, width):
                raise VidportError(f"the image is {request.image.shape[1]}x{request.image.shape[0]}, the video "
                                   f"{width}x{height}",
                                   hint="resize the image, or leave out --width/--height to take the image's size")
        draws, names = request.draws(), self.noise_names(request.task)
        unknown = sorted(set(draws) - set(names))
        if unknown:
            raise VidportError(f"noise draws {unknown}: {request.task} takes {' and '.join(names)}",
                               hint="save the noise with the names this task draws")
        expected = self.latent_shape(frames, height, width)
        for name, array in draws.items():
            if tuple(np.shape(array)) != expected:
                raise VidportError(f"{name} has shape {tuple(np.shape(array))}; this request needs {expected} "
                                   f"(1, latent channels, frames, height/{f}, width/{f})",
                                   hint="save the noise for the same --frames/--height/--width, or drop --noise")
        self.folder.scheduler(request.scheduler)

    def run(self, request: Request, on_step: StepCallback | None = None,
            on_decode: DecodeCallback | None = None) -> Generation:
        """diffusers' AnimateDiffPipeline (t2v) or AnimateDiffVideoToVideoPipeline on the image
        repeated over the frames (i2v): each frame's latent a sample of the VAE's distribution
        (mean + std * encode_noise), scaled, then noised to the first of the last `strength` steps."""
        draws = request.draws()
        config = self.folder.scheduler(request.scheduler)
        scheduler = from_config(config)
        scheduler.set_timesteps(request.steps)
        seed, keys = self._keys(request.seed, set(draws) == set(self.noise_names(request.task)))
        context = self._context(request)
        if request.release_weights:
            self.models.pop("text_encoder", None)
        shape = self.latent_shape(request.frames, request.height, request.width)
        if request.task == "t2v":
            timesteps = scheduler.timesteps
            start = mx.array(draws["noise"]) if "noise" in draws else mx.random.normal(shape, key=keys[0])
            latents = start * float(scheduler.init_noise_sigma)
        else:
            keep = min(int(request.steps * request.strength), request.steps)  # diffusers' get_timesteps
            timesteps = scheduler.timesteps[max(request.steps - keep, 0) * scheduler.order:]
            latents = self._image_latents(request, scheduler, timesteps, draws, shape, keys)
        latents, seconds = self._denoise(scheduler, timesteps, latents, context, request.guidance, keys[3], on_step)
        if request.release_weights:
            self.models.pop("unet", None)
        result = Generation(None, latents, seed, [t.item() for t in timesteps], request.fps, config["_class_name"],
                            seconds)
        if request.decode:
            start = time.perf_counter()
            result.frames = self.decode(latents, request.decode_slice, on_decode)
            result.decode_seconds = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------ sizes
    @property
    def max_frames(self) -> int:
        return int(self.folder.config("motion_adapter").get("motion_max_seq_length", 32))

    def default_size(self) -> tuple[int, int]:
        """diffusers' default: the UNet's sample size times the VAE factor (SD 1.5: 512 x 512)."""
        side = int(self.folder.config("unet").get("sample_size", 64)) * self.vae_scale_factor
        return side, side

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (1, self.latent_channels, frames, height // f, width // f)

    # ------------------------------------------------------------------ parts
    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[mx.array, mx.array]:
        """(prompt, negative) CLIP last hidden states, each (1, tokens, dim), as diffusers' encode_prompt."""
        ids = mx.array(self.tokenizer([prompt, negative_prompt or ""]))
        states, _ = self.model("text_encoder")(ids)
        mx.eval(states)
        return states[0:1], states[1:2]

    def decode(self, latents: mx.array, slice_size: int = 1, on_decode: DecodeCallback | None = None) -> np.ndarray:
        """Latents (1, C, frames, h, w) -> frames (frames, H, W, 3) in [0, 1], `slice_size` frames at a
        time so a 16-frame 512x512 video fits in memory. One at a time is also the fastest on the CPU
        (bench: 16 frames at 256x256 took 42.9 s in slices of 1, 1.2 GB peak; 51.5 s, 5.5 GB in 8s)."""
        vae = self.model("vae")
        slice_size = max(1, int(slice_size))
        batch, channels, frames, h, w = latents.shape
        z = (latents * (1.0 / self.scaling_factor)).transpose(0, 2, 3, 4, 1).reshape(batch * frames, h, w, channels)
        z = z.astype(vae.decoder.conv_in.weight.dtype)
        parts, total = [], batch * frames
        for start in range(0, total, slice_size):
            video = vae.decode(z[start:start + slice_size]).astype(mx.float32)
            video = mx.clip(video / 2 + 0.5, 0.0, 1.0)
            mx.eval(video)
            parts.append(np.array(video))
            if on_decode:
                on_decode(min(start + slice_size, total), total)
        return np.concatenate(parts)

    def _image_latents(self, request: Request, scheduler, timesteps, draws: dict[str, np.ndarray],
                       shape: tuple[int, ...], keys: mx.array) -> mx.array:
        """Every frame is the image: encode it once, draw each frame's sample on its own, add the
        noise of the first timestep."""
        vae = self.model("vae")
        pixels = mx.array(image_to_pixels(request.image))[None].astype(vae.encoder.conv_in.weight.dtype)
        latent = vae.encode(pixels)
        drawn = mx.array(draws["encode_noise"]) if "encode_noise" in draws else mx.random.normal(shape, key=keys[1])
        drawn = drawn[0].transpose(1, 2, 3, 0)  # (frames, h, w, C), the VAE's layout
        sample = latent.mean.astype(mx.float32) + latent.std.astype(mx.float32) * drawn
        clean = (self.scaling_factor * sample).transpose(3, 0, 1, 2)[None]  # (1, C, frames, h, w)
        added = mx.array(draws["noise"]) if "noise" in draws else mx.random.normal(shape, key=keys[2])
        latents = scheduler.add_noise(clean, added, timesteps[:1])
        mx.eval(latents)
        return latents

    def _denoise(self, scheduler, timesteps, latents: mx.array, context: mx.array, guidance: float,
                 key: mx.array, on_step: StepCallback | None) -> tuple[mx.array, list[float]]:
        unet = self.model("unet")
        guided = guidance > 1.0
        seconds = []
        step_keys = mx.random.split(key, max(len(timesteps), 1))
        for index, t in enumerate(timesteps):
            start = time.perf_counter()
            model_input = mx.concatenate([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = unet(model_input, t.item(), context).astype(mx.float32)
            if guided:
                uncond, text = prediction[0:1], prediction[1:2]
                prediction = uncond + guidance * (text - uncond)
            # ancestral samplers re-noise every step; the noise is ours to give (seeded)
            noise = mx.random.normal(latents.shape, key=step_keys[index])
            latents = scheduler.step(prediction, t, latents, noise=noise)
            mx.eval(latents)
            seconds.append(time.perf_counter() - start)
            if on_step:
                on_step(Step(index, len(timesteps), float(t.item()), latents))
        return latents, seconds

    def _context(self, request: Request) -> mx.array:
        """The UNet's cross-attention input (batch * frames, tokens, dim): [negative, prompt] under
        guidance, each repeated per frame."""
        embeds = request.prompt_embeds
        positive, negative = (mx.array(np.asarray(e, np.float32)) for e in embeds) if embeds else \
            self.encode_prompt(request.prompt, request.negative_prompt)
        states = mx.concatenate([negative, positive]) if request.guidance > 1.0 else positive
        return mx.repeat(states, request.frames, axis=0)

    @staticmethod
    def _keys(seed: int | None, supplied: bool) -> tuple[int, mx.array]:
        """Keys for: initial noise, the VAE sample, the added noise, per-step noise. With every draw
        supplied and no seed, 0 (per-step noise stays reproducible for ancestral samplers)."""
        seed = (0 if supplied else secrets.randbits(31)) if seed is None else int(seed)
        return seed, mx.random.split(mx.random.key(seed), 4)
