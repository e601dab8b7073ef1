"""Wan's prompt encoding: clean the text, tokenize to a fixed length, run UMT5, and zero every
position past the prompt's own tokens (the DiT's cross-attention sees the zeros, as in diffusers'
WanPipeline and the official code, which pads the context to `text_len` with zeros).

The tokenizer is the pipeline folder's `tokenizer/tokenizer.json`, read with the `tokenizers`
library alone (no transformers needed at run time)."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from vidport.converter.core.errors import VidportError


def clean_prompt(text: str) -> str:
    """Unescape HTML (twice, for doubly escaped scrapes), fix mojibake when `ftfy` is installed,
    collapse whitespace: what the Wan pipelines do to a prompt before tokenizing."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class UMT5Tokenizer:
    """`tokenizer.json` padded and truncated to `max_length` with the end-of-sequence token kept,
    as a transformers fast tokenizer called with padding='max_length', truncation=True does."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.exists():
            raise VidportError(f"{folder}: no tokenizer.json; the runtime reads the fast-tokenizer file only",
                               hint="save the tokenizer with transformers (AutoTokenizer.from_pretrained(dir)"
                                    ".save_pretrained(dir)), or pass prompt embeddings (--prompt-embeds)")
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise VidportError("the `tokenizers` package is needed to encode prompts",
                               hint="pip install tokenizers, or pass prompt embeddings (--prompt-embeds)") from err
        self.tokenizer = Tokenizer.from_file(str(path))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        pad = _token_text(config.get("pad_token")) or "<pad>"
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise VidportError(f"{path}: the pad token {pad!r} is not in the vocabulary")
        self.pad, self.pad_id = pad, pad_id

    def __call__(self, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """-> token ids and attention mask, both (len(prompts), max_length) int64."""
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=self.pad)
        encoded = self.tokenizer.encode_batch(prompts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        return ids, mask


def encode_prompts(tokenizer: UMT5Tokenizer, text_encoder, prompts: list[str], max_length: int = 512) -> mx.array:
    """Prompts -> UMT5 states (len(prompts), max_length, d_model), zero past each prompt's tokens."""
    ids, mask = tokenizer([clean_prompt(p) for p in prompts], max_length)
    states = text_encoder(mx.array(ids), mx.array(mask))
    keep = mx.array((np.arange(max_length)[None, :] < mask.sum(axis=1, keepdims=True))[..., None])
    return mx.where(keep, states, mx.zeros_like(states))
