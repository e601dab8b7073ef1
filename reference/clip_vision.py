"""How to exercise the CLIP vision encoder: the whole model on a seeded batch of images at the
model's size, normalized the way CLIP's preprocessing leaves them (roughly unit scale)."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None, batch: int = 2) -> list[Probe]:
    """`frames` images (default `batch`): Wan I2V encodes one conditioning frame per video."""
    size = config.get("image_size", 224)
    channels = config.get("num_channels", 3)
    rng = np.random.default_rng(seed)
    pixel_values = rng.standard_normal((frames or batch, channels, size, size), dtype=np.float32)
    return [Probe("", [pixel_values])]
