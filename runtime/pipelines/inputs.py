"""What a generation request brings from files: the input image of image-to-video and noise saved
for a parity run (`--noise FILE.npy` / `.npz`). Which draws a request may name is each pipeline's
own (`noise_names`); the pipeline's check refuses the others."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError


def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (height, width, 3) (alpha dropped, grey expanded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise VidportError(f"{path}: not an image this runtime reads ({err})") from err


def image_array(image: Any) -> np.ndarray:
    """A path, a PIL image or an array -> RGB uint8 (height, width, 3), as image-to-video takes it."""
    if isinstance(image, (str, Path)):
        if not Path(image).exists():
            raise VidportError(f"{image}: no such image")
        return read_image(image)
    if hasattr(image, "convert"):  # a PIL image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise VidportError(f"the image has shape {array.shape}; expected (height, width, 3)")
    return array


def image_to_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 in [-1, 1], in the order of operations diffusers' image processor
    uses (x / 255, then 2x - 1)."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return 2.0 * np.asarray(image, dtype=np.float32) - 1.0


def read_noise(path: str | Path) -> dict[str, np.ndarray]:
    """`.npy`: the initial noise, {"noise": array} (text-to-video: the starting latents; AnimateDiff
    image-to-video: the noise added at the first timestep). `.npz`: named draws (AnimateDiff
    image-to-video also takes `encode_noise`, the draw of the VAE's latent sample)."""
    path = Path(path)
    if not path.exists():
        raise VidportError(f"{path}: no such noise file")
    try:
        loaded = np.load(path)
    except (OSError, ValueError) as err:
        raise VidportError(f"{path}: not a .npy / .npz file ({err})") from err
    if isinstance(loaded, np.ndarray):
        return {"noise": loaded.astype(np.float32)}
    return {key: loaded[key].astype(np.float32) for key in loaded.files}


def read_prompt_embeds(path: str | Path) -> tuple[Any, Any]:
    """Text states computed elsewhere (say, where the text encoder fits in memory): an .npz with
    diffusers' names, `prompt_embeds` and optionally `negative_prompt_embeds` and the attention
    masks `prompt_attention_mask` / `negative_prompt_attention_mask` (batch 1). Returns the
    (prompt, negative) pair a Request takes: each an array, or (array, mask) where a mask is given."""
    path = Path(path)
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise VidportError(f"{path}: not an .npz of prompt embeddings ({err})") from err
    if isinstance(data, np.ndarray) or "prompt_embeds" not in data.files:
        held = ", ".join(data.files) if not isinstance(data, np.ndarray) else "one bare array"
        raise VidportError(f"{path}: no prompt_embeds array (it holds {held or 'nothing'})",
                           hint="np.savez(FILE, prompt_embeds=..., negative_prompt_embeds=..., and for LTX-2 "
                                "prompt_attention_mask=..., negative_prompt_attention_mask=...)")

    def entry(prefix: str) -> Any:
        if f"{prefix}prompt_embeds" not in data.files:
            return None
        states = data[f"{prefix}prompt_embeds"].astype(np.float32)
        mask_name = f"{prefix}prompt_attention_mask"
        return (states, data[mask_name]) if mask_name in data.files else states

    return entry(""), entry("negative_")
