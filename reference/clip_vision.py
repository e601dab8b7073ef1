"""How to exercise the CLIP vision encoder: the whole model on a seeded batch of images at the
model's size, normalized the way CLIP's preprocessing leaves them (roughly unit scale)."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.official import Official, load_strict
from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None, batch: int = 2) -> list[Probe]:
    """`frames` images (default `batch`): Wan I2V encodes one conditioning frame per video."""
    size = config.get("image_size", 224)
    channels = config.get("num_channels", 3)
    rng = np.random.default_rng(seed)
    pixel_values = rng.standard_normal((frames or batch, channels, size, size), dtype=np.float32)
    return [Probe("", [pixel_values])]


def official_visual(state: dict[str, Any], config: dict[str, Any]) -> Official:
    """The visual tower of wan/modules/animate/clip.py's XLMRobertaCLIP (`VisionTransformer`, as
    clip_xlm_roberta_vit_h_14 builds it, at the config's widths) with the file's `visual.` tensors
    loaded strictly (Wan runs only this tower); flash attention is the official signature computed
    by torch's SDPA in float32 on the CPU. Its forward returns the last block's hidden states, the
    canonical model's `last_hidden_state`."""
    import torch

    from vidport.reference.wan_official import cpu_attention, official_module

    clip = official_module("animate.clip")
    clip.flash_attention = cpu_attention
    hidden = config["hidden_size"]
    with torch.device("meta"):
        model = clip.VisionTransformer(
            image_size=config["image_size"], patch_size=config["patch_size"], dim=hidden,
            mlp_ratio=config["intermediate_size"] / hidden, out_dim=config["projection_dim"],
            num_heads=config["num_attention_heads"], num_layers=config["num_hidden_layers"], pool_type="token",
            pre_norm=True, post_norm=False, activation=config["hidden_act"], norm_eps=config["layer_norm_eps"])
    visual = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
    model = load_strict(model, visual, "wan/modules/animate/clip.py VisionTransformer")

    def run(probe: Probe, args: list, kwargs: dict) -> Any:
        return model(args[0])

    return Official(model, "official:wan22 wan/modules/animate/clip.py XLMRobertaCLIP.visual", run)
