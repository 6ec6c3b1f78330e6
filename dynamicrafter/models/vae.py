"""The SD KL-f8 autoencoder (`first_stage_model`, design §5), applied per 2D frame."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from ..config import VAEConfig


def norm(ch, groups=32):
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout, groups=32):
        super().__init__()
        self.norm1, self.conv1 = norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head attention over the pixels of the lowest-resolution feature map."""

    def __init__(self, ch, groups=32):
        super().__init__()
        self.norm = norm(ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (f(y).flatten(2).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = attention(q, k, v, heads=1).transpose(1, 2).reshape(n, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))   # asymmetric padding, as in SD


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (`resblock`: the class of
    the two ResnetBlocks; the video decoder passes its own)."""

    def __init__(self, ch, groups, resblock=ResnetBlock):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = (resblock(ch, ch, groups), AttnBlock(ch, groups),
                                                   resblock(ch, ch, groups))

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


def conv3x3(cin, cout):
    return nn.Conv2d(cin, cout, 3, padding=1)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, g = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)], cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(chans[i] if j == 0 else chans[i + 1], chans[i + 1], g)
                                         for j in range(cfg.num_res_blocks)])
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(chans[i + 1])
            self.down.append(level)
        self.mid = MidBlock(chans[-1], g)
        self.norm_out = norm(chans[-1], g)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """The image decoder. Its parts are class attributes so the video decoder (vae_dualref) builds
    the same levels from its own blocks: `resblock` (cin, cout, groups), `midblock` (ch, groups,
    resblock) and `out_conv` (cin, cout), the last conv."""
    resblock, midblock, out_conv = ResnetBlock, MidBlock, staticmethod(conv3x3)

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, g = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = self.midblock(chans[-1], g, self.resblock)
        self.up = nn.ModuleList(nn.Module() for _ in cfg.ch_mult)   # index = resolution level
        cin = chans[-1]
        for i in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(self.resblock(cin, chans[i], g))
                cin = chans[i]
            self.up[i].block = nn.ModuleList(blocks)
            if i != 0:
                self.up[i].upsample = Upsample(cin)
        self.norm_out = norm(cin, g)
        self.conv_out = self.out_conv(cin, cfg.out_ch)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid(h)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    decoder_class = Decoder     # the dual-reference autoencoder (vae_dualref) sets its video decoder

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = self.decoder_class(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> (n, 2*embed_dim, H/8, W/8): posterior mean | logvar (unclamped)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (n, embed_dim, h, w) -> image (n, 3, 8h, 8w), not clamped."""
        return self.decoder(self.post_quant_conv(z))


def posterior_sample(moments: torch.Tensor, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """mean + std * noise with logvar clamped to [-30, 20], the official posterior `sample()`.
    The noise is drawn on the generator's device (a CPU generator, as core ComfyUI seeds, gives the
    same draw for a model on any device) and moved to the moments' device."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator,    # float32, then cast: one draw for every dtype
                            device=generator.device if generator is not None else mean.device)
    return mean + std * noise.to(mean)
