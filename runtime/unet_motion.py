"""The SD 1.5 UNet with AnimateDiff motion modules in MLX, mirroring diffusers' `UNetMotionModel`
(`UNetMotionModel.from_unet2d(unet, motion_adapter)`) name for name.

Built from a UNet config and a MotionAdapter config, loaded from two converted folders (an
sd15-unet and an animatediff-motion MLX conversion): their parameter names already are the
combined model's. Whether the adapter fits the UNet is checked on the configs alone, before
any weight is read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx

from vidport.converter.core.errors import VidportError
from vidport.runtime.sd15_unet import UNet2DConditionModel
from vidport.runtime.motion_config import MotionConfig
from vidport.runtime.unet_blocks import Motion
from vidport.runtime.unet_config import UNetConfig, read_unet_config


def check_compatible(unet: UNetConfig, adapter: dict[str, Any] | MotionConfig) -> None:
    """A motion adapter fits a UNet when it has a motion module per resnet, at the same widths."""
    motion = adapter if isinstance(adapter, MotionConfig) else MotionConfig.read(adapter)
    channels = motion.block_out_channels
    ours = list(unet.block_out_channels)
    hint = "use a motion module made for this UNet (mm_sd_v15* / v3_sd15_mm for SD 1.5, mm_sdxl_* for SDXL)"
    if len(channels) != len(ours):
        raise VidportError(f"motion adapter has {len(channels)} blocks {channels}, the UNet {len(ours)} blocks {ours}"
                           + (" (an SDXL motion module on an SD 1.5 UNet?)" if len(channels) == 3 else ""), hint=hint)
    if channels != ours:
        raise VidportError(f"motion adapter widths {channels} differ from the UNet's {ours}", hint=hint)
    if motion.layers != list(unet.layers_per_block):
        raise VidportError(f"motion adapter has {motion.layers} motion modules per down block, the UNet "
                           f"{list(unet.layers_per_block)} resnets", hint=hint)
    if motion.groups != unet.groups:
        raise VidportError(f"motion adapter norm groups {motion.groups} differ from the "
                           f"UNet's {unet.groups}; diffusers' UNetMotionModel would use the UNet's")
    if motion.mid_layers not in (None, 1):
        raise VidportError("a motion mid block with more than one motion module does not fit the UNet's mid block")
    if motion.conv_in_channels:
        raise VidportError("motion adapters with conv_in (PIA / SparseCtrl) are not supported")


class UNetMotionModel(UNet2DConditionModel):
    """Frames are folded into the batch; each motion module attends along them.

    sample (batch, C, frames, H, W); encoder_hidden_states (batch*frames, tokens, dim), as
    diffusers' AnimateDiff pipelines repeat the prompt per frame; returns (batch, C, frames, H, W)."""

    def __init__(self, unet: UNetConfig, adapter: dict[str, Any]):
        motion = MotionConfig.read(adapter)
        check_compatible(unet, motion)
        groups, length = unet.groups, motion.max_seq_length
        blocks = [Motion(heads, layers, groups, length) for _, _, _, layers, heads in motion.down_blocks()]
        mid = motion.mid_block()
        super().__init__(unet, motion=blocks, mid_motion=Motion(mid[4], mid[3], groups, length) if mid else None)
        self.max_seq_length = length

    @classmethod
    def from_configs(cls, unet_config: dict[str, Any], adapter_config: dict[str, Any]) -> "UNetMotionModel":
        return cls(read_unet_config(unet_config), adapter_config)

    def __call__(self, sample: mx.array, timestep: Any, encoder_hidden_states: mx.array) -> mx.array:
        batch, channels, frames, height, width = sample.shape
        if frames > self.max_seq_length:
            raise VidportError(f"{frames} frames exceed the motion modules' {self.max_seq_length} positions")
        emb = mx.repeat(self.time_embed(timestep, batch), frames, axis=0)
        images = sample.transpose(0, 2, 3, 4, 1).reshape(batch * frames, height, width, channels)
        out = self.denoise(images.astype(self.dtype), emb, encoder_hidden_states.astype(self.dtype), num_frames=frames)
        return out.reshape(batch, frames, height, width, -1).transpose(0, 4, 1, 2, 3)


def load_unet_motion(unet_folder: str | Path, adapter_folder: str | Path) -> UNetMotionModel:
    """The motion UNet from an sd15-unet and an animatediff-motion MLX conversion (strict load)."""
    from vidport.converter.core.manifest import read_manifest
    from vidport.runtime.loading import load_weights, quantize_layers

    folders = {"sd15-unet": Path(unet_folder), "animatediff-motion": Path(adapter_folder)}
    manifests = {}
    for family, folder in folders.items():
        manifest = read_manifest(folder)
        if manifest["family"] != family or manifest["target"]["name"] != "mlx":
            raise VidportError(f"{folder}: a {manifest['family']} conversion for {manifest['target']['name']}, "
                               f"expected {family} for mlx")
        manifests[family] = manifest
    model = UNetMotionModel.from_configs(manifests["sd15-unet"]["config"], manifests["animatediff-motion"]["config"])
    weights = {}
    for family, folder in folders.items():  # each conversion's quantized layers, as its manifest records them
        own = load_weights(folder)
        quantize_layers(model, manifests[family], own, folder)
        weights.update(own)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as err:
        raise VidportError(f"{unet_folder} + {adapter_folder}: weights do not fit the motion UNet: {err}") from err
    model.eval()
    return model
