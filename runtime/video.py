"""Write and read videos: MP4 (H.264, with an optional AAC soundtrack), WebM (VP9), GIF, or a folder of
PNG frames; and soundtracks as 16-bit WAV.

Frames are uint8 arrays (frames, height, width, 3), or floats in [0, 1]; audio is float32
(samples, channels) in [-1, 1]. The writer takes frames chunk by chunk, as a VAE decoding in
temporal tiles hands them over, so a long video never has to sit in memory whole. Every output is
written under a temporary name beside the target and renamed on a clean close: a failed run leaves
nothing at the target. A live writer (`live=True`, `vidport generate --stream`) writes at the target
itself so it can be watched while it grows: a fragmented MP4 flushed frame by frame, or PNG frames,
removed if the run fails. PyAV encodes MP4 and WebM; imageio writes GIF and PNG and reads videos back.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np

from vidport.converter.core.errors import VidportError

FORMATS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".gif": None}
# H.264 at CRF 18, the usual "visually lossless" setting. x264's macroblock tree is off: in-process it
# made the same frames encode differently from one call to the next (same seed, same video, no more).
# VP9 in constant-quality mode (bit rate 0).
ENCODER_OPTIONS = {".mp4": {"crf": "18", "preset": "medium", "x264-params": "mbtree=0"},
                   ".webm": {"crf": "24", "b": "0", "row-mt": "1"}}
# Live MP4: a fragment per frame (the header first, no index at the end to wait for), each flushed
# to the file as it is muxed; x264 without look-ahead or frame reordering, so a frame's packet is
# out as soon as it is encoded.
LIVE_CONTAINER_OPTIONS = {"movflags": "frag_every_frame+empty_moov+default_base_moof", "flush_packets": "1"}
LIVE_ENCODER_OPTIONS = {"tune": "zerolatency"}
LIVE_FORMATS = (".mp4", "")
AUDIO_LAYOUTS = {1: "mono", 2: "stereo"}


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8, as diffusers' postprocess does."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def write_video(path: str | Path, frames: np.ndarray, fps: float = 8, audio: np.ndarray | None = None,
                sample_rate: int | None = None) -> Path:
    """All frames at once, through the streaming writer; a path without a suffix (or ending in /) gets PNG frames."""
    with open_video(path, fps, audio=audio, sample_rate=sample_rate) as writer:
        writer.append(frames)
    return writer.path


def open_video(path: str | Path, fps: float, audio: np.ndarray | None = None,
               sample_rate: int | None = None, live: bool = False) -> VideoWriter:
    """A streaming writer by the path's suffix; `audio` (MP4 only) is muxed as AAC at `sample_rate`;
    `live`: written at `path` as it grows (MP4 or PNG frames)."""
    return VideoWriter(path, fps, audio, sample_rate, live)


class VideoWriter:
    """Frames in by chunks, one file (or PNG folder) out, renamed into place only on a clean close."""

    def __init__(self, path: str | Path, fps: float, audio: np.ndarray | None = None,
                 sample_rate: int | None = None, live: bool = False):
        is_folder = str(path).endswith(("/", os.sep))
        self.path = Path(path)
        self.suffix = "" if is_folder else self.path.suffix.lower()
        if self.suffix and self.suffix not in FORMATS:
            raise VidportError(f"{self.path}: unknown video format '{self.suffix}'",
                               hint="use .mp4, .webm, .gif or a folder/")
        if fps <= 0:
            raise VidportError(f"{self.path}: the frame rate must be positive, got {fps}")
        self.audio = None if audio is None else check_audio(self.path, audio, sample_rate)
        if self.audio is not None and self.suffix != ".mp4":
            kind = f"a {self.suffix[1:].upper()}" if self.suffix else "a folder of PNG frames"
            raise VidportError(f"{self.path}: {kind} cannot hold a soundtrack",
                               hint="write .mp4, or write the audio beside it as a WAV (write_wav)")
        self.fps, self.sample_rate = fps, sample_rate
        self.frames_written, self.audio_written = 0, 0
        self.size: tuple[int, int] | None = None
        self.closed = False
        self.live = live
        if live:
            check_live(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.path.name}."
        if live:
            self.temp = self.path
            if self.suffix:
                self._open_encoder()
            else:
                self.path.mkdir()
            return
        if not self.suffix:
            self.temp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=self.path.parent))
            return
        self.temp = temp_beside(self.path, f".partial{self.suffix}")
        try:
            self._open_encoder()
        except BaseException:
            self.temp.unlink(missing_ok=True)
            raise

    def _open_encoder(self) -> None:
        if self.suffix == ".gif":
            import imageio.v2 as imageio

            self.gif = imageio.get_writer(self.temp, mode="I", duration=1000 / self.fps, loop=0)
            return
        import av

        self.container = av.open(str(self.temp), "w", format=self.suffix[1:],
                                 options=dict(LIVE_CONTAINER_OPTIONS) if self.live else None)
        self.video = self.container.add_stream(FORMATS[self.suffix], rate=Fraction(float(self.fps)).limit_denominator(1001))
        self.video.pix_fmt = "yuv420p"
        self.video.options = {**ENCODER_OPTIONS[self.suffix], **(LIVE_ENCODER_OPTIONS if self.live else {})}
        if self.audio is not None:
            self.sound = self.container.add_stream("aac", rate=self.sample_rate)
            self.sound.layout = AUDIO_LAYOUTS[self.audio.shape[1]]

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def append(self, frames: np.ndarray) -> None:
        """Encode one chunk of frames (n, height, width, 3); any failure removes the partial output."""
        if self.closed:
            raise VidportError(f"{self.path}: the video writer is already closed")
        try:
            self._append(self._check(frames))
        except BaseException:
            self.abort()
            raise

    def _check(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8:
            frames = to_uint8(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise VidportError(f"{self.path}: expected frames of shape (frames, height, width, 3), got {frames.shape}")
        size = frames.shape[1:3]
        if self.size is None:
            if self.suffix == ".mp4" and (size[0] % 2 or size[1] % 2):
                raise VidportError(f"{self.path}: H.264 needs even width and height, got {size[1]}x{size[0]}")
            self.size = size
        elif size != self.size:
            raise VidportError(f"{self.path}: frames of {size[1]}x{size[0]} after frames of "
                               f"{self.size[1]}x{self.size[0]}; a video has one size")
        return frames

    def _append(self, frames: np.ndarray) -> None:
        import imageio.v2 as imageio

        for frame in frames:
            if not self.suffix:
                imageio.imwrite(self.temp / f"frame_{self.frames_written:04d}.png", frame)
            elif self.suffix == ".gif":
                self.gif.append_data(frame)
            else:
                self._encode_frame(frame)
            self.frames_written += 1
        if self.audio is not None:  # the soundtrack up to the last frame's end, so the file stays interleaved
            self._encode_audio(min(len(self.audio), int(np.ceil(self.frames_written / self.fps * self.sample_rate))))

    def _encode_frame(self, frame: np.ndarray) -> None:
        import av

        if self.frames_written == 0:
            self.video.height, self.video.width = frame.shape[:2]
        picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
        picture.pts = self.frames_written
        self.container.mux(self.video.encode(picture))

    def _encode_audio(self, end: int) -> None:
        import av

        if end <= self.audio_written:
            return
        chunk = np.ascontiguousarray(self.audio[self.audio_written:end].T)
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=self.sound.layout.name)
        frame.sample_rate = self.sample_rate
        frame.pts = self.audio_written
        self.container.mux(self.sound.encode(frame))
        self.audio_written = end

    def close(self) -> None:
        """Finish the stream and rename it into place; a video of no frames is refused."""
        if self.closed:
            return
        try:
            if self.frames_written == 0:
                raise VidportError(f"{self.path}: no frames were written")
            self._finish()
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self.closed = True

    def _finish(self) -> None:
        if self.suffix == ".gif":
            self.gif.close()
        elif self.suffix:
            if self.audio is not None:
                self._encode_audio(len(self.audio))
                self.container.mux(self.sound.encode(None))
            self.container.mux(self.video.encode(None))
            self.container.close()

    def _move_into_place(self) -> None:
        if self.live:
            return
        if self.suffix or not self.path.is_dir():
            os.replace(self.temp, self.path)
            return
        # an existing folder keeps what else it holds: the new frames move in, older extra frames go
        for stale in self.path.glob("frame_*.png"):
            if not (self.temp / stale.name).exists():
                stale.unlink()
        for frame in sorted(self.temp.iterdir()):
            os.replace(frame, self.path / frame.name)
        self.temp.rmdir()

    def abort(self) -> None:
        """Stop and remove the partial output; the target is left as it was."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.suffix == ".gif":
                self.gif.close()
            elif self.suffix:
                self.container.close()
        except Exception:  # a half-written stream may not close cleanly; it is removed below either way
            pass
        if self.temp.is_dir():
            shutil.rmtree(self.temp, ignore_errors=True)
        else:
            self.temp.unlink(missing_ok=True)


def check_live(path: Path) -> None:
    """A live output is a format readable while it grows, and a new name: written in place, it
    could not keep an existing file safe from a failed run."""
    suffix = "" if str(path).endswith(("/", os.sep)) else Path(path).suffix.lower()
    if suffix not in LIVE_FORMATS:
        raise VidportError(f"{path}: a {suffix[1:].upper()} cannot be watched while it is written",
                           hint="stream to .mp4 (fragmented) or to a folder/ of PNG frames")
    if Path(path).exists():
        raise VidportError(f"{path}: exists; a live output is written in place, so a failed run would lose it",
                           hint="remove it first, or write to another name")


def check_audio(path: Path, audio: np.ndarray, sample_rate: int | None) -> np.ndarray:
    """A soundtrack as float32 (samples, channels) clipped to [-1, 1]; mono may come as (samples,)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[:, None]
    if audio.ndim != 2 or audio.shape[1] not in AUDIO_LAYOUTS or not len(audio):
        raise VidportError(f"{path}: expected audio of shape (samples, 1 or 2 channels), got {audio.shape}",
                           hint="a (channels, samples) array needs a transpose")
    if not sample_rate or sample_rate <= 0:
        raise VidportError(f"{path}: audio needs its sample rate (e.g. 24000 or 48000), got {sample_rate}")
    return np.clip(audio, -1.0, 1.0)


def temp_beside(path: Path, suffix: str) -> Path:
    """An empty temporary file beside `path`, with the mode a new file gets (mkstemp's is 0600)."""
    from vidport.converter.output import current_umask

    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~current_umask())
    return Path(name)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> Path:
    """A 16-bit PCM WAV, written under a temporary name beside the target and renamed into place."""
    path = Path(path)
    audio = check_audio(path, audio, sample_rate)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = temp_beside(path, ".partial.wav")
    try:
        with open(name, "wb") as file, wave.open(file, "wb") as out:
            out.setnchannels(audio.shape[1])
            out.setsampwidth(2)
            out.setframerate(int(sample_rate))
            out.writeframes((audio * 32767.0).round().astype("<i2").tobytes())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return path


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A WAV's samples or an MP4's soundtrack as float32 (samples, channels), and its sample rate."""
    path = Path(path)
    if path.suffix.lower() == ".wav":
        with wave.open(str(path), "rb") as file:
            if file.getsampwidth() != 2:
                raise VidportError(f"{path}: only 16-bit PCM WAV is read, this one has {8 * file.getsampwidth()}-bit samples")
            samples = np.frombuffer(file.readframes(file.getnframes()), "<i2")
            return (samples.reshape(-1, file.getnchannels()) / 32767.0).astype(np.float32), file.getframerate()
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise VidportError(f"{path}: has no audio track")
        stream = container.streams.audio[0]
        planar = av.AudioResampler(format="fltp")  # whatever the codec decodes to, as (channels, samples)
        chunks = [out.to_ndarray() for frame in container.decode(stream) for out in planar.resample(frame)]
        chunks += [out.to_ndarray() for out in planar.resample(None)]
        return np.concatenate(chunks, axis=1).T.astype(np.float32), stream.rate


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
