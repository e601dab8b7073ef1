"""How to exercise the UMT5 encoder: the whole model on seeded token ids, a batch whose second
prompt is padded (so the padding mask is exercised), long enough to reach the logarithmic
relative-position buckets."""
from __future__ import annotations

from typing import Any

import numpy as np

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
