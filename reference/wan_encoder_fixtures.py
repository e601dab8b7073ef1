"""Small checkpoints of Wan's text encoder (umt5) and image encoder (open-clip ViT-H/14 visual
tower) in their real source formats, made with the code that defines each format: the official
Wan modules for the native `.pth` files, transformers for the Diffusers folders. Real key
layout, small widths, random weights; nothing is downloaded."""
from __future__ import annotations

from pathlib import Path
from typing import Any

# umt5-xxl at small widths: same structure (gated-GELU, 32 buckets, max distance 128, a position
# table per layer), d_model 64 instead of 4096.
UMT5_SMALL: dict[str, Any] = {"vocab_size": 512, "d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128,
                              "num_layers": 2, "relative_attention_num_buckets": 32,
                              "relative_attention_max_distance": 128}

# ViT-H/14 at small widths: 14-pixel patches and 80-wide heads kept, 2 heads instead of 16.
CLIP_VISION_SMALL: dict[str, Any] = {"hidden_size": 160, "intermediate_size": 640, "num_hidden_layers": 3,
                                     "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                                     "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 32}


def _perturb_norms(model, seed: int) -> None:
    """Norm scales (and biases) away from their 1 / 0 initialisation, so a swapped or skipped
    norm shows in the comparison."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.1 * torch.randn(param.shape, generator=generator))


# ---------------------------------------------------------------- umt5


def _widen_position_tables(model, seed: int) -> None:
    """Relative-position tables at unit scale (trained ones span several units; the init's
    0.06 would let a port that shares one table across layers pass unnoticed)."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pos_embedding" in name or "relative_attention_bias" in name:
                param.copy_(torch.randn(param.shape, generator=generator))


def official_umt5_encoder(config: dict[str, Any] = UMT5_SMALL, seed: int = 0):
    """wan/modules/t5.py's T5Encoder as umt5_xxl builds it (shared_pos=False), at `config`'s widths."""
    import torch

    from vidport.reference.wan_official import official_module

    torch.manual_seed(seed)
    model = official_module("t5").T5Encoder(
        vocab=config["vocab_size"], dim=config["d_model"], dim_attn=config["num_heads"] * config["d_kv"],
        dim_ffn=config["d_ff"], num_heads=config["num_heads"], num_layers=config["num_layers"],
        num_buckets=config["relative_attention_num_buckets"], shared_pos=False)
    _perturb_norms(model, seed)
    _widen_position_tables(model, seed)
    return model.eval()


def write_native_umt5(path: Path, seed: int = 0, dtype: str = "bfloat16") -> dict[str, Any]:
    """models_t5_umt5-xxl-enc-bf16.pth's layout: the T5Encoder state dict, bfloat16, torch zip."""
    import torch

    model = official_umt5_encoder(UMT5_SMALL, seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(getattr(torch, dtype)) for k, v in model.state_dict().items()}, path)
    return dict(UMT5_SMALL)


def write_diffusers_umt5(folder: Path, seed: int = 0) -> dict[str, Any]:
    """A Diffusers Wan pipeline's text_encoder/: transformers' UMT5EncoderModel.save_pretrained."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**UMT5_SMALL, feed_forward_proj="gated-gelu"))
    _perturb_norms(model, seed)
    _widen_position_tables(model, seed)
    model.save_pretrained(str(folder))
    return dict(UMT5_SMALL)


# ---------------------------------------------------------------- clip vision


def official_clip(config: dict[str, Any] = CLIP_VISION_SMALL, seed: int = 0):
    """wan/modules/clip.py's XLMRobertaCLIP as clip_xlm_roberta_vit_h_14 builds it, at small widths
    (a small text tower too: the native file holds both towers)."""
    import torch

    from vidport.reference.wan_official import official_module

    torch.manual_seed(seed)
    hidden = config["hidden_size"]
    model = official_module("animate.clip").XLMRobertaCLIP(
        embed_dim=config["projection_dim"], image_size=config["image_size"], patch_size=config["patch_size"],
        vision_dim=hidden, vision_mlp_ratio=config["intermediate_size"] // hidden,
        vision_heads=config["num_attention_heads"], vision_layers=config["num_hidden_layers"],
        vision_pool="token", activation="gelu", vocab_size=64, max_text_len=16, type_size=1, pad_id=1,
        text_dim=32, text_heads=2, text_layers=1, text_post_norm=True, text_dropout=0.1)
    _perturb_norms(model, seed)
    return model.eval()


def write_native_clip(path: Path, seed: int = 0) -> dict[str, Any]:
    """models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth's layout: the whole XLMRobertaCLIP
    state dict (visual and textual towers, log_scale), torch zip."""
    import torch

    model = official_clip(CLIP_VISION_SMALL, seed)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return dict(CLIP_VISION_SMALL)


def write_diffusers_clip_vision(folder: Path, seed: int = 0, transformers4_keys: bool = False) -> dict[str, Any]:
    """A Diffusers Wan I2V pipeline's image_encoder/: CLIPVisionModel.save_pretrained. With
    `transformers4_keys`, every key carries `vision_model.`, as in the published folders (written
    by transformers 4)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION_SMALL))
    _perturb_norms(model, seed)
    model.save_pretrained(str(folder))
    if transformers4_keys:
        weights = Path(folder) / "model.safetensors"
        state = load_file(str(weights))
        save_file({f"vision_model.{k}": v for k, v in state.items()}, str(weights), metadata={"format": "pt"})
    return dict(CLIP_VISION_SMALL)
