"""The Wan VAE's blocks in MLX, named as in diffusers' autoencoder_kl_wan: residual block,
resample (2-D up/down with a causal time convolution), per-frame attention, mid block, and the
Wan 2.1 / 2.2 level blocks. Video is (B, T, H, W, C); every cached convolution takes the
feature cache in diffusers' order, so one chunk of the port equals one chunk of diffusers."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from vidport.runtime.layers import Conv2d, Dropout, SiLU, attention, upsample2x_conv3x3
from vidport.runtime.wan_vae_conv import CACHE_T, BandedConv2d, Cache, WanCausalConv3d, cached_conv, own_copy
from vidport.runtime.wan_vae_layers import AvgDown3D, DupUp3D, Identity, Sequential, WanRMSNorm, WanUpsample, ZeroPad2d


class WanResidualBlock(nn.Module):
    """norm, SiLU, causal conv, norm, SiLU, dropout, causal conv; plus a 1x1x1 shortcut when the
    width changes."""

    channels_last = True

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.nonlinearity = SiLU()
        self.norm1 = WanRMSNorm(in_dim)
        self.conv1 = WanCausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = WanRMSNorm(out_dim)
        self.dropout = Dropout(0.0)
        self.conv2 = WanCausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = WanCausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else Identity()

    def __call__(self, x: mx.array, feat_cache: Cache | None = None, feat_idx: list[int] | None = None) -> mx.array:
        h = self.conv_shortcut(x)
        x = cached_conv(self.conv1, self.nonlinearity(self.norm1(x)), feat_cache, feat_idx)
        x = self.dropout(self.nonlinearity(self.norm2(x)))
        return cached_conv(self.conv2, x, feat_cache, feat_idx) + h


class WanAttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, with a residual."""

    channels_last = True

    def __init__(self, dim: int):
        super().__init__()
        self.norm = WanRMSNorm(dim)
        self.to_qkv = Conv2d(dim, dim * 3, 1)
        self.proj = Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        b, t, h, w, c = x.shape
        frames = self.to_qkv(self.norm(x.reshape(b * t, h, w, c)))
        q, k, v = mx.split(frames.reshape(b * t, 1, h * w, 3 * c), 3, axis=-1)
        out = attention(q, k, v, c**-0.5)
        return self.proj(out.reshape(b * t, h, w, c)).reshape(b, t, h, w, c) + x


class WanResample(nn.Module):
    """2x spatial up/downsampling per frame; the 3-D modes also double (upsample3d) or halve
    (downsample3d) time with a causal time convolution that runs only under the cache, as in
    diffusers: the first chunk passes through unchanged and marks or fills its cache entry."""

    channels_last = True

    def __init__(self, dim: int, mode: str, upsample_out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        out = dim // 2 if upsample_out_dim is None else upsample_out_dim
        if mode in ("upsample2d", "upsample3d"):
            self.resample = Sequential(WanUpsample(), BandedConv2d(dim, out, 3, padding=1))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = Sequential(ZeroPad2d(), BandedConv2d(dim, dim, 3, stride=2))
        else:
            self.resample = Identity()
        if mode == "upsample3d":
            self.time_conv = WanCausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = WanCausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def __call__(self, x: mx.array, feat_cache: Cache | None = None, feat_idx: list[int] | None = None) -> mx.array:
        if self.mode == "upsample3d" and feat_cache is not None:
            x = self._double_time(x, feat_cache, feat_idx)
        b, t, h, w, c = x.shape
        frames = x.reshape(b * t, h, w, c)
        if self.mode in ("upsample2d", "upsample3d"):  # resample = (nearest x2, 3x3 conv), on the small map
            conv = self.resample[1]
            x = upsample2x_conv3x3(frames, conv.weight, conv.get("bias"))
        else:
            x = self.resample(frames)
        x = x.reshape(b, t, *x.shape[1:])
        if self.mode == "downsample3d" and feat_cache is not None:
            x = self._halve_time(x, feat_cache, feat_idx)
        return x

    def _double_time(self, x: mx.array, feat_cache: Cache, feat_idx: list[int]) -> mx.array:
        idx = feat_idx[0]
        previous = feat_cache[idx]
        feat_idx[0] += 1
        if previous is None:  # the first chunk: one frame stays one frame ("Rep")
            feat_cache[idx] = "Rep"
            return x
        keep = x[:, -CACHE_T:]
        if keep.shape[1] < CACHE_T:
            before = mx.zeros_like(keep) if isinstance(previous, str) else previous[:, -1:].astype(keep.dtype)
            keep = mx.concatenate([before, keep], axis=1)
        x = self.time_conv(x) if isinstance(previous, str) else self.time_conv(x, previous)
        feat_cache[idx] = own_copy(keep)
        b, t, h, w, c2 = x.shape  # channels [0:c] become frame 2t, [c:2c] frame 2t+1
        return x.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, t * 2, h, w, c2 // 2)

    def _halve_time(self, x: mx.array, feat_cache: Cache, feat_idx: list[int]) -> mx.array:
        idx = feat_idx[0]
        previous = feat_cache[idx]
        feat_idx[0] += 1
        feat_cache[idx] = x if previous is None else own_copy(x[:, -1:])
        if previous is None:  # the first chunk: its one frame passes through
            return x
        return self.time_conv(mx.concatenate([previous[:, -1:].astype(x.dtype), x], axis=1))


class WanMidBlock(nn.Module):
    """Residual block, then (attention, residual block) per layer."""

    channels_last = True

    def __init__(self, dim: int, num_layers: int = 1):
        super().__init__()
        self.attentions = [WanAttentionBlock(dim) for _ in range(num_layers)]
        self.resnets = [WanResidualBlock(dim, dim) for _ in range(num_layers + 1)]

    def __call__(self, x: mx.array, feat_cache: Cache | None = None, feat_idx: list[int] | None = None) -> mx.array:
        x = self.resnets[0](x, feat_cache=feat_cache, feat_idx=feat_idx)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x), feat_cache=feat_cache, feat_idx=feat_idx)
        return x


class WanResidualDownBlock(nn.Module):
    """Wan 2.2 encoder level: residual blocks and a downsampler, plus a parameter-free
    space-to-channel average shortcut around them."""

    channels_last = True

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temperal_downsample: bool, down_flag: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, factor_t=2 if temperal_downsample else 1,
                                      factor_s=2 if down_flag else 1)
        self.resnets = [WanResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        mode = "downsample3d" if temperal_downsample else "downsample2d"
        self.downsampler = WanResample(out_dim, mode) if down_flag else None

    def __call__(self, x: mx.array, feat_cache: Cache | None = None, feat_idx: list[int] | None = None) -> mx.array:
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x, feat_cache=feat_cache, feat_idx=feat_idx)
        if self.downsampler is not None:
            x = self.downsampler(x, feat_cache=feat_cache, feat_idx=feat_idx)
        return x + self.avg_shortcut(shortcut)


class WanUpBlock(nn.Module):
    """Wan 2.1 decoder level: num_res_blocks + 1 residual blocks, then an optional upsampler."""

    channels_last = True

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None):
        super().__init__()
        self.resnets = [WanResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        self.upsamplers = [WanResample(out_dim, upsample_mode)] if upsample_mode else None

    def __call__(self, x: mx.array, feat_cache: Cache | None = None, feat_idx: list[int] | None = None,
                 first_chunk: bool | None = None) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x, feat_cache=feat_cache, feat_idx=feat_idx)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, feat_cache=feat_cache, feat_idx=feat_idx)
        return x


class WanResidualUpBlock(nn.Module):
    """Wan 2.2 decoder level: residual blocks and an upsampler (keeping the width), plus a
    parameter-free channel-to-space duplicating shortcut."""

    channels_last = True

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temperal_upsample: bool, up_flag: bool):
        super().__init__()
        self.avg_shortcut = (DupUp3D(in_dim, out_dim, factor_t=2 if temperal_upsample else 1, factor_s=2)
                             if up_flag else None)
        self.resnets = [WanResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        mode = "upsample3d" if temperal_upsample else "upsample2d"
        self.upsampler = WanResample(out_dim, mode, upsample_out_dim=out_dim) if up_flag else None

    def __call__(self, x: mx.array, feat_cache: Cache | None = None, feat_idx: list[int] | None = None,
                 first_chunk: bool = False) -> mx.array:
        shortcut = x
        for resnet in self.resnets:
            x = resnet(x, feat_cache=feat_cache, feat_idx=feat_idx)
        if self.upsampler is not None:
            x = self.upsampler(x, feat_cache=feat_cache, feat_idx=feat_idx)
        if self.avg_shortcut is not None:
            x = x + self.avg_shortcut(shortcut, first_chunk=first_chunk)
        return x
