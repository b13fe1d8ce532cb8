"""diffusers' ``AutoencoderKL`` in MLX: ``decode`` (latents → image) and ``encode`` (image → posterior mean and std,
for img2img), with diffusers' module names. Channels-last (NHWC) in and out.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxd_daemon.errors import Unsupported
from mlxd_daemon.pipelines.layers import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from mlxd_daemon.taps import tap

VAE_EPS = 1e-6  # diffusers' Encoder/Decoder build every resnet and norm with eps 1e-6


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Parse diffusers' vae/config.json; ``Unsupported`` for block types or activations it does not compute."""
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [b for b in d.get(key, []) if b != want]
            if bad:
                msg = f"vae {key} entry {bad[0]!r} is not supported (only {want})"
                raise Unsupported(msg, reason="UNSUPPORTED_VAE_CONFIG", key=key, value=bad[0])
        if d.get("act_fn", "silu") != "silu":
            msg = f"vae act_fn {d['act_fn']!r} is not supported (only silu)"
            raise Unsupported(msg, reason="UNSUPPORTED_VAE_CONFIG", key="act_fn", value=str(d["act_fn"]))
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        return cls(**{**kw, "block_out_channels": tuple(d.get("block_out_channels", cls.block_out_channels))})


class VAEAttention(Attention):
    """The mid-block self-attention: a GroupNorm first, one head over all channels, and a residual."""

    def __init__(self, name: str, dim: int, groups: int):
        super().__init__(dim, 1, dim, bias=True)
        self._name = name
        self.group_norm = GroupNorm(groups, dim, VAE_EPS)

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        b, h, w, c = x.shape
        y = super().__call__(self.group_norm(x).reshape(b, h * w, c))
        return tap(self._name, y.reshape(b, h, w, c) + x)


class MidBlock(nn.Module):
    def __init__(self, name: str, dim: int, cfg: VAEConfig):
        super().__init__()
        self._name = name
        self.resnets = [ResnetBlock2D(f"{name}.resnets.{j}", dim, dim, None, cfg.norm_num_groups, VAE_EPS)
                        for j in range(2)]  # fmt: skip
        if cfg.mid_block_add_attention:
            self.attentions = [VAEAttention(f"{name}.attentions.0", dim, cfg.norm_num_groups)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return tap(self._name, self.resnets[1](x))


class CoderBlock(nn.Module):
    """DownEncoderBlock2D (``down`` True) or UpDecoderBlock2D: resnets, then a down/upsampler unless last."""

    def __init__(self, name: str, cin: int, cout: int, layers: int, last: bool, down: bool, cfg: VAEConfig):
        super().__init__()
        self._name = name
        g = cfg.norm_num_groups
        self.resnets = [ResnetBlock2D(f"{name}.resnets.{j}", cin if j == 0 else cout, cout, None, g, VAE_EPS)
                        for j in range(layers)]  # fmt: skip
        if not last and down:
            self.downsamplers = [Downsample2D(cout, 0)]
        elif not last:
            self.upsamplers = [Upsample2D(cout)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return tap(self._name, x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            CoderBlock(
                f"encoder.down_blocks.{i}", ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i == n - 1, True, cfg
            )
            for i in range(n)
        ]
        self.mid_block = MidBlock("encoder.mid_block", ch[-1], cfg)
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[-1], VAE_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        rev = list(reversed(ch))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = MidBlock("decoder.mid_block", ch[-1], cfg)
        self.up_blocks = [
            CoderBlock(f"decoder.up_blocks.{i}", rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, i == n - 1,
                       False, cfg) for i in range(n)
        ]  # fmt: skip
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], VAE_EPS)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = 2 * cfg.latent_channels
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(c, c, 1)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def decode(self, z: mx.array) -> mx.array:
        """Latents (already divided by the scaling factor) → image in [-1, 1] (unclamped), float32, NHWC."""
        z = z.astype(self.decoder.conv_in.weight.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(mx.float32)

    def encode(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Image in [-1, 1] → the posterior's (mean, std), as diffusers' DiagonalGaussianDistribution."""
        h = self.encoder(x.astype(self.encoder.conv_in.weight.dtype))
        if "quant_conv" in self:
            h = self.quant_conv(h)
        mean, logvar = mx.split(h.astype(mx.float32), 2, axis=-1)
        return mean, mx.exp(0.5 * mx.clip(logvar, -30.0, 20.0))
