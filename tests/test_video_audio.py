"""An MP4 carries LTX-2's soundtrack (AAC) back at its rate, channels, length and pitch; frames stream
in by chunks to the same video; a failed write leaves nothing behind; WAV round-trips."""
from __future__ import annotations

import av
import numpy as np
import pytest

from vidport.converter.core.errors import VidportError
from vidport.runtime.video import open_video, read_audio, read_video, write_video, write_wav

RATE, FPS, FRAMES = 24000, 24, 25


def gradient_frames(frames: int = FRAMES, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth colour gradient that drifts a little each frame: easy on a codec, so PSNR stays high."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    t = np.arange(frames)[:, None, None] / frames
    rgb = np.stack([0.2 + 0.6 * x + 0.1 * t, 0.2 + 0.6 * y + 0 * t, 0.8 - 0.4 * (x + y) / 2 + 0.1 * t], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def tone(seconds: float, frequency: float = 440.0) -> np.ndarray:
    """Stereo sine, the left channel twice as loud as the right (so a channel swap shows)."""
    t = np.arange(round(seconds * RATE)) / RATE
    wave = np.sin(2 * np.pi * frequency * t)
    return np.stack([0.5 * wave, 0.25 * wave], axis=1).astype(np.float32)


def dominant_frequency(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[spectrum.argmax()])


def test_mp4_soundtrack_and_frames_read_back(tmp_path):
    frames, audio = gradient_frames(), tone(FRAMES / FPS)
    path = write_video(tmp_path / "v.mp4", frames, fps=FPS, audio=audio, sample_rate=RATE)

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        assert (stream.codec_context.name, stream.rate, stream.channels) == ("aac", RATE, 2)
    back, rate = read_audio(path)
    assert rate == RATE and back.shape[1] == 2
    assert abs(len(back) - len(audio)) <= 1024, (len(back), len(audio))
    for channel in range(2):
        assert abs(dominant_frequency(back[:, channel], rate) - 440.0) <= 5.0
    rms = np.sqrt((back[2048:-2048] ** 2).mean(axis=0))
    assert 1.8 < rms[0] / rms[1] < 2.2, rms  # left stays left

    decoded = read_video(path)
    assert decoded.shape == frames.shape
    mse = ((decoded.astype(np.float64) - frames) ** 2).mean()
    assert 10 * np.log10(255.0 ** 2 / mse) >= 30.0


def test_chunks_make_the_same_video_as_one_call(tmp_path):
    frames, audio = gradient_frames(), tone(FRAMES / FPS)
    write_video(tmp_path / "whole.mp4", frames, fps=FPS, audio=audio, sample_rate=RATE)
    with open_video(tmp_path / "chunked.mp4", FPS, audio=audio, sample_rate=RATE) as writer:
        for chunk in np.array_split(frames, [9, 17]):  # 9 + 8 + 8, as a tiled VAE decode hands them over
            writer.append(chunk.astype(np.float32) / 255.0)  # floats in [0, 1] are taken too
    assert np.array_equal(read_video(tmp_path / "chunked.mp4"), read_video(tmp_path / "whole.mp4"))
    assert np.array_equal(read_audio(tmp_path / "chunked.mp4")[0], read_audio(tmp_path / "whole.mp4")[0])


@pytest.mark.parametrize("name,with_audio", [("v.mp4", True), ("v.webm", False), ("v.gif", False), ("frames/", False)])
def test_an_error_inside_the_block_leaves_nothing(tmp_path, name, with_audio):
    folder = tmp_path / "out"
    folder.mkdir()
    sound = {"audio": tone(1.0), "sample_rate": RATE} if with_audio else {}
    with pytest.raises(RuntimeError, match="decode failed"):
        with open_video(f"{folder}/{name}", FPS, **sound) as writer:
            writer.append(gradient_frames(4))
            raise RuntimeError("decode failed")
    assert list(folder.iterdir()) == []


def test_wav_round_trip(tmp_path):
    audio = np.random.default_rng(0).uniform(-1.2, 1.2, (4801, 2)).astype(np.float32)
    back, rate = read_audio(write_wav(tmp_path / "a.wav", audio, 48000))
    assert rate == 48000 and back.shape == audio.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, np.clip(audio, -1, 1), rtol=0, atol=1 / 32767)
    assert [p.name for p in tmp_path.iterdir()] == ["a.wav"]


@pytest.mark.parametrize("name", ["v.gif", "v.webm", "frames/"])
def test_audio_without_a_soundtrack_format_is_refused(tmp_path, name):
    target = f"{tmp_path}/{name}"
    with pytest.raises(VidportError, match="cannot hold a soundtrack") as refused:
        write_video(target, gradient_frames(2), fps=FPS, audio=tone(0.1), sample_rate=RATE)
    assert target.rstrip("/") in str(refused.value) and ".mp4" in str(refused.value) and "WAV" in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_odd_sides_refused_for_h264_and_nothing_left(tmp_path):
    with pytest.raises(VidportError, match="H.264 needs even width and height, got 63x48"):
        write_video(tmp_path / "v.mp4", gradient_frames(2, 48, 63), fps=FPS)
    assert list(tmp_path.iterdir()) == []
