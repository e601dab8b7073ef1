"""How to exercise the SD 1.5 UNet: the whole network on seeded latents, a seeded timestep and
seeded text embeddings (module "" is the model itself). The motion UNet's probe folds frames in
as diffusers' UNetMotionModel takes them."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.probe import Probe

TOKENS = 77  # CLIP's context length, as SD pipelines pad prompts


def _timestep(rng: np.random.Generator) -> np.ndarray:
    # an integer step, as schedulers give them: the harness passes integers through uncast
    return np.array(rng.integers(0, 1000), dtype=np.int64)


def probes(config: dict[str, Any], seed: int, frames: int | None = None, batch: int = 2, size: int = 8) -> list[Probe]:
    """`frames` does not apply to an image UNet and is ignored."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, config.get("in_channels", 4), size, size), dtype=np.float32)
    timestep = _timestep(rng)
    text = rng.standard_normal((batch, TOKENS, config["cross_attention_dim"]), dtype=np.float32)
    return [Probe("", [], {"sample": sample, "timestep": timestep, "encoder_hidden_states": text})]


def motion_probes(config: dict[str, Any], seed: int, frames: int = 4, batch: int = 1, size: int = 8) -> list[Probe]:
    """Latents (batch, C, frames, H, W); the prompt repeated per frame, as AnimateDiff pipelines do."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, config.get("in_channels", 4), frames, size, size), dtype=np.float32)
    timestep = _timestep(rng)
    text = rng.standard_normal((batch, TOKENS, config["cross_attention_dim"]), dtype=np.float32)
    text = np.repeat(text, frames, axis=0)
    return [Probe("", [], {"sample": sample, "timestep": timestep, "encoder_hidden_states": text})]
