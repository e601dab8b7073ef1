"""How to exercise LTX-2's text connectors: the whole model on seeded stacked hidden states of
two prompts, the second left-padded as Gemma's tokenizer pads for LTX-2, so the masked
normalisation, the registers that replace padding and the returned mask are all exercised.

The original single file has no diffusers loader: its reference is ltx_core's own
EmbeddingsProcessor (the official LTX-2 code) built at the config's widths, the file's tensors
renamed by the official loader's own key operations and loaded strictly."""
from __future__ import annotations

from math import lcm
from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.reference.official import Official, load_strict
from vidport.reference.probe import Probe

OFFICIAL_NAME = "official:ltx-core text_encoders/gemma EmbeddingsProcessor (feature extractor + Embeddings1DConnector)"


def probe_length(config: dict[str, Any], frames: int | None = None) -> int:
    """Tokens per prompt: a multiple of both streams' register counts (each connector tiles its
    registers over the sequence), at least `frames` (default 8) when given."""
    step = lcm(config.get("video_connector_num_learnable_registers") or 1,
               config.get("audio_connector_num_learnable_registers") or 1)
    wanted = frames or 8
    return step * max(1, -(-wanted // step))


def probes(config: dict[str, Any], seed: int, frames: int | None = None) -> list[Probe]:
    """`frames` is the prompt length in tokens here (rounded up to the registers' multiple). Two
    prompts, one per probe (ltx_core's register replacement takes one prompt at a time): a full
    one, and one holding its last third of tokens only (left padding, mask 0 in front)."""
    length = probe_length(config, frames)
    width = config.get("caption_channels", 3840) * config.get("text_proj_in_factor", 49)
    rng = np.random.default_rng(seed)
    found = []
    for valid in (length, max(1, length // 3)):
        states = rng.standard_normal((1, length, width), dtype=np.float32)
        mask = np.zeros((1, length), dtype=np.int64)
        mask[:, length - valid:] = 1
        found.append(Probe("", [states, mask]))
    return found


def official_processor(config: dict[str, Any], device: str = "meta") -> Any:
    """ltx_core's EmbeddingsProcessor with the widths of a diffusers LTX2TextConnectors config
    (the official configurators fix Gemma 3 12B's widths, so the parts are built directly, as
    they do): FeatureExtractorV1 (one projection, LTX-2.0) or V2 (one per stream, LTX-2.3) and two
    Embeddings1DConnector; its forward is the official `process_hidden_states`."""
    import torch

    from ltx_core.model.transformer.rope import LTXRopeType
    from ltx_core.text_encoders.gemma.embeddings_connector import Embeddings1DConnector
    from ltx_core.text_encoders.gemma.embeddings_processor import EmbeddingsProcessor
    from ltx_core.text_encoders.gemma.feature_extractor import FeatureExtractorV1, FeatureExtractorV2

    class Processor(EmbeddingsProcessor):
        def forward(self, hidden_states: Any, attention_mask: Any, padding_side: str = "left") -> Any:
            return self.process_hidden_states(hidden_states, attention_mask, padding_side)

    caption = config["caption_channels"]
    width = caption * config["text_proj_in_factor"]

    def connector(stream: str) -> Embeddings1DConnector:
        return Embeddings1DConnector(
            attention_head_dim=config[f"{stream}_connector_attention_head_dim"],
            num_attention_heads=config[f"{stream}_connector_num_attention_heads"],
            num_layers=config[f"{stream}_connector_num_layers"],
            positional_embedding_theta=config["rope_theta"],
            positional_embedding_max_pos=[config["connector_rope_base_seq_len"]],
            num_learnable_registers=config[f"{stream}_connector_num_learnable_registers"],
            rope_type=LTXRopeType(config["rope_type"]), double_precision_rope=config["rope_double_precision"],
            apply_gated_attention=config[f"{stream}_gated_attn"])

    with torch.device(device):
        if config["per_modality_projections"]:
            bias = config["proj_bias"]
            extractor = FeatureExtractorV2(torch.nn.Linear(width, config["video_hidden_dim"], bias=bias), caption,
                                           torch.nn.Linear(width, config["audio_hidden_dim"], bias=bias))
        else:
            extractor = FeatureExtractorV1(torch.nn.Linear(width, caption, bias=config["proj_bias"]), is_av=True)
        return Processor(feature_extractor=extractor, video_connector=connector("video"),
                         audio_connector=connector("audio"))


def official_state(state: dict[str, Any]) -> dict[str, Any]:
    """The file's tensors under the official model's names, through the official loader's own
    EMBEDDINGS_PROCESSOR_KEY_OPS (keys it does not select belong to other models)."""
    from ltx_core.text_encoders.gemma.encoders.encoder_configurator import EMBEDDINGS_PROCESSOR_KEY_OPS

    renamed = {}
    for key, value in state.items():
        name = EMBEDDINGS_PROCESSOR_KEY_OPS.apply_to_key(key)
        if name is not None:
            renamed[name] = value
    return renamed


def official_connectors(state: dict[str, Any], config: dict[str, Any]) -> Official:
    """The reference of the original file: `official_processor` with the file's tensors loaded
    strictly; a probe's stacked states [B, T, C * L] go in as the official [B, T, C, L]."""
    model = load_strict(official_processor(config), official_state(state), "ltx_core EmbeddingsProcessor")
    caption = config["caption_channels"]

    def run(probe: Probe, args: list, kwargs: dict) -> Any:
        if probe.module or probe.method:
            raise VidportError("the official LTX-2 connectors run whole-model probes only")
        states = args[0]
        if states.ndim == 3:
            states = states.unflatten(2, (caption, -1))
        return model(states, *args[1:], **kwargs)

    return Official(model, OFFICIAL_NAME, run)
