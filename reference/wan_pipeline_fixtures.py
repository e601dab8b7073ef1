"""Small Wan Diffusers pipeline folders (what `Wan-AI/Wan2.x-*-Diffusers` repos hold, at small
widths, random weights), written by diffusers' own `save_pretrained`: nothing is downloaded.

Kinds: `t2v` (Wan 2.1 T2V), `i2v` (Wan 2.1 I2V: CLIP image encoder + 36-channel DiT), `ti2v`
(Wan 2.2 TI2V 5B: the 2.2 VAE, 48 latent channels, `expand_timesteps`), `a14b` (Wan 2.2 T2V
A14B: two experts and a `boundary_ratio`), `i2v-a14b` (Wan 2.2 I2V A14B: two 36-channel experts,
no CLIP image branch). The tokenizer is a tiny Unigram model built with
`tokenizers` in the layout of google/umt5-xxl's `tokenizer.json` (Metaspace, `</s>` appended).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vidport.reference.wan_dit_fixtures import random_wan_transformer, wan_config
from vidport.reference.wan_encoder_fixtures import UMT5_SMALL, _perturb_norms, _widen_position_tables
from vidport.reference.wan_vae_fixtures import randomize, wan_vae_config

WORDS = ("a cat dog sits runs on the red blue green mat in field under sky sun walks slowly fast video of "
         "bright dark low quality blurry static frame worst").split()
TEXT_DIM = UMT5_SMALL["d_model"]
CLIP_SMALL: dict[str, Any] = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                              "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "hidden_act": "gelu",
                              "layer_norm_eps": 1e-5, "projection_dim": 16}
KINDS = ("t2v", "i2v", "ti2v", "a14b", "i2v-a14b")


def tiny_tokenizer():
    """A transformers fast tokenizer around a small Unigram vocabulary (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -2.0 - i / 100) for i, w in enumerate(WORDS)]
    pieces += [(c, -8.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz,.!?'0123456789"]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _text_encoder(seed: int):
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    model = UMT5EncoderModel(UMT5Config(**UMT5_SMALL, feed_forward_proj="gated-gelu"))
    _perturb_norms(model, seed)
    _widen_position_tables(model, seed)
    return model.eval()


def _image_encoder(seed: int):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**CLIP_SMALL))
    _perturb_norms(model, seed)
    side = CLIP_SMALL["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return model.eval(), processor


def _vae(version: str, seed: int):
    """The small VAE with per-channel latent statistics (a pipeline normalizes latents by them)."""
    import numpy as np
    from diffusers import AutoencoderKLWan

    z_dim = wan_vae_config(version)["z_dim"]
    rng = np.random.default_rng(seed)
    stats = {"latents_mean": [round(float(v), 4) for v in rng.normal(0, 0.3, z_dim)],
             "latents_std": [round(float(v), 4) for v in rng.uniform(0.5, 2.0, z_dim)]}
    return randomize(AutoencoderKLWan(**wan_vae_config(version, **stats)), seed)


def _scheduler(name: str, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "unipc":  # what the Wan 2.1 / 2.2 Diffusers repos ship
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                       num_train_timesteps=1000)
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def build_pipeline(kind: str, seed: int = 0, scheduler: str = "unipc", boundary_ratio: float = 0.875):
    """The diffusers pipeline object of `kind`, small random components."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    variant = {"t2v": "t2v", "a14b": "t2v", "i2v": "i2v", "ti2v": "ti2v", "i2v-a14b": "i2v-a14b"}[kind]
    extra = {"image_dim": CLIP_SMALL["hidden_size"]} if kind == "i2v" else {}
    config = wan_config(variant, text_dim=TEXT_DIM, **extra)
    common = {"tokenizer": tiny_tokenizer(), "text_encoder": _text_encoder(seed + 1),
              "vae": _vae("2.2" if kind == "ti2v" else "2.1", seed + 2),
              "scheduler": _scheduler(scheduler, 5.0 if kind == "ti2v" else 3.0),
              "transformer": random_wan_transformer(config, seed + 3)}
    if kind == "i2v":
        encoder, processor = _image_encoder(seed + 4)
        return WanImageToVideoPipeline(**common, image_encoder=encoder, image_processor=processor)
    if kind in ("a14b", "i2v-a14b"):
        cls = WanPipeline if kind == "a14b" else WanImageToVideoPipeline
        return cls(**common, transformer_2=random_wan_transformer(config, seed + 5), boundary_ratio=boundary_ratio)
    return WanPipeline(**common, expand_timesteps=kind == "ti2v")


def write_wan_pipeline(folder: Path, kind: str = "t2v", seed: int = 0, scheduler: str = "unipc",
                       boundary_ratio: float = 0.875) -> Path:
    """A Diffusers Wan pipeline folder (model_index.json + one folder per component)."""
    folder = Path(folder)
    build_pipeline(kind, seed, scheduler, boundary_ratio).save_pretrained(str(folder), safe_serialization=True)
    return folder


def model_index(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "model_index.json").read_text())
