"""What a generation request brings from files: the input image of image-to-video and noise saved
for a parity run (`--noise FILE.npy` / `.npz`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vidport.converter.core.errors import VidportError

NOISE_KEYS = ("noise", "encode_noise")


def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 (height, width, 3) (alpha dropped, grey expanded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise VidportError(f"{path}: not an image this runtime reads ({err})") from err


def image_to_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 in [-1, 1], in the order of operations diffusers' image processor
    uses (x / 255, then 2x - 1)."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    return 2.0 * np.asarray(image, dtype=np.float32) - 1.0


def read_noise(path: str | Path) -> dict[str, np.ndarray]:
    """`.npy`: the initial noise (text-to-video: the starting latents; image-to-video: the noise
    added at the first timestep). `.npz`: any of `noise` and `encode_noise` (the standard normal
    draw of the VAE's latent sample, image-to-video). All in the latent layout (1, C, frames, h, w)."""
    path = Path(path)
    if not path.exists():
        raise VidportError(f"{path}: no such noise file")
    try:
        loaded = np.load(path)
    except (OSError, ValueError) as err:
        raise VidportError(f"{path}: not a .npy / .npz file ({err})") from err
    if isinstance(loaded, np.ndarray):
        return {"noise": loaded.astype(np.float32)}
    unknown = sorted(set(loaded.files) - set(NOISE_KEYS))
    if unknown:
        raise VidportError(f"{path}: unknown array(s) {unknown}", hint=f"a noise .npz holds {' and/or '.join(NOISE_KEYS)}")
    return {key: loaded[key].astype(np.float32) for key in loaded.files}
