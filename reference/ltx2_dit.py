"""How to exercise an LTX-2 DiT: the whole transformer on seeded video and audio tokens, as one
denoising step of the audio-video pipeline.

The video is 3 latent frames of 2 x 3 patches (a non-square grid over several frames, so a
frame/row/column mix-up in the RoPE shows) at 24 fps; the audio 7 latent frames. Timesteps are
integers (sigma * 1000 as the pipeline passes them; a bfloat16 port would round a fraction) and
differ between the streams, so the cross-modal modulation depends on `use_cross_timestep`, which
the probe passes as the manifest's config records it (the detected version's). The text is
padded: its attention mask hides the last tokens, as the pipeline's prompt mask does.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vidport.converter.core.errors import VidportError
from vidport.reference.official import Official, load_strict
from vidport.reference.probe import Probe

TEXT_TOKENS = 16
FRAMES, HEIGHT, WIDTH = 3, 2, 3
AUDIO_FRAMES = 7


def probes(config: dict[str, Any], seed: int, frames: int | None = None) -> list[Probe]:
    rng = np.random.default_rng(seed)
    frames = frames or FRAMES
    video_tokens = frames * HEIGHT * WIDTH
    caption = config["caption_channels"] if config.get("use_prompt_embeddings", True) else None
    text_width = caption or config["cross_attention_dim"]
    audio_text_width = caption or config["audio_cross_attention_dim"]
    mask = np.ones((1, TEXT_TOKENS), dtype=np.float32)
    mask[:, -5:] = 0
    timestep, audio_timestep = rng.integers(1, 1000, size=(1,)), rng.integers(1, 1000, size=(1,))
    inputs: dict[str, Any] = {
        "hidden_states": rng.standard_normal((1, video_tokens, config["in_channels"]), dtype=np.float32),
        "audio_hidden_states": rng.standard_normal((1, AUDIO_FRAMES, config["audio_in_channels"]), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS, text_width), dtype=np.float32),
        "audio_encoder_hidden_states": rng.standard_normal((1, TEXT_TOKENS, audio_text_width), dtype=np.float32),
        "timestep": timestep, "audio_timestep": audio_timestep, "sigma": timestep, "audio_sigma": audio_timestep,
        "encoder_attention_mask": mask, "audio_encoder_attention_mask": mask,
        "num_frames": frames, "height": HEIGHT, "width": WIDTH, "fps": 24.0, "audio_num_frames": AUDIO_FRAMES,
        "use_cross_timestep": bool(config.get("use_cross_timestep", False)),
    }
    return [Probe("", [], inputs)]


# ltx_core's LTXModelConfigurator checks these values of the file's transformer config (the
# single file's safetensors metadata carries it); every LTX-2 release has them.
_OFFICIAL_FIXED = {"dropout": 0.0, "attention_bias": True, "activation_fn": "gelu-approximate",
                   "num_embeds_ada_norm": 1000, "use_linear_projection": False, "only_cross_attention": False,
                   "cross_attention_norm": True, "double_self_attention": False, "upcast_attention": False,
                   "standardization_norm": "rms_norm", "norm_elementwise_affine": False, "qk_norm": "rms_norm",
                   "positional_embedding_type": "rope", "use_audio_video_cross_attention": True,
                   "share_ff": False, "av_cross_ada_norm": True, "use_middle_indices_grid": True}
OFFICIAL_NAME = "official:ltx_core ltx_core/model/transformer/model.py LTXModel"
CONNECTORS = ("video_embeddings_connector.", "audio_embeddings_connector.")


def official_config(config: dict[str, Any]) -> dict[str, Any]:
    """The `transformer` section of an original file's config (what ltx_core builds LTXModel from)
    for a diffusers config of the same model."""
    if config.get("gated_attn") != config.get("audio_gated_attn") or \
            config.get("cross_attn_mod") != config.get("audio_cross_attn_mod"):
        raise ValueError("ltx_core gates and modulates both streams alike")
    return {**_OFFICIAL_FIXED,
            "num_attention_heads": config["num_attention_heads"], "attention_head_dim": config["attention_head_dim"],
            "in_channels": config["in_channels"], "out_channels": config["out_channels"],
            "num_layers": config["num_layers"], "cross_attention_dim": config["cross_attention_dim"],
            "norm_eps": config.get("norm_eps", 1e-6), "positional_embedding_theta": config.get("rope_theta", 10000.0),
            "positional_embedding_max_pos": [config.get("pos_embed_max_pos", 20), config.get("base_height", 2048),
                                             config.get("base_width", 2048)],
            "timestep_scale_multiplier": config.get("timestep_scale_multiplier", 1000),
            "audio_num_attention_heads": config["audio_num_attention_heads"],
            "audio_attention_head_dim": config["audio_attention_head_dim"],
            "audio_in_channels": config["audio_in_channels"], "audio_out_channels": config["audio_out_channels"],
            "audio_cross_attention_dim": config["audio_cross_attention_dim"],
            "audio_positional_embedding_max_pos": [config.get("audio_pos_embed_max_pos", 20)],
            "av_ca_timestep_scale_multiplier": config.get("cross_attn_timestep_scale_multiplier", 1000),
            "rope_type": config.get("rope_type", "interleaved"),
            "frequencies_precision": "float64" if config.get("rope_double_precision", True) else "float32",
            "apply_gated_attention": bool(config.get("gated_attn")),
            "cross_attention_adaln": bool(config.get("cross_attn_mod")),
            "caption_channels": config.get("caption_channels", 3840),
            "caption_proj_before_connector": not config.get("use_prompt_embeddings", True)}


def official_state(state: dict[str, Any]) -> dict[str, Any]:
    """The DiT's tensors of a single file as ltx_core's loader takes them: the `model.diffusion_model.`
    sub-tree (the whole file if nothing has the prefix) without the text connectors, which share
    the prefix and which LTXModel does not hold (its loader skips them)."""
    prefix = "model.diffusion_model."
    if any(key.startswith(prefix) for key in state):
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return {key: value for key, value in state.items() if not key.startswith(CONNECTORS)}


def official_ltx2(state: dict[str, Any], config: dict[str, Any]) -> Official:
    """ltx_core's LTXModel (the audio-video configurator) with the file's tensors loaded strictly; a
    probe runs as the official pipeline calls it: per-token timesteps and sigmas in [0, 1], the
    patch coordinates from ltx_core's own patchifiers (pixel bounds, time in seconds)."""
    import torch
    from ltx_core.model.transformer.model_configurator import LTXModelConfigurator

    with torch.device("meta"):
        model = LTXModelConfigurator.from_config({"transformer": official_config(config)})
    model = load_strict(model, official_state(state), OFFICIAL_NAME)
    multiplier = config.get("timestep_scale_multiplier", 1000)

    def run(probe: Probe, args: list, kwargs: dict) -> Any:
        from ltx_core.guidance.perturbations import BatchedPerturbationConfig
        from ltx_core.model.transformer.modality import Modality

        if not kwargs.get("use_cross_timestep", True):
            raise VidportError("ltx_core modulates the cross-modal attention by the other stream's sigma "
                               "(use_cross_timestep=True) only")
        video_positions, audio_positions = official_positions(kwargs, config)

        def modality(latent, timestep, sigma, positions, context, mask) -> Any:
            mask = None if mask is None else mask.long()  # ltx_core takes a float mask as an additive bias
            # one timestep per sample ([B, 1]: ltx_core broadcasts it over the tokens) or per token
            timesteps = (timestep.float() / multiplier).reshape(latent.shape[0], -1)
            return Modality(latent=latent, sigma=sigma.float().reshape(-1) / multiplier, timesteps=timesteps,
                            positions=positions, context=context, context_mask=mask)

        video = modality(kwargs["hidden_states"], kwargs["timestep"], kwargs["sigma"], video_positions,
                         kwargs["encoder_hidden_states"], kwargs.get("encoder_attention_mask"))
        audio = modality(kwargs["audio_hidden_states"], kwargs["audio_timestep"], kwargs["audio_sigma"],
                         audio_positions, kwargs["audio_encoder_hidden_states"],
                         kwargs.get("audio_encoder_attention_mask"))
        return model(video, audio, BatchedPerturbationConfig.empty(video.latent.shape[0]))

    return Official(model, OFFICIAL_NAME, run)


def official_positions(kwargs: dict[str, Any], config: dict[str, Any]) -> tuple[Any, Any]:
    """The video and audio patch bounds as ltx_core's latent tools make them."""
    from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier, get_pixel_coords
    from ltx_core.types import AudioLatentShape, VideoLatentShape

    batch = kwargs["hidden_states"].shape[0]
    shape = VideoLatentShape(batch=batch, channels=config["in_channels"], frames=kwargs["num_frames"],
                             height=kwargs["height"], width=kwargs["width"])
    video = get_pixel_coords(VideoLatentPatchifier(1).get_patch_grid_bounds(shape),
                             tuple(config.get("vae_scale_factors", (8, 32, 32))), causal_fix=True).float()
    video[:, 0] = video[:, 0] / kwargs.get("fps", 24.0)
    audio_shape = AudioLatentShape(batch=batch, channels=config["audio_in_channels"],
                                   frames=kwargs["audio_num_frames"], mel_bins=1)
    audio = AudioPatchifier(1, sample_rate=config.get("audio_sampling_rate", 16000),
                            hop_length=config.get("audio_hop_length", 160),
                            audio_latent_downsample_factor=config.get("audio_scale_factor", 4)
                            ).get_patch_grid_bounds(audio_shape)
    return video, audio
