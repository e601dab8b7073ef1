"""How to exercise the CLIP text encoder: the whole model on seeded token ids, each sequence
closed by the end-of-text token where the vocabulary holds it (so the pooled output is real)."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None, batch: int = 2) -> list[Probe]:
    """`frames` means nothing to a text encoder; the probe is a batch of `batch` prompts."""
    vocab = config.get("vocab_size", 49408)
    length = min(77, config.get("max_position_embeddings", 77))
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, vocab, (batch, length), dtype=np.int64)
    eos = config.get("eos_token_id", 49407)
    eos = vocab - 1 if eos == 2 else eos  # SD 1.x configs: end-of-text is the highest id
    if eos < vocab:
        input_ids[:, -1] = eos
    return [Probe("", [input_ids])]
