"""How to exercise the Gemma 3 text tower: the whole model on seeded token ids, a batch whose
second prompt is left-padded (LTX-2's tokenizer pads on the left), longer than the fixture's
sliding window so the window mask decides what the local layers see."""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.reference.probe import Probe


def probes(config: dict[str, Any], seed: int, frames: int | None = None, length: int = 12) -> list[Probe]:
    """`frames` means nothing to a text encoder; the probe is two prompts of `length` tokens, the
    second with its first third padding (the pad id, mask 0). Every hidden state is a module's
    output (embed_tokens, each layer, norm), so the per-layer comparison covers all that LTX-2 stacks."""
    rng = np.random.default_rng(seed)
    pad = config.get("pad_token_id", 0)
    input_ids = rng.integers(0, config.get("vocab_size", 262208), (2, length), dtype=np.int64)
    attention_mask = np.ones((2, length), dtype=np.int64)
    attention_mask[1, : length // 3] = 0
    input_ids[attention_mask == 0] = pad
    # no key/value cache: LTX-2 encodes once (the cache transformers would build stays unread)
    return [Probe("", [input_ids], {"attention_mask": attention_mask, "use_cache": False})]
