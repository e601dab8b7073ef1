"""How to exercise a Wan DiT: the whole transformer on seeded latents, as one denoising step.

Latents are (1, C, frames, 4, 6): a non-square grid (2 x 3 patches) over several latent frames, so
that a frame/row/column mix-up in the 3D RoPE or the unpatchify shows. The timestep is an integer
(the port then casts nothing: a bfloat16 timestep of 731 would read 732). The text context is
512 tokens, the length the pipelines pad prompts to (diffusers' I2V attention splits on it);
image-to-video models also get 257 CLIP image tokens. Wan 2.2 TI2V (48 latent channels) runs a
second step the way its pipeline does: one timestep per token, the first frame's tokens at 0.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from vidport.reference.probe import Probe

TEXT_TOKENS = 512
IMAGE_TOKENS = 257  # CLIP ViT-H/14 on 224 x 224: 16 x 16 patches + the class token
TI2V_CHANNELS = 48


def probes(config: dict[str, Any], seed: int, frames: int | None = None, height: int = 4,
           width: int = 6) -> list[Probe]:
    rng = np.random.default_rng(seed)
    frames = frames or 3
    inputs: dict[str, Any] = {
        "hidden_states": rng.standard_normal((1, config["in_channels"], frames, height, width), dtype=np.float32),
        "timestep": rng.integers(1, 1000, size=(1,)),
        "encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS, config["text_dim"]), dtype=np.float32),
    }
    if config.get("image_dim"):
        tokens = IMAGE_TOKENS * (2 if config.get("pos_embed_seq_len") else 1)  # FLF2V: first + last frame
        inputs["encoder_hidden_states_image"] = rng.standard_normal((1, tokens, config["image_dim"]), dtype=np.float32)
    found = [Probe("", [], inputs)]
    if config["in_channels"] == TI2V_CHANNELS:
        found.append(Probe("", [], {**inputs, "timestep": per_token_timesteps(config, inputs["timestep"][0],
                                                                                frames, height, width)}))
    return found


def per_token_timesteps(config: dict[str, Any], timestep: int, frames: int, height: int, width: int) -> np.ndarray:
    """[1, tokens] timesteps as Wan 2.2 TI2V's pipeline makes them for image-to-video: the
    conditioning first frame is clean (0), every other token is at `timestep`."""
    p_t, p_h, p_w = config.get("patch_size", (1, 2, 2))
    grid = (frames // p_t, height // p_h, width // p_w)
    mask = np.ones(grid, dtype=np.int64)
    mask[0] = 0
    return (mask * int(timestep)).reshape(1, math.prod(grid))
