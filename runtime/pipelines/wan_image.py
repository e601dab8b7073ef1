"""The conditioning image, prepared twice as the Wan image-to-video pipelines prepare it: for the
VAE (resized to the video's size with Lanczos, RGB in [-1, 1]) and for the CLIP image encoder
(a CLIPImageProcessor: shortest side resized bicubic, centre crop, CLIP mean/std). Both resize
with PIL, as diffusers' VideoProcessor and transformers' PIL image processor do, so the same
image gives the same pixels."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError

# transformers' CLIPImageProcessor defaults (OpenAI CLIP statistics)
CLIP_DEFAULTS: dict[str, Any] = {
    "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
}


def load_image(image: Any):
    """A path, a PIL image or a uint8 array (H, W, 3) -> an RGB PIL image."""
    import PIL.Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.exists():
            raise VidportError(f"{path}: no such image")
        try:
            image = PIL.Image.open(path)
            image.load()
        except OSError as err:
            raise VidportError(f"{path}: not an image PIL can read ({err})") from err
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
            raise VidportError(f"image array of shape {image.shape} and dtype {image.dtype}: expected uint8 (H, W, 3)")
        image = PIL.Image.fromarray(image[..., :3])
    return image.convert("RGB")


def vae_pixels(image, height: int, width: int) -> np.ndarray:
    """-> (height, width, 3) float32 in [-1, 1] (diffusers' VideoProcessor.preprocess)."""
    import PIL.Image

    if image.size != (width, height):
        image = image.resize((width, height), resample=PIL.Image.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255.0 * 2.0 - 1.0


def read_clip_config(folder: Path | None) -> dict[str, Any]:
    """The pipeline's image_processor/preprocessor_config.json over transformers' defaults."""
    path = Path(folder) / "preprocessor_config.json" if folder else None
    found = json.loads(path.read_text()) if path and path.exists() else {}
    return {**CLIP_DEFAULTS, **{k: v for k, v in found.items() if k in CLIP_DEFAULTS}}


def _shortest_edge_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the shorter side `short_side`, the longer scaled and truncated."""
    if width <= height:
        return int(short_side * height / width), short_side
    return short_side, int(short_side * width / height)


def clip_pixels(image, config: dict[str, Any]) -> np.ndarray:
    """-> (1, 3, crop_h, crop_w) float32, channels first, as CLIPVisionModel takes them."""
    import PIL.Image

    size = config["size"]
    if config["do_resize"]:
        if "shortest_edge" in size:
            new_h, new_w = _shortest_edge_size(image.height, image.width, size["shortest_edge"])
        else:
            new_h, new_w = size["height"], size["width"]
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample=PIL.Image.Resampling(config["resample"]))
    pixels = np.asarray(image)
    if config["do_center_crop"]:
        crop_h, crop_w = config["crop_size"]["height"], config["crop_size"]["width"]
        top, left = (pixels.shape[0] - crop_h) // 2, (pixels.shape[1] - crop_w) // 2
        if top < 0 or left < 0:
            raise VidportError(f"image of {pixels.shape[1]}x{pixels.shape[0]} is smaller than the CLIP crop "
                               f"{crop_w}x{crop_h}", hint="pass a larger image")
        pixels = pixels[top:top + crop_h, left:left + crop_w]
    pixels = pixels.astype(np.float32)
    if config["do_rescale"]:
        pixels = pixels * np.float32(config["rescale_factor"])
    if config["do_normalize"]:
        pixels = (pixels - np.array(config["image_mean"], np.float32)) / np.array(config["image_std"], np.float32)
    return pixels.transpose(2, 0, 1)[None].astype(np.float32)
