"""How to exercise the LTX-2 latent upsampler: the whole model on seeded latents of a few frames
at 4 x 6 latent pixels (not square, so a row/column mix-up in the pixel shuffle shows), and the
official reference for the original file: ltx_core's LatentUpsampler loading it."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.official import Official, load_strict
from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None) -> list[Probe]:
    """Latents (1, in_channels, frames, 4, 6); 3 frames by default, so a temporal upsampler's
    first-frame drop and any frame mix-up in the folding show."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((1, config.get("in_channels", 128), frames or 3, 4, 6), dtype=np.float32)
    return [Probe("", [latents])]


def official_config(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config in the keys of the file's "config" metadata (what ltx_core's
    LatentUpsamplerConfigurator reads: diffusers renamed two of them)."""
    return {"in_channels": config["in_channels"], "mid_channels": config["mid_channels"],
            "num_blocks_per_stage": config["num_blocks_per_stage"], "dims": config.get("dims", 3),
            "spatial_upsample": config.get("spatial_upsample", True),
            "temporal_upsample": config.get("temporal_upsample", False),
            "spatial_scale": config.get("rational_spatial_scale", 2.0),
            "rational_resampler": config.get("use_rational_resampler", True)}


def official_upsampler(state: dict[str, Any], config: dict[str, Any]) -> Official:
    """ltx_core's LatentUpsampler as its configurator builds it from the config (at the config's
    widths), the file's tensors loaded strictly (the blur kernel buffer included)."""
    import torch
    from ltx_core.model.upsampler import LatentUpsamplerConfigurator

    with torch.device("meta"):
        model = LatentUpsamplerConfigurator.from_config(official_config(config))
    model = load_strict(model, state, "ltx_core/model/upsampler LatentUpsampler")

    def run(probe: Probe, args: list, kwargs: dict) -> Any:
        return model(args[0])

    return Official(model, "official:ltx_core ltx_core/model/upsampler LatentUpsampler", run)
