"""CamI2V's camera modules (MODEL-SPEC-CAMI2V §5-§7), in the official key layout: the pose encoder
(Plücker rays -> one feature map per UNet level), the epipolar attention of the UNet's temporal
blocks, and the camera condition that carries both into the UNet.

    cam = dc.encode_camera(RT, K)            # RT (b, T, 4, 4) world-to-camera, K (b, T, 3, 3) pixels
    eps = dc.denoise(x_t, t, context, concat, fs, camera=cam)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .. import camera as geometry
from ..config import CameraConfig
from ..sampling.schedule import randn
from .ops import layers as ops


def mask_cell(origin_h: int, feature_height: int) -> int:
    """The epipolar mask a temporal block of this feature height reads: the one whose cells are
    origin_h // feature_height pixels (official lookup; 0 for an empty feature map)."""
    return origin_h // feature_height if feature_height else 0


@dataclasses.dataclass
class CameraCondition:
    """What the UNet's camera modules read: `pose_features[l]` (b, C_l, T, h/2^l, w/2^l) per UNet level
    and the boolean epipolar masks {d: (b, T*(H/d)*(W/d), T*(H/d)*(W/d))} (d = pixel size of a cell).
    A temporal block of feature height h' uses the mask d = origin_h // h' (none: unmasked attention)."""
    pose_features: list
    masks: dict
    origin_h: int

    def mask_for(self, height: int) -> Optional[torch.Tensor]:
        return self.masks.get(mask_cell(self.origin_h, height))

    def to(self, *args, **kwargs) -> "CameraCondition":
        return CameraCondition([f.to(*args, **kwargs) for f in self.pose_features],
                               {d: m.to(device=self.pose_features[0].to(*args, **kwargs).device)
                                for d, m in self.masks.items()}, self.origin_h)

    @property
    def batch(self) -> int:
        return self.pose_features[0].shape[0]

    @property
    def frames(self) -> int:
        return self.pose_features[0].shape[2]


# ------------------------------------------------------------------------------------ pose encoder

class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * div_term)
        pe[0, :, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe)


class TemporalSelfAttention(nn.Module):
    """Self-attention over the T frames of each pixel, the sinusoidal frame position added to its input."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.to_q = ops.Linear(dim, dim, bias=False)
        self.to_k = ops.Linear(dim, dim, bias=False)
        self.to_v = ops.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(ops.Linear(dim, dim), nn.Dropout(0.0))
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def forward(self, x):   # (n, T, C)
        if x.shape[1] > self.pos_encoder.pe.shape[1]:
            raise ValueError(f"the camera pose encoder handles at most {self.pos_encoder.pe.shape[1]} frames, "
                             f"got {x.shape[1]}")
        x = x + self.pos_encoder.pe[:, :x.shape[1]].to(x)
        q, k, v = (rearrange(f(x), "n l (h d) -> n h l d", h=self.heads) for f in (self.to_q, self.to_k, self.to_v))
        out = rearrange(F.scaled_dot_product_attention(q, k, v), "n h l d -> n l (h d)")
        return self.to_out(out)


class TemporalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        from .unet import FeedForward
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalSelfAttention(dim, heads, max_len)])
        self.norms = nn.ModuleList([ops.LayerNorm(dim)])
        self.ff = FeedForward(dim)
        self.ff_norm = ops.LayerNorm(dim)

    def forward(self, x):
        x = self.attention_blocks[0](self.norms[0](x)) + x
        return self.ff(self.ff_norm(x)) + x


class ResnetBlock(nn.Module):
    """[AvgPool 2x2] -> [1x1 in_conv when the width changes] -> x + conv1x1(ReLU(conv3x3(x)))."""

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.down = nn.AvgPool2d(2, 2) if down else None
        self.in_conv = ops.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.block1 = ops.Conv2d(c_out, c_out, 3, 1, 1)
        self.block2 = ops.Conv2d(c_out, c_out, 1)

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.block2(F.relu(self.block1(x))) + x


class CameraPoseEncoder(nn.Module):
    """Plücker (b, 6, T, H, W) -> [(b*T, C_l, H/8/2^l, W/8/2^l)] for each level l."""

    def __init__(self, cfg: CameraConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale)
        self.encoder_down_conv_blocks = nn.ModuleList()
        self.encoder_down_attention_blocks = nn.ModuleList()
        for level, c in enumerate(ch):
            self.encoder_down_conv_blocks.append(nn.ModuleList(
                [ResnetBlock(ch[level - 1] if j == 0 and level else c, c, down=j == 0 and level > 0)
                 for j in range(cfg.num_res_blocks)]))
            self.encoder_down_attention_blocks.append(nn.ModuleList(
                [TemporalBlock(c, cfg.heads, cfg.max_frames) for _ in range(cfg.num_res_blocks)]))
        self.encoder_conv_in = ops.Conv2d(cfg.cin, ch[0], 3, 1, 1)

    def forward(self, plucker):
        b = plucker.shape[0]
        x = self.encoder_conv_in(self.unshuffle(rearrange(plucker, "b c f h w -> (b f) c h w")))
        features = []
        for convs, attns in zip(self.encoder_down_conv_blocks, self.encoder_down_attention_blocks):
            for conv, attn in zip(convs, attns):
                x = conv(x)
                h, w = x.shape[-2:]
                x = rearrange(attn(rearrange(x, "(b f) c h w -> (b h w) f c", b=b).contiguous()),
                              "(b h w) f c -> (b f) c h w", h=h, w=w)
            features.append(x)
        return features


# ------------------------------------------------------------------------------------ epipolar attention

class EpipolarCrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, registers: int):
        super().__init__()
        self.heads = heads
        self.to_q = ops.Linear(dim, dim, bias=False)
        self.to_k = ops.Linear(dim, dim, bias=False)
        self.to_v = ops.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(ops.Linear(dim, dim), nn.Dropout(0.0))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim))

    def forward(self, x, mask: Optional[torch.Tensor]):
        """x (b, L, C); mask bool (b, L, L) or None; the registers are always visible keys."""
        b, registers = x.shape[0], self.register_tokens.shape[1]
        context = torch.cat([self.register_tokens.to(x).repeat(b, 1, 1), x], dim=1)
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if mask is not None:
            mask = F.pad(mask, (registers, 0), value=True).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class Epipolar(nn.Module):
    """Attention over every token (frame, row, column) of the clip, restricted to epipolar lines."""

    def __init__(self, dim: int, heads: int, registers: int):
        super().__init__()
        self.epipolar_attn = EpipolarCrossAttention(dim, heads, registers)

    def forward(self, x, mask, h: int, w: int):
        """x ((b h w), T, C) -> ((b h w), T, C)."""
        tokens = rearrange(x, "(b h w) f c -> b (f h w) c", h=h, w=w)
        out = self.epipolar_attn(tokens, mask)
        return rearrange(out, "b (f h w) c -> (b h w) f c", h=h, w=w)


def add_camera_modules(block: nn.Module, dim: int, heads: int, registers: int) -> None:
    """Give a temporal BasicTransformerBlock CamI2V's pluker_projection and epipolar attention."""
    block.pluker_projection = ops.Linear(dim, dim)
    block.epipolar = Epipolar(dim, heads, registers)


def camera_branch(block: nn.Module, normed: torch.Tensor, camera) -> torch.Tensor:
    """pluker_projection(n + P) + Epipolar(n + P): what a camera block adds to its residual (§6.3).
    `camera` = (P ((b h w), T, C), mask or None, h, w)."""
    features, mask, h, w = camera
    z = normed + features
    return block.pluker_projection(z) + block.epipolar(z, mask, h, w)


# ------------------------------------------------------------------------------------ the condition

def encode_camera(pose_encoder: CameraPoseEncoder, cfg: CameraConfig, RT: torch.Tensor, K: torch.Tensor,
                  height: int, width: int, trace_scale: float = 1.0, noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None, cond_frame: int = 0) -> CameraCondition:
    """RT (b, T, 4, 4) world-to-camera, K (b, T, 3, 3) pixel intrinsics of the height x width video ->
    CameraCondition. `noise` (b, T, T, 3, 1) or a CPU `generator` supplies the N(0,1) draws that
    replace zero translations (the official code draws them from the global RNG)."""
    geometry.check_camera(RT, K)
    device = next(pose_encoder.parameters()).device
    with torch.no_grad():
        Kf = K.to(device).float()
        rel = geometry.relative_c2w(RT.to(device), trace_scale, cond_frame)
        masks = {}
        if cfg.mask_resolutions:
            pairs = geometry.pose_pairs(rel)
            R, t = pairs[..., :3, :3], pairs[..., :3, 3:4]
            if cfg.perturb_zero_translation:
                if noise is None:
                    noise = randn(t.shape, generator, device=t.device)
                t = geometry.perturb_zero_translations(t, noise.to(t.device))
            Fm = geometry.fundamental_matrices(Kf.unsqueeze(1), R, t)
            masks = {8 * r: geometry.epipolar_mask(Fm, height, width, 8 * r) for r in cfg.mask_resolutions}
        plucker = geometry.plucker_rays(Kf, rel, height, width)
    dt = next(pose_encoder.parameters()).dtype
    b = RT.shape[0]
    features = [rearrange(f, "(b f) c h w -> b c f h w", b=b) for f in pose_encoder(plucker.to(dt))]
    return CameraCondition(features, masks, cfg.origin_h)


# ------------------------------------------------------------------------------------ camera guidance

def camera_guidance(denoise_without_camera, cond_context: torch.Tensor, cfg_camera: float):
    """CamI2V's camera CFG (constant schedule): a function of the conditional output e_c returning
    (cfg_camera - 1) * (e_c - e_nc), e_nc = the conditional branch without the camera condition."""
    def extra(cond_out):
        return (cfg_camera - 1.0) * 1.0 * (cond_out - denoise_without_camera(cond_context))
    return extra


def check_camera_sampling(dc, camera, cfg_camera, plan) -> None:
    if isinstance(cfg_camera, bool) or not isinstance(cfg_camera, (int, float)) or not math.isfinite(cfg_camera) \
            or not 0 <= cfg_camera <= 20:
        raise ValueError(f"cfg_camera must be a number in [0, 20] (1 = no camera guidance), got {cfg_camera!r}")
    if camera is None:
        raise ValueError(f"cfg_camera {cfg_camera} needs a camera condition (camera=dc.encode_camera(...))")
    if getattr(dc, "cfg", None) is not None and dc.cfg.camera is None:
        raise ValueError("this model has no camera control (not a CamI2V checkpoint): sample without camera")
    if plan is not None:
        raise ValueError("context windows cannot carry a camera condition (its epipolar attention spans the "
                         "whole clip): sample at most the model's frame count without window")
