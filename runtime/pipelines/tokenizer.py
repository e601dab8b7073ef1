"""The prompt tokenizer of a pipeline folder, offline: transformers' CLIPTokenizer where transformers
is installed, else the `tokenizers` library on the folder's tokenizer.json. Either way a prompt
becomes `model_max_length` ids, truncated and padded as diffusers' pipelines ask
(`padding="max_length", truncation=True`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vidport.converter.core.errors import VidportError


class PromptTokenizer:
    """texts -> (batch, max_length) int32 token ids."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise VidportError(f"{self.folder}: no tokenizer folder",
                               hint="convert the pipeline with --tokenizer DIR (a CLIP tokenizer folder)")
        settings = self.folder / "tokenizer_config.json"
        config = json.loads(settings.read_text()) if settings.exists() else {}
        self.max_length = int(config.get("model_max_length", 77))
        if self.max_length > 10_000:  # transformers' "unset" sentinel: CLIP's context length
            self.max_length = 77
        self._encode = self._transformers() or self._tokenizers(config)

    def _transformers(self):
        try:
            from transformers import CLIPTokenizer
        except ImportError:
            return None
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as err:
            raise VidportError(f"{self.folder}: not a CLIP tokenizer folder ({err})") from err
        self.max_length = tokenizer.model_max_length if tokenizer.model_max_length < 10_000 else self.max_length

        def encode(texts: list[str]) -> np.ndarray:
            ids = tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True).input_ids
            return np.asarray(ids, dtype=np.int32)

        return encode

    def _tokenizers(self, config: dict):
        path = self.folder / "tokenizer.json"
        if not path.exists():
            raise VidportError(f"{self.folder}: without transformers the tokenizer needs a tokenizer.json",
                               hint="pip install transformers, or convert with a tokenizer folder holding tokenizer.json")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        pad = tokenizer.token_to_id(config.get("pad_token") or "<|endoftext|>")
        tokenizer.enable_truncation(self.max_length)
        tokenizer.enable_padding(length=self.max_length, pad_id=pad if pad is not None else 0)

        def encode(texts: list[str]) -> np.ndarray:
            return np.asarray([e.ids for e in tokenizer.encode_batch(texts)], dtype=np.int32)

        return encode

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        return self._encode([texts] if isinstance(texts, str) else list(texts))
