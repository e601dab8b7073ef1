"""How to exercise an LTX-2 DiT: the whole transformer on seeded video and audio tokens, as one
denoising step of the audio-video pipeline.

The video is 3 latent frames of 2 x 3 patches (a non-square grid over several frames, so a
frame/row/column mix-up in the RoPE shows) at 24 fps; the audio 7 latent frames. Timesteps are
integers (sigma * 1000 as the pipeline passes them; a bfloat16 port would round a fraction) and
differ between the streams, so the cross-modal modulation depends on `use_cross_timestep`, which
the probe passes as the manifest's config records it (the detected version's). The text is
padded: its attention mask hides the last tokens, as the pipeline's prompt mask does.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.probe import Probe

TEXT_TOKENS = 16
FRAMES, HEIGHT, WIDTH = 3, 2, 3
AUDIO_FRAMES = 7


def probes(config: dict[str, Any], seed: int, frames: int | None = None) -> list[Probe]:
    rng = np.random.default_rng(seed)
    frames = frames or FRAMES
    video_tokens = frames * HEIGHT * WIDTH
    caption = config["caption_channels"] if config.get("use_prompt_embeddings", True) else None
    text_width = caption or config["cross_attention_dim"]
    audio_text_width = caption or config["audio_cross_attention_dim"]
    mask = np.ones((1, TEXT_TOKENS), dtype=np.float32)
    mask[:, -5:] = 0
    timestep, audio_timestep = rng.integers(1, 1000, size=(1,)), rng.integers(1, 1000, size=(1,))
    inputs: dict[str, Any] = {
        "hidden_states": rng.standard_normal((1, video_tokens, config["in_channels"]), dtype=np.float32),
        "audio_hidden_states": rng.standard_normal((1, AUDIO_FRAMES, config["audio_in_channels"]), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS, text_width), dtype=np.float32),
        "audio_encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS, audio_text_width), dtype=np.float32),
        "timestep": timestep, "audio_timestep": audio_timestep, "sigma": timestep, "audio_sigma": audio_timestep,
        "encoder_attention_mask": mask, "audio_encoder_attention_mask": mask,
        "num_frames": frames, "height": HEIGHT, "width": WIDTH, "fps": 24.0, "audio_num_frames": AUDIO_FRAMES,
        "use_cross_timestep": bool(config.get("use_cross_timestep", False)),
    }
    return [Probe("", [], inputs)]
