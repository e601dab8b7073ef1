"""How to exercise a Wan VAE: encode a seeded video of 1 + 4k frames and, separately, decode
seeded latents, each through diffusers' own chunked loop (`encode` / `decode`), so the feature
cache is exercised across chunk boundaries.

The loop calls every block once per chunk; the harness names the k-th call of a module
`name#k` on both sides, and the port calls each module exactly as often, in the same order, so
every chunk of every layer is compared. Inputs are recorded when a call begins, cache included,
so each block of the port can also be replayed on diffusers' own cache state (local error)."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None) -> list[Probe]:
    """`frames` video frames (1 + 4k; default 9: three encoder chunks) at 2 x 3 latent pixels
    (16 x 24 pixels for Wan 2.1, 32 x 48 for Wan 2.2), and the latents of that many frames."""
    frames = frames or 9
    step = config.get("scale_factor_temporal") or 4
    if (frames - 1) % step:
        raise VidportError(f"--frames {frames}: a Wan VAE probe needs 1 + {step}k frames (5, 9, ...)")
    factor = config.get("scale_factor_spatial") or 8
    rgb = config.get("in_channels", 3) // (config.get("patch_size") or 1) ** 2
    rng = np.random.default_rng(seed)
    video = rng.uniform(-1.0, 1.0, (1, rgb, frames, 2 * factor, 3 * factor)).astype(np.float32)
    latents = rng.standard_normal((1, config.get("z_dim", 16), 1 + (frames - 1) // step, 2, 3), dtype=np.float32)
    return [Probe("", [video], method="encode"), Probe("", [latents], method="decode")]
