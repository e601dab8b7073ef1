"""Small checkpoints in the real source formats (real key layout, small widths, random weights),
made with the reference library itself, for tests and the demo: nothing is downloaded."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# The AnimateDiff releases at small widths: same block structure, fewer channels.
MOTION_VARIANTS: dict[str, dict[str, Any]] = {
    "v1": {"block_out_channels": [32, 64, 64, 64], "use_motion_mid_block": False, "motion_max_seq_length": 24},
    "v2": {"block_out_channels": [32, 64, 64, 64], "use_motion_mid_block": True, "motion_max_seq_length": 32},
    "v3": {"block_out_channels": [32, 64, 64, 64], "use_motion_mid_block": False, "motion_max_seq_length": 32},
    "sdxl-beta": {"block_out_channels": [32, 64, 64], "use_motion_mid_block": False, "motion_max_seq_length": 32},
}

# diffusers names -> the original AnimateDiff names (the inverse of what diffusers' loader does)
_TO_ORIGINAL = [
    (r"\.motion_modules\.(\d+)\.", r".motion_modules.\1.temporal_transformer."),
    (r"\.norm1\.", ".norms.0."),
    (r"\.norm2\.", ".norms.1."),
    (r"\.norm3\.", ".ff_norm."),
    (r"\.attn1\.", ".attention_blocks.0."),
    (r"\.attn2\.", ".attention_blocks.1."),
]


def motion_adapter_config(variant: str, **overrides: Any) -> dict[str, Any]:
    return {"motion_layers_per_block": 2, "motion_num_attention_heads": 8, "motion_norm_num_groups": 32,
            **MOTION_VARIANTS[variant], **overrides}


def random_motion_adapter(config: dict[str, Any], seed: int = 0):
    """A diffusers MotionAdapter with random weights of unit-ish scale (proj_out is not zero)."""
    import torch
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    model = MotionAdapter(**config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 1:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif param.ndim == 1:
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / param.shape[1] ** 0.5)
    return model.eval()


def original_motion_state_dict(model) -> dict[str, Any]:
    """The model's weights under the original AnimateDiff key names, pos_encoder tables included."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(".pos_embed.pe"):
            base = key[: -len("pos_embed.pe")]
            for a in (0, 1):
                original = _rename(base + f"attn{a + 1}.pos_encoder.pe")
                state[original] = value.clone()
            continue
        state[_rename(key)] = value.clone()
    return state


def _rename(key: str) -> str:
    for pattern, replacement in _TO_ORIGINAL:
        key = re.sub(pattern, replacement, key)
    return key


def write_original_motion_module(path: Path, variant: str = "v2", seed: int = 0, fmt: str = "zip",
                                 wrap: bool = False) -> dict[str, Any]:
    """Write an original-layout motion module (.ckpt zip or legacy, or .safetensors); returns its config.

    `wrap` nests it under `state_dict` beside training entries, as some releases do."""
    import torch

    config = motion_adapter_config(variant)
    state = original_motion_state_dict(random_motion_adapter(config, seed))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        payload: Any = {"state_dict": state, "global_step": 1000, "epoch": 3} if wrap else state
        torch.save(payload, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return config


def write_diffusers_motion_adapter(folder: Path, variant: str = "v2", seed: int = 0) -> dict[str, Any]:
    config = motion_adapter_config(variant)
    random_motion_adapter(config, seed).save_pretrained(str(folder))
    return config


def write_config_folder(folder: Path, class_name: str, config: dict[str, Any]) -> Path:
    """A local config folder for `from_single_file(..., config=folder)`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **config}))
    return folder


# ---------------------------------------------------------------- SD 1.5 UNet (sd15-unet)
# The LDM single file itself comes from vidport.reference.sd_fixtures (UNet, VAE and CLIP in one file).


def sd15_unet(seed: int = 0):
    """The small SD 1.5 UNet that `sd_fixtures.write_sd_single_file(seed=seed)` holds."""
    from diffusers import UNet2DConditionModel

    from vidport.reference.sd_fixtures import SD_UNET_CONFIG, randomize

    return randomize(UNet2DConditionModel(**SD_UNET_CONFIG), seed + 2)


def write_sd15_unet_folder(folder: Path, seed: int = 0) -> Path:
    """A Diffusers `unet/` folder (config.json + diffusion_pytorch_model.safetensors)."""
    sd15_unet(seed).save_pretrained(str(folder))
    return Path(folder)


def write_sd15_single_file_with_ema(path: Path, seed: int = 0, fmt: str = "ckpt", ema_seed: int = 100) -> Path:
    """A `v1-5-pruned.ckpt`-like file: the single file plus LitEma copies of the UNet
    (`model_ema.` + the key under `model.` without dots), taken from another random UNet so
    that converting the wrong set shows."""
    from vidport.reference.sd_fixtures import ldm_unet_state_dict, save_state, sd_components, sd_single_file_state

    state = sd_single_file_state(*sd_components(seed))
    ema = ldm_unet_state_dict(sd15_unet(ema_seed))
    state.update({"model_ema." + f"diffusion_model.{k}".replace(".", ""): v for k, v in ema.items()})
    return save_state(path, state, fmt)
