"""How to exercise a motion adapter: diffusers' MotionAdapter has no forward of its own, so
every motion module is run on seeded (batch*frames, C, H, W) activations, as the UNet would."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None, batch: int = 1, size: int = 4) -> list[Probe]:
    frames = frames or min(16, config["motion_max_seq_length"])
    channels = list(config["block_out_channels"])
    blocks: list[tuple[str, int, int]] = []
    layers = config["motion_layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    for i, c in enumerate(channels):
        blocks += [(f"down_blocks.{i}", c, m) for m in range(layers[i])]
    if config.get("use_motion_mid_block"):
        blocks += [("mid_block", channels[-1], m) for m in range(config.get("motion_mid_block_layers_per_block", 1))]
    for i, c in enumerate(reversed(channels)):
        blocks += [(f"up_blocks.{i}", c, m) for m in range(list(reversed(layers))[i] + 1)]
    rng = np.random.default_rng(seed)
    return [
        Probe(f"{block}.motion_modules.{m}",
              [rng.standard_normal((batch * frames, c, size, size), dtype=np.float32)],
              {"num_frames": frames})
        for block, c, m in blocks
    ]
