"""How to exercise the LTX-2 audio VAE: its encoder on a seeded log-mel spectrogram and its
decoder on seeded latents, separately, so each is verified on inputs of its own."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None) -> list[Probe]:
    """`frames` mel frames (default 9; 1 + 4k encode to 1 + k latent frames) at the config's mel
    bins, and latents of 1 + (frames - 1) // 4 frames, which decode to `frames` again."""
    frames = frames or 9
    mel_bins = config.get("mel_bins") or 64
    rng = np.random.default_rng(seed)
    mel = rng.standard_normal((1, config.get("in_channels", 2), frames, mel_bins), dtype=np.float32)
    latents = rng.standard_normal((1, config.get("latent_channels", 8), 1 + (frames - 1) // 4, mel_bins // 4),
                                  dtype=np.float32)
    return [Probe("encoder", [mel]), Probe("decoder", [latents])]
