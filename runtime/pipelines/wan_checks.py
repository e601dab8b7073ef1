"""What a Wan pipeline can run, decided from configs alone before any weight is read or any step
runs: which task the DiT does (its input channels), whether the VAE's latents fit it, and whether a
request's frames, size and image fit the models. Each refusal is a VidportError with a hint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vidport.converter.core.errors import VidportError


@dataclass(frozen=True)
class WanLayout:
    """The facts of a Wan pipeline that requests are checked against."""

    task: str  # t2v | i2v | ti2v
    z_dim: int  # latent channels of the VAE
    temporal: int  # pixel frames per latent frame (after the first)
    spatial: int  # pixels per latent pixel
    patch: tuple[int, int, int]  # the DiT's (frames, rows, columns) patch
    text_dim: int
    image_tokens: bool  # the DiT cross-attends to CLIP image tokens (Wan 2.1 I2V)
    boundary_ratio: float | None = None  # A14B: where transformer_2 takes over

    @property
    def multiple(self) -> tuple[int, int]:
        """Height and width must be multiples of these (VAE factor x DiT patch)."""
        return self.spatial * self.patch[1], self.spatial * self.patch[2]


def _vae_name(z_dim: int) -> str:
    return {16: "a Wan 2.1 VAE", 48: "a Wan 2.2 VAE"}.get(z_dim, "a VAE")


def _dit_name(channels: int) -> str:
    return {16: "a Wan 2.1 / 2.2 A14B DiT", 48: "a Wan 2.2 TI2V DiT"}.get(channels, "a DiT")


def layout_of(configs: dict[str, dict[str, Any]], model_index: dict[str, Any] | None = None) -> WanLayout:
    """Check the components' configs against each other (transformer, transformer_2, vae,
    text_encoder, image_encoder; any may be missing but the transformer and the VAE)."""
    index = model_index or {}
    if "transformer" not in configs or "vae" not in configs:
        missing = [name for name in ("transformer", "vae") if name not in configs]
        raise VidportError(f"a Wan pipeline needs {' and '.join(missing)}", hint="convert the whole Diffusers folder")
    dit, vae = configs["transformer"], configs["vae"]
    z_dim, temporal = vae.get("z_dim", 16), vae.get("scale_factor_temporal") or 4
    out_channels = dit.get("out_channels") or dit["in_channels"]
    if out_channels != z_dim:
        raise VidportError(f"{_vae_name(z_dim)} ({z_dim} latent channels) cannot pair with {_dit_name(out_channels)} "
                           f"({out_channels} latent channels)",
                           hint="Wan 2.1 models and Wan 2.2 A14B use the Wan 2.1 VAE (z 16); Wan 2.2 TI2V 5B uses "
                                "the Wan 2.2 VAE (z 48)")
    if dit["in_channels"] == z_dim:
        task = "ti2v" if index.get("expand_timesteps") else "t2v"
    elif dit["in_channels"] == 2 * z_dim + temporal:
        task = "i2v"
    else:
        raise VidportError(f"a DiT with {dit['in_channels']} input channels does not fit {_vae_name(z_dim)} "
                           f"(z {z_dim}): expected {z_dim} (text-to-video) or {2 * z_dim + temporal} (image-to-video)",
                           hint="convert the DiT and the VAE of the same Wan release")
    second = configs.get("transformer_2")
    if second is not None:
        for key in ("in_channels", "out_channels", "patch_size", "text_dim"):
            if second.get(key) != dit.get(key):
                raise VidportError(f"transformer_2 has {key} {second.get(key)}, transformer {dit.get(key)}: "
                                   "the two experts of an A14B model share their shapes",
                                   hint="convert both experts from the same A14B folder")
    if index.get("boundary_ratio") is not None and second is None:
        raise VidportError("model_index.json sets boundary_ratio but the pipeline has no transformer_2",
                           hint="convert the A14B folder with both experts (transformer/ and transformer_2/)")
    text = configs.get("text_encoder")
    if text is not None and text.get("d_model") != dit["text_dim"]:
        raise VidportError(f"the text encoder's width {text.get('d_model')} does not fit the DiT's text_dim "
                           f"{dit['text_dim']}", hint="use the UMT5 encoder of the same Wan release")
    image_tokens = dit.get("image_dim") is not None
    clip = configs.get("image_encoder")
    if image_tokens and clip is not None and clip.get("hidden_size") != dit["image_dim"]:
        raise VidportError(f"the image encoder's width {clip.get('hidden_size')} does not fit the DiT's "
                           f"image_dim {dit['image_dim']}", hint="use the CLIP image encoder of the same Wan release")
    spatial, patch = vae.get("scale_factor_spatial") or 8, tuple(dit.get("patch_size", (1, 2, 2)))
    return WanLayout(task, z_dim, temporal, spatial, patch, dit["text_dim"], image_tokens, index.get("boundary_ratio"))


def check_components(configs: dict[str, dict[str, Any]]) -> None:
    """The pipeline spec's conversion-time check: the components fit each other."""
    layout_of(configs)


def check_request(layout: WanLayout, task: str, *, num_frames: int, height: int, width: int, has_image: bool,
                  has_image_encoder: bool = True, guidance_scale_2: float | None = None, steps: int = 1) -> None:
    """Refuse what the models cannot take for `task`, before anything heavy runs."""
    if task != "t2v" and not has_image:
        model = " (this is a Wan 2.1 I2V model)" if layout.task == "i2v" else ""
        raise VidportError(f"{task} needs the first frame{model}",
                           hint=f"pass --image PATH (vidport generate {task} --image first.png ...)")
    if task == "i2v" and layout.image_tokens and not has_image_encoder:
        raise VidportError("this I2V DiT conditions on CLIP image tokens but the pipeline has no image_encoder",
                           hint="convert the Diffusers folder with its image_encoder/")
    step = layout.temporal
    if num_frames < 1 or (num_frames - 1) % step:
        below = 1 + max(num_frames - 1, 0) // step * step
        raise VidportError(f"{num_frames} frames: the Wan VAE takes 1 + {step}k frames (1, {1 + step}, {1 + 2 * step}, "
                           f"..., 81)", hint=f"use --frames {below} or {below + step}")
    mult_h, mult_w = layout.multiple
    if height <= 0 or width <= 0 or height % mult_h or width % mult_w:
        fit_h, fit_w = max(mult_h, height // mult_h * mult_h), max(mult_w, width // mult_w * mult_w)
        raise VidportError(f"{width}x{height} pixels: width and height must be multiples of {mult_w} and {mult_h} "
                           f"(VAE factor {layout.spatial} x DiT patch {layout.patch[2]}x{layout.patch[1]})",
                           hint=f"use --width {fit_w} --height {fit_h}")
    if guidance_scale_2 is not None and layout.boundary_ratio is None:
        raise VidportError("--guidance-2 applies to the low-noise expert of a two-expert (A14B) model only",
                           hint="drop --guidance-2; --guidance sets this model's scale")
    if steps < 1:
        raise VidportError(f"{steps} steps: at least one denoising step is needed", hint="pass --steps 1 or more")
