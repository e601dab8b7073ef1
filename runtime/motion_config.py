"""diffusers' MotionAdapter config, read once into per-block values (diffusers' defaults).

The MLX and TTNN motion adapters and the MLX motion UNet all build from it, so the reading of
`motion_*` keys (an int meaning "the same for every block", or one value per block) lives here
only. No MLX import: the TTNN emulator uses it too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# (name, channels, motion modules, transformer layers: an int or one per module, heads) of one block
Block = tuple[str, int, int, Any, int]


@dataclass(frozen=True)
class MotionConfig:
    block_out_channels: list[int]
    layers: list[int]  # motion modules per down block (an up block has one more)
    transformer_layers: list[Any]  # per block
    heads: list[int]
    groups: int
    max_seq_length: int
    mid_layers: int | None  # motion modules of the mid block; None: no motion mid block
    mid_transformer_layers: Any
    conv_in_channels: int | None

    @classmethod
    def read(cls, config: dict[str, Any]) -> "MotionConfig":
        channels = list(config["block_out_channels"])

        def per_block(key: str, default: Any) -> list:
            value = config.get(key, default)
            return [value] * len(channels) if isinstance(value, int) else list(value)

        return cls(block_out_channels=channels, layers=per_block("motion_layers_per_block", 2),
                   transformer_layers=per_block("motion_transformer_layers_per_block", 1),
                   heads=per_block("motion_num_attention_heads", 8), groups=config.get("motion_norm_num_groups", 32),
                   max_seq_length=config.get("motion_max_seq_length", 32),
                   mid_layers=config.get("motion_mid_block_layers_per_block", 1)
                   if config.get("use_motion_mid_block", True) else None,
                   mid_transformer_layers=config.get("motion_transformer_layers_per_mid_block", 1),
                   conv_in_channels=config.get("conv_in_channels"))

    def down_blocks(self) -> list[Block]:
        return [(f"down_blocks.{i}", c, self.layers[i], self.transformer_layers[i], self.heads[i])
                for i, c in enumerate(self.block_out_channels)]

    def mid_block(self) -> Block | None:
        if self.mid_layers is None:
            return None
        return ("mid_block", self.block_out_channels[-1], self.mid_layers, self.mid_transformer_layers, self.heads[-1])

    def up_blocks(self) -> list[Block]:
        """diffusers' up blocks run the widths in reverse, with one motion module more than down."""
        order = reversed(range(len(self.block_out_channels)))
        return [(f"up_blocks.{n}", self.block_out_channels[i], self.layers[i] + 1, self.transformer_layers[i],
                 self.heads[i]) for n, i in enumerate(order)]
