"""What an LTX-2 pipeline folder can run, decided from configs alone: whether its components fit
each other, and whether a request's frames, size, image and audio fit the models. Each refusal is
one VidportError naming the setting, with the nearest valid values in the hint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vidport.converter.core.errors import VidportError


@dataclass(frozen=True)
class LTX2Layout:
    """The facts of a folder that requests are checked against."""

    latent_channels: int
    spatial: int  # pixels per latent pixel (32)
    temporal: int  # frames per latent frame after the first (8)
    audio_channels: int  # audio latent channels (C of the packed C x mel bins)
    audio_rate: int  # the audio VAE's mel sample rate and hop, and its time compression
    hop_length: int
    audio_compression: int
    num_layers: int
    has_audio: bool  # an audio VAE and a vocoder: the soundtrack can be decoded
    has_upsampler: bool
    has_text_encoder: bool
    upsampler_scale: float | None = None


def layout_of(configs: dict[str, dict[str, Any]]) -> LTX2Layout:
    """Check the components' configs against each other."""
    missing = [name for name in ("transformer", "connectors", "vae") if name not in configs]
    if missing:
        raise VidportError(f"an LTX-2 pipeline needs {', '.join(missing)}", hint="convert the whole release: "
                           "vidport convert ltx2 SRC --out DIR")
    dit, vae = configs["transformer"], configs["vae"]
    if dit["in_channels"] != vae["latent_channels"]:
        raise VidportError(f"the DiT takes {dit['in_channels']} latent channels, the video VAE makes "
                           f"{vae['latent_channels']}", hint="convert the DiT and the VAE from the same release")
    audio_vae = configs.get("audio_vae")
    audio_channels = audio_vae["latent_channels"] if audio_vae else 8
    if audio_vae:
        packed = audio_channels * audio_vae["mel_bins"] // 4
        if dit["audio_in_channels"] != packed:
            raise VidportError(f"the DiT takes {dit['audio_in_channels']} audio features per latent frame, the audio "
                               f"VAE makes {packed}", hint="convert the DiT and the audio VAE from the same release")
    source = audio_vae or {"sample_rate": dit["audio_sampling_rate"], "mel_hop_length": dit["audio_hop_length"]}
    upsampler = configs.get("latent_upsampler")
    return LTX2Layout(
        latent_channels=vae["latent_channels"], spatial=vae.get("spatial_compression_ratio", 32),
        temporal=vae.get("temporal_compression_ratio", 8), audio_channels=audio_channels,
        audio_rate=source["sample_rate"], hop_length=source["mel_hop_length"],
        audio_compression=dit.get("audio_scale_factor", 4), num_layers=dit["num_layers"],
        has_audio=bool(audio_vae) and "vocoder" in configs, has_upsampler=upsampler is not None,
        has_text_encoder="text_encoder" in configs,
        upsampler_scale=(upsampler.get("spatial_scale", 2.0) if upsampler and upsampler.get("spatial_upsample", True)
                         else None))


def _nearest(value: int, multiple: int, offset: int = 0) -> str:
    below = max(multiple + offset, (value - offset) // multiple * multiple + offset)
    return f"{below} or {below + multiple}"


def check_request(layout: LTX2Layout, frames: int, height: int, width: int, two_stage: bool) -> None:
    """Frames 1 + 8k; sides divisible by the VAE's 32 (64 for the two-stage recipe, whose first stage
    runs at half the size)."""
    if frames < 1 or (frames - 1) % layout.temporal:
        raise VidportError(f"--frames {frames}: LTX-2 makes 1 + {layout.temporal}k frames",
                           hint=f"use {_nearest(frames, layout.temporal, 1)}")
    multiple = layout.spatial * (2 if two_stage else 1)
    for name, side in (("--height", height), ("--width", width)):
        if side < multiple or side % multiple:
            recipe = " (the distilled recipe's first stage runs at half size)" if two_stage else ""
            raise VidportError(f"{name} {side}: must be a multiple of {multiple}{recipe}",
                               hint=f"use {_nearest(side, multiple)}")
