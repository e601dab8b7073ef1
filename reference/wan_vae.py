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
from vidport.reference.official import Official, load_strict
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


def official_vae_2_2(state: dict[str, Any], config: dict[str, Any]) -> Official:
    """The Wan 2.2 VAE as wan/modules/vae2_2.py's `_video_vae` builds it (the official `WanVAE_`,
    with the config's widths and structure), the file's tensors loaded strictly; a probe's
    `encode` / `decode` is the official method with the identity scale (the port's latents are
    unscaled, as diffusers' are)."""
    import torch

    from vidport.reference.wan_official import official_module

    module = official_module("vae2_2")
    with torch.device("meta"):
        model = module.WanVAE_(dim=config["base_dim"], dec_dim=config.get("decoder_base_dim") or config["base_dim"],
                               z_dim=config["z_dim"], dim_mult=list(config["dim_mult"]),
                               num_res_blocks=config["num_res_blocks"], attn_scales=list(config["attn_scales"]),
                               temperal_downsample=list(config["temperal_downsample"]), dropout=0.0)
    model = load_strict(model, state, "wan/modules/vae2_2.py WanVAE_")

    def run(probe: Probe, args: list, kwargs: dict) -> Any:
        if probe.method not in ("encode", "decode"):
            raise VidportError(f"the official Wan 2.2 VAE runs encode and decode probes, not {probe.method!r}")
        return getattr(model, probe.method)(*args, [0.0, 1.0], **kwargs)

    return Official(model, "official:wan22 wan/modules/vae2_2.py WanVAE_", run)
