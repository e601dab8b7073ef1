"""Read a diffusers `UNet2DConditionModel` config into what the MLX UNet builds from, refusing
options the port does not implement (so a model is never silently built wrong)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vidport.converter.core.errors import VidportError

# Options that change the architecture or the numerics, and the one value the port implements.
FIXED: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1,
    "attention_type": "default",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "downsample_padding": 1,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def per_block(value: Any, count: int, name: str) -> list:
    values = [value] * count if isinstance(value, (int, float)) else list(value)
    if len(values) != count:
        raise VidportError(f"UNet config: {name} has {len(values)} entries for {count} blocks")
    return values


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_attention: tuple[bool, ...]  # per down block: CrossAttnDownBlock2D?
    up_attention: tuple[bool, ...]
    layers_per_block: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    heads: tuple[int, ...]  # attention heads per down block (diffusers' `attention_head_dim` in SD 1.x)
    cross_attention_dim: int
    groups: int
    eps: float
    flip_sin_to_cos: bool
    freq_shift: float
    linear_projection: bool = False  # diffusers' use_linear_projection: proj_in/proj_out are linears

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


def read_unet_config(config: dict[str, Any]) -> UNetConfig:
    """The diffusers config dict (as config.json holds it); unknown keys that do not change the
    computation (sample_size, upcast_attention, ...) are ignored."""
    missing = [k for k in ("block_out_channels", "down_block_types", "up_block_types") if k not in config]
    if missing:
        raise VidportError(f"UNet config lacks {', '.join(missing)}",
                           hint="an LDM file whose block layout matches no known variant; pass them with --set")
    wrong = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in FIXED.items() if k in config and config[k] != v]
    if wrong:
        raise VidportError(f"UNet config: option(s) the MLX UNet does not implement: {', '.join(wrong)}")
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    unknown = [t for t in down if t not in DOWN_BLOCKS] + [t for t in up if t not in UP_BLOCKS]
    if unknown:
        raise VidportError(f"UNet config: block type(s) {unknown} not implemented",
                           hint=f"supported: {', '.join([*DOWN_BLOCKS, *UP_BLOCKS])}")
    blocks = len(config["block_out_channels"])
    if len(down) != blocks or len(up) != blocks:
        raise VidportError(f"UNet config: {blocks} block_out_channels but {len(down)} down / {len(up)} up block types")
    cross = config.get("cross_attention_dim", 1280)
    if not isinstance(cross, int):
        raise VidportError("UNet config: a per-block cross_attention_dim is not implemented")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    return UNetConfig(
        in_channels=config.get("in_channels", 4), out_channels=config.get("out_channels", 4),
        block_out_channels=tuple(config["block_out_channels"]),
        down_attention=tuple(DOWN_BLOCKS[t] for t in down), up_attention=tuple(UP_BLOCKS[t] for t in up),
        layers_per_block=tuple(per_block(config.get("layers_per_block", 2), blocks, "layers_per_block")),
        transformer_layers=tuple(per_block(config.get("transformer_layers_per_block", 1), blocks,
                                           "transformer_layers_per_block")),
        heads=tuple(per_block(heads, blocks, "attention_head_dim")),
        cross_attention_dim=cross, groups=config.get("norm_num_groups", 32), eps=config.get("norm_eps", 1e-5),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True), freq_shift=config.get("freq_shift", 0),
        linear_projection=bool(config.get("use_linear_projection", False)),
    )
