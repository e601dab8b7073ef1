"""How to exercise the UMT5 encoder: the whole model on seeded token ids, a batch whose second
prompt is padded (so the padding mask is exercised), long enough to reach the logarithmic
relative-position buckets."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.official import Official, load_strict
from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None, length: int = 40) -> list[Probe]:
    """`frames` means nothing to a text encoder; the probe is two prompts of `length` tokens,
    the second with its last third padding (token 0, mask 0), as Wan's tokenizer pads."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, config.get("vocab_size", 256384), (2, length), dtype=np.int64)
    attention_mask = np.ones((2, length), dtype=np.int64)
    attention_mask[1, length - length // 3:] = 0
    input_ids[attention_mask == 0] = 0
    return [Probe("", [input_ids], {"attention_mask": attention_mask})]


def official_encoder(state: dict[str, Any], config: dict[str, Any]) -> Official:
    """wan/modules/t5.py's encoder as `umt5_xxl(encoder_only=True)` builds it (a position table in
    every block), at the config's widths, the file's tensors loaded strictly as the official
    T5EncoderModel loads them; a probe's tokens and mask go to its forward(ids, mask)."""
    import torch

    from vidport.reference.wan_official import official_module

    model = official_module("t5").umt5_xxl(
        encoder_only=True, return_tokenizer=False, dtype=torch.float32, device="meta",
        vocab_size=config["vocab_size"], dim=config["d_model"], dim_attn=config["num_heads"] * config["d_kv"],
        dim_ffn=config["d_ff"], num_heads=config["num_heads"], encoder_layers=config["num_layers"],
        num_buckets=config["relative_attention_num_buckets"])
    model = load_strict(model, state, "wan/modules/t5.py T5Encoder")

    def run(probe: Probe, args: list, kwargs: dict) -> Any:
        return model(args[0], kwargs.get("attention_mask"))

    return Official(model, "official:wan22 wan/modules/t5.py T5Encoder (umt5_xxl)", run)
