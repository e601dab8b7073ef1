"""Videos decode back to the frame count and size written."""
from __future__ import annotations

import numpy as np
import pytest

from vidport.converter.core.errors import VidportError
from vidport.runtime.video import read_video, write_video


@pytest.mark.parametrize("name", ["v.mp4", "v.webm", "v.gif", "frames"])
def test_round_trip_shape(tmp_path, name):
    frames = np.zeros((6, 40, 56, 3), np.uint8)
    frames[:, :, :, 0] = np.linspace(0, 255, 6, dtype=np.uint8)[:, None, None]  # brightness ramps over time
    written = write_video(tmp_path / name, frames, fps=8)
    back = read_video(written)
    assert back.shape == frames.shape
    # frame order survives: the red channel still ramps up
    assert np.all(np.diff(back[:, 20, 28, 0].astype(int)) > 0)


def test_png_frames_are_exact(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_video(write_video(tmp_path / "f", frames)), frames)


def test_bad_format(tmp_path):
    with pytest.raises(VidportError, match="unknown video format"):
        write_video(tmp_path / "v.avi", np.zeros((2, 8, 8, 3), np.uint8))
