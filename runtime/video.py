"""Write and read videos: MP4 (H.264), WebM (VP9), GIF, or a folder of PNG frames.

Frames are uint8 arrays (frames, height, width, 3). ffmpeg comes from the imageio-ffmpeg wheel,
so nothing outside pip is needed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vidport.converter.core.errors import VidportError

FORMATS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".gif": None}


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (or [-1, 1] when `signed`) to uint8, as diffusers' postprocess does."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write frames by the path's suffix; a path without a suffix (or ending in /) gets PNG frames."""
    import imageio.v2 as imageio

    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VidportError(f"{path}: expected frames of shape (frames, height, width, 3), got {frames.shape}")
    suffix = path.suffix.lower()
    if suffix == "" or str(path).endswith("/"):
        path.mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(frames):
            imageio.imwrite(path / f"frame_{index:04d}.png", frame)
        return path
    if suffix not in FORMATS:
        raise VidportError(f"{path}: unknown video format '{suffix}'", hint="use .mp4, .webm, .gif or a folder/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)
        return path
    if suffix == ".mp4" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        raise VidportError(f"{path}: H.264 needs even width and height, got {frames.shape[2]}x{frames.shape[1]}")
    writer = imageio.get_writer(path, fps=fps, codec=FORMATS[suffix], macro_block_size=1,
                                ffmpeg_log_level="error", **({"quality": 8} if suffix == ".mp4" else {}))
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()
    return path


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file (or a folder of PNGs) as uint8 (frames, height, width, 3)."""
    import imageio.v2 as imageio

    path = Path(path)
    if path.is_dir():
        return np.stack([imageio.imread(p)[..., :3] for p in sorted(path.glob("*.png"))])
    reader = imageio.get_reader(path)
    try:
        return np.stack([frame[..., :3] for frame in reader])
    finally:
        reader.close()
