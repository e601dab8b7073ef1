"""How to exercise the LTX-2 video VAE: encode a seeded video of 1 + 8k frames and, separately,
decode seeded latents (with a decode timestep where the decoder is timestep-conditioned), each
through diffusers' own `encode` / `decode`, so every block of both sides runs on a real clip:
the causal time padding, the temporal samplers' first-frame handling and the patching."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None) -> list[Probe]:
    """`frames` video frames (1 + 8k for the released VAE; default 9) at 2 x 3 latent pixels, and
    the latents of that many frames."""
    step = config.get("temporal_compression_ratio") or 8
    frames = frames or 1 + step
    if frames < 1 or (frames - 1) % step:
        raise VidportError(f"--frames {frames}: an LTX-2 video VAE probe needs 1 + {step}k frames (1, {1 + step}, ...)")
    factor = config.get("spatial_compression_ratio") or 32
    rng = np.random.default_rng(seed)
    video = rng.uniform(-1.0, 1.0, (1, config.get("in_channels", 3), frames, 2 * factor, 3 * factor)).astype(np.float32)
    latents = rng.standard_normal((1, config.get("latent_channels", 128), 1 + (frames - 1) // step, 2, 3),
                                  dtype=np.float32)
    decode = {"temb": np.array([0.05], dtype=np.float32)} if config.get("timestep_conditioning") else {}
    return [Probe("", [video], method="encode"), Probe("", [latents], decode, method="decode")]
