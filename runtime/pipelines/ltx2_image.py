"""LTX-2's image-to-video input: the image re-compressed as H.264 at the CRF the model was trained
on (LTX-2.0-2.3: 33; ltx-pipelines' media_io preprocessing, diffusers' `image_crf`), then resized
to the video's size and scaled to [-1, 1] as diffusers' VideoProcessor does."""
from __future__ import annotations

import io
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.runtime.pipelines.inputs import image_array

DEFAULT_CRF = 33


def h264_roundtrip(image: np.ndarray, crf: int) -> np.ndarray:
    """One RGB uint8 frame through libx264 (yuv420p, `crf`, preset veryfast) and back, cropped to
    even sides as the codec needs; crf 0 returns the image untouched."""
    if crf == 0:
        return image
    import av

    even = image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=1, options={"crf": str(crf), "preset": "veryfast"})
        stream.height, stream.width = even.shape[:2]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(even), format="rgb24").reformat(format="yuv420p")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    buffer.seek(0)
    with av.open(buffer) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def check_aspect(image: Any, height: int, width: int) -> None:
    """Refuse an image whose aspect ratio is not the video's (resizing would distort it)."""
    rows, columns = image_array(image).shape[:2]
    if abs(rows / columns - height / width) > 0.01:
        raise VidportError(f"the image is {columns}x{rows}, the video {width}x{height}: another aspect ratio",
                           hint="pass --width/--height of the image's ratio, or --resize to stretch it")


def image_pixels(image: Any, height: int, width: int, crf: int) -> np.ndarray:
    """-> (1, 1, height, width, 3) float32 in [-1, 1]: one frame, channels-last, for the VAE."""
    import PIL.Image

    compressed = PIL.Image.fromarray(h264_roundtrip(image_array(image), crf))
    if compressed.size != (width, height):
        compressed = compressed.resize((width, height), resample=PIL.Image.LANCZOS)
    pixels = np.asarray(compressed, dtype=np.float32) / 255.0 * 2.0 - 1.0
    return pixels[None, None]
