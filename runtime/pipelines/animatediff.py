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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.runtime.pipelines.folder import PipelineFolder
from vidport.runtime.pipelines.inputs import image_to_pixels
from vidport.runtime.pipelines.tokenizer import PromptTokenizer

StepCallback = Callable[[int, int, Any, mx.array], None]  # (step index, steps, timestep, latents after the step)
SliceCallback = Callable[[int, int], None]  # (frames decoded, frames)


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


def scheduler_config(folder: PipelineFolder, class_name: str | None = None) -> dict[str, Any]:
    """The folder's scheduler config (class swapped to `class_name` if given), checked buildable."""
    from vidport.runtime.schedulers import SCHEDULERS, from_config

    config = dict(folder.scheduler_config)
    if not config:
        raise VidportError(f"{folder.path}: no {folder.scheduler_file.relative_to(folder.path)}",
                           hint="reconvert the pipeline: vidport convert writes the scheduler config")
    if class_name:
        config["_class_name"] = class_name
    try:
        from_config(config)
    except ValueError as err:
        hint = (f"supported: {', '.join(sorted(SCHEDULERS))}; --scheduler NAME swaps the class and keeps the schedule"
                if config.get("_class_name") not in SCHEDULERS else None)
        raise VidportError(f"scheduler ({folder.scheduler_file}): {err}", hint=hint) from err
    return config


@dataclass
class Generation:
    """What a run made: frames (frames, H, W, 3) float32 in [0, 1] (None when not decoded), the
    final latents (1, C, frames, h, w), the seed of the noise not supplied, timings."""

    frames: np.ndarray | None
    latents: mx.array
    seed: int | None
    timesteps: list[float]
    step_seconds: list[float] = field(default_factory=list)
    decode_seconds: float = 0.0


class AnimateDiffPipeline:
    """`open` reads configs, tokenizer and scheduler (and checks them), `load` the weights;
    `from_folder` does both. Requests are checked against the configs alone."""

    def __init__(self, folder: PipelineFolder, tokenizer: PromptTokenizer, scheduler: dict[str, Any]):
        self.folder, self.tokenizer, self.scheduler_config = folder, tokenizer, scheduler
        self.unet = self.vae = self.text_encoder = None
        vae_config = folder.config("vae")
        self.vae_scale_factor = 2 ** (len(vae_config.get("block_out_channels", [64] * 4)) - 1)
        self.latent_channels = folder.config("unet").get("in_channels", 4)
        self.scaling_factor = float(vae_config.get("scaling_factor", 0.18215))

    @classmethod
    def open(cls, path: str | Path, scheduler: str | None = None) -> "AnimateDiffPipeline":
        """Everything decidable without weights: the folder, the components fit each other, the
        scheduler builds (`scheduler` swaps its class), the tokenizer loads."""
        folder = PipelineFolder.open(path)
        if folder.target != "mlx":
            raise VidportError(f"{folder.path}: converted for target '{folder.target}'; the runtime runs mlx folders")
        folder.config("motion_adapter")  # an sd15 pipeline has none: say so
        config = scheduler_config(folder, scheduler)
        check_components(folder.configs())
        return cls(folder, PromptTokenizer(folder.tokenizer), config)

    def load(self) -> "AnimateDiffPipeline":
        """Load the weights (strictly): the motion UNet, the VAE, the text encoder."""
        from vidport.runtime.loading import load_model
        from vidport.runtime.unet_motion import load_unet_motion

        path = self.folder.path
        self.unet = load_unet_motion(path / "unet", path / "motion_adapter")
        self.vae = load_model(path / "vae")
        self.text_encoder = load_model(path / "text_encoder")
        return self

    @classmethod
    def from_folder(cls, path: str | Path, scheduler: str | None = None) -> "AnimateDiffPipeline":
        return cls.open(path, scheduler).load()

    # ------------------------------------------------------------------ checks
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

    def new_scheduler(self):
        from vidport.runtime.schedulers import from_config

        return from_config(self.scheduler_config)

    def check_request(self, frames: int, height: int, width: int, steps: int, strength: float | None = None,
                      image: np.ndarray | None = None, noise: dict[str, np.ndarray | None] | None = None) -> None:
        """Refuse what cannot run, before any model does."""
        if not 1 <= frames <= self.max_frames:
            raise VidportError(f"{frames} frames: the motion module has {self.max_frames} positions",
                               hint=f"ask for 1 to {self.max_frames} frames (--frames)")
        f = self.vae_scale_factor
        if height <= 0 or width <= 0 or height % f or width % f:
            raise VidportError(f"{width}x{height}: width and height must be positive multiples of {f} (the VAE's factor)")
        if steps < 1:
            raise VidportError(f"{steps} steps: at least one is needed")
        if strength is not None:
            if not 0.0 < strength <= 1.0:
                raise VidportError(f"strength {strength}: must be in (0, 1]")
            if min(int(steps * strength), steps) < 1:
                raise VidportError(f"strength {strength} with {steps} steps leaves no step to denoise",
                                   hint=f"raise --strength to at least {1 / steps:.3g} or --steps")
        if image is not None:
            if image.ndim != 3 or image.shape[-1] != 3:
                raise VidportError(f"the image has shape {image.shape}; expected (height, width, 3)")
            if image.shape[:2] != (height, width):
                raise VidportError(f"the image is {image.shape[1]}x{image.shape[0]}, the video {width}x{height}",
                                   hint="resize the image, or leave out --width/--height to take the image's size")
        expected = self.latent_shape(frames, height, width)
        for name, array in (noise or {}).items():
            if array is not None and tuple(array.shape) != expected:
                raise VidportError(f"{name} has shape {tuple(array.shape)}; this request needs {expected} "
                                   f"(1, latent channels, frames, height/{f}, width/{f})")

    # ------------------------------------------------------------------ parts
    def _loaded(self) -> None:
        """Weights load on first use, after the request was checked."""
        if self.unet is None:
            self.load()

    def encode_prompt(self, prompt: str, negative_prompt: str = "") -> tuple[mx.array, mx.array]:
        """(prompt, negative) CLIP last hidden states, each (1, tokens, dim), as diffusers' encode_prompt."""
        self._loaded()
        ids = mx.array(self.tokenizer([prompt, negative_prompt or ""]))
        states, _ = self.text_encoder(ids)
        mx.eval(states)
        return states[0:1], states[1:2]

    def decode(self, latents: mx.array, slice_size: int = 1, on_slice: SliceCallback | None = None) -> np.ndarray:
        """Latents (1, C, frames, h, w) -> frames (frames, H, W, 3) in [0, 1], `slice_size` frames at a
        time so a 16-frame 512x512 video fits in memory. One at a time is also the fastest on the CPU
        (bench: 16 frames at 256x256 took 42.9 s in slices of 1, 1.2 GB peak; 51.5 s, 5.5 GB in 8s)."""
        slice_size = max(1, int(slice_size))
        batch, channels, frames, h, w = latents.shape
        z = (latents * (1.0 / self.scaling_factor)).transpose(0, 2, 3, 4, 1).reshape(batch * frames, h, w, channels)
        z = z.astype(self.vae.decoder.conv_in.weight.dtype)
        parts, total = [], batch * frames
        for start in range(0, total, slice_size):
            video = self.vae.decode(z[start:start + slice_size]).astype(mx.float32)
            video = mx.clip(video / 2 + 0.5, 0.0, 1.0)
            mx.eval(video)
            parts.append(np.array(video))
            if on_slice:
                on_slice(min(start + slice_size, total), total)
        return np.concatenate(parts)

    def _denoise(self, scheduler, timesteps, latents: mx.array, context: mx.array, guidance: float,
                 key: mx.array, on_step: StepCallback | None) -> tuple[mx.array, list[float]]:
        guided = guidance > 1.0
        seconds = []
        step_keys = mx.random.split(key, max(len(timesteps), 1))
        for index, t in enumerate(timesteps):
            start = time.perf_counter()
            model_input = mx.concatenate([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            prediction = self.unet(model_input, t.item(), context).astype(mx.float32)
            if guided:
                uncond, text = prediction[0:1], prediction[1:2]
                prediction = uncond + guidance * (text - uncond)
            # ancestral samplers re-noise every step; the noise is ours to give (seeded)
            noise = mx.random.normal(latents.shape, key=step_keys[index])
            latents = scheduler.step(prediction, t, latents, noise=noise)
            mx.eval(latents)
            seconds.append(time.perf_counter() - start)
            if on_step:
                on_step(index, len(timesteps), t, latents)
        return latents, seconds

    def _context(self, prompt: str, negative_prompt: str, guidance: float, frames: int,
                 embeds: tuple[Any, Any] | None) -> mx.array:
        """The UNet's cross-attention input (batch * frames, tokens, dim): [negative, prompt] under
        guidance, each repeated per frame."""
        positive, negative = (mx.array(np.asarray(e, np.float32)) for e in embeds) if embeds else \
            self.encode_prompt(prompt, negative_prompt)
        states = mx.concatenate([negative, positive]) if guidance > 1.0 else positive
        return mx.repeat(states, frames, axis=0)

    @staticmethod
    def _keys(seed: int | None, supplied: bool) -> tuple[int, mx.array]:
        """Keys for: initial noise, the VAE sample, the added noise, per-step noise. With noise
        supplied and no seed, 0 (per-step noise stays reproducible for ancestral samplers)."""
        seed = (0 if supplied else secrets.randbits(31)) if seed is None else int(seed)
        return seed, mx.random.split(mx.random.key(seed), 4)

    # ------------------------------------------------------------------ tasks
    def text_to_video(self, prompt: str, negative_prompt: str = "", frames: int = 16, steps: int = 25,
                      guidance: float = 7.5, height: int | None = None, width: int | None = None,
                      seed: int | None = None, noise: np.ndarray | None = None,
                      prompt_embeds: tuple[Any, Any] | None = None, decode: bool = True, decode_slice: int = 1,
                      on_step: StepCallback | None = None, on_slice: SliceCallback | None = None) -> Generation:
        """diffusers' AnimateDiffPipeline. `noise`: the initial standard-normal latents (1, C, frames,
        h, w) instead of drawing them from `seed`; `prompt_embeds`: (prompt, negative) states
        instead of encoding the prompts."""
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        self.check_request(frames, height, width, steps, noise={"noise": noise})
        self._loaded()
        seed, keys = self._keys(seed, noise is not None)
        context = self._context(prompt, negative_prompt, guidance, frames, prompt_embeds)
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(steps)
        shape = self.latent_shape(frames, height, width)
        start = mx.array(noise) if noise is not None else mx.random.normal(shape, key=keys[0])
        latents = start * float(scheduler.init_noise_sigma)
        latents, seconds = self._denoise(scheduler, scheduler.timesteps, latents, context, guidance, keys[3], on_step)
        return self._finish(latents, seed, scheduler.timesteps, seconds, decode, decode_slice, on_slice)

    def video_to_video(self, image: np.ndarray, prompt: str, strength: float = 0.8, negative_prompt: str = "",
                       frames: int = 16, steps: int = 25, guidance: float = 7.5, height: int | None = None,
                       width: int | None = None, seed: int | None = None, noise: np.ndarray | None = None,
                       encode_noise: np.ndarray | None = None, prompt_embeds: tuple[Any, Any] | None = None,
                       decode: bool = True, decode_slice: int = 1, on_step: StepCallback | None = None,
                       on_slice: SliceCallback | None = None) -> Generation:
        """diffusers' AnimateDiffVideoToVideoPipeline on `image` (uint8 (H, W, 3)) repeated over the
        frames: each frame's latent is a sample of the VAE's distribution (mean + std * encode_noise),
        scaled, then noised to the first of the last `strength` of the steps.
        `noise` / `encode_noise`: the two standard-normal draws (1, C, frames, h, w) instead of `seed`."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise VidportError(f"the image has shape {image.shape}; expected (height, width, 3)")
        height, width = height or image.shape[0], width or image.shape[1]
        self.check_request(frames, height, width, steps, strength, image,
                           {"noise": noise, "encode_noise": encode_noise})
        self._loaded()
        scheduler = self.new_scheduler()
        scheduler.set_timesteps(steps)
        keep = min(int(steps * strength), steps)  # diffusers' get_timesteps
        timesteps = scheduler.timesteps[max(steps - keep, 0) * scheduler.order:]
        seed, keys = self._keys(seed, noise is not None and encode_noise is not None)
        context = self._context(prompt, negative_prompt, guidance, frames, prompt_embeds)

        # every frame is the image: encode it once, draw each frame's sample on its own
        pixels = mx.array(image_to_pixels(image))[None].astype(self.vae.encoder.conv_in.weight.dtype)
        latent = self.vae.encode(pixels)
        shape = self.latent_shape(frames, height, width)
        drawn = mx.array(encode_noise) if encode_noise is not None else mx.random.normal(shape, key=keys[1])
        drawn = drawn[0].transpose(1, 2, 3, 0)  # (frames, h, w, C), the VAE's layout
        sample = latent.mean.astype(mx.float32) + latent.std.astype(mx.float32) * drawn
        clean = (self.scaling_factor * sample).transpose(3, 0, 1, 2)[None]  # (1, C, frames, h, w)
        added = mx.array(noise) if noise is not None else mx.random.normal(shape, key=keys[2])
        latents = scheduler.add_noise(clean, added, timesteps[:1])
        mx.eval(latents)
        latents, seconds = self._denoise(scheduler, timesteps, latents, context, guidance, keys[3], on_step)
        return self._finish(latents, seed, timesteps, seconds, decode, decode_slice, on_slice)

    def _finish(self, latents, seed, timesteps, seconds, decode, decode_slice, on_slice) -> Generation:
        result = Generation(None, latents, seed, [t.item() for t in timesteps], seconds)
        if decode:
            start = time.perf_counter()
            result.frames = self.decode(latents, decode_slice, on_slice)
            result.decode_seconds = time.perf_counter() - start
        return result
