"""How to exercise the VAE: its encoder on a seeded batch of frames and its decoder on seeded
latents, separately, so each is verified on inputs of its own (plus the two 1x1 quant convs)."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None, size: int = 32) -> list[Probe]:
    frames = frames or 2
    latent = config.get("latent_channels", 4)
    factor = 2 ** (len(config.get("block_out_channels", [64])) - 1)
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1.0, 1.0, (frames, config.get("in_channels", 3), size, size)).astype(np.float32)
    latents = rng.standard_normal((frames, latent, size // factor, size // factor), dtype=np.float32)
    found = [Probe("encoder", [images]), Probe("decoder", [latents])]
    if config.get("use_quant_conv", True):
        moments = rng.standard_normal((frames, 2 * latent, size // factor, size // factor), dtype=np.float32)
        found.append(Probe("quant_conv", [moments]))
    if config.get("use_post_quant_conv", True):
        found.append(Probe("post_quant_conv", [latents]))
    return found
