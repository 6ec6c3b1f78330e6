"""ToonCrafter's dual-reference autoencoder (`AutoencoderKL_Dualref` of the official code).

The encoder is the SD KL-f8 encoder; it also hands out the feature maps of the first and last
input frames ("references"). The decoder is a video decoder: every ResnetBlock gains a temporal
residual branch (GroupNorm over the whole clip, (3,1,1) convolutions over time) blended in by a
learned factor, the output conv is followed by a (3,1,1) convolution over time, and, given
references, the decoder looks back at the keyframes: cross-attention to the two frames'
features at the two lowest resolutions, and a 1x1 conv of the reference added to the clip's
first and last frames at the other resolutions and right before the output conv.

The decoder never applies `post_quant_conv` (the official decode path skips it).

Memory: a decoder activation of the whole clip is alive only once or twice at a time; every
per-frame operation runs `chunk` frames at a time, the clip-wide GroupNorm statistics are
accumulated chunk by chunk and the temporal convolutions see one extra frame on each side.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from ..config import VAEConfig
from .vae import AutoencoderKL, Decoder, MidBlock, ResnetBlock, norm

REF_ATTN_DIM_HEAD = 64      # the official cross-attention to the references: heads x 64 (8 x 64 released)
TIME_NORM_EPS = 1e-5        # the temporal branch's GroupNorms (the spatial ones use 1e-6)
DEFAULT_CHUNK = 2           # frames per per-frame operation in the memory-lean decoder
NO_REFERENCES_WARNING = (
    "ToonCrafter decode without references: decoding as the official decoder does when it is given none "
    "(no look-back at the keyframes, less faithful detail). Pass the start/end images' references "
    "(dc.encode_references(start, end); in ComfyUI the latent of the image-conditioning node, 'Animate Image "
    "to Video / Interpolation (DynamiCrafter)', in interpolation mode, decoded by 'DynamiCrafter Video Decode').")


# ----------------------------------------------------------------------------- clip-wide helpers

def _per_chunk(fn, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn applied to x[i:i+chunk] for each chunk, written into one preallocated output."""
    out = None
    for i in range(0, x.shape[0], chunk):
        y = fn(x[i:i + chunk])
        if out is None:
            out = y.new_empty((x.shape[0],) + y.shape[1:])
        out[i:i + y.shape[0]] = y
    return out


def _clip_group_norm_affine(x: torch.Tensor, gn: nn.GroupNorm, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of GroupNorm over a whole clip x (T, C, H, W): statistics over
    the group's channels x T x H x W, two exact float32 passes chunk by chunk (no float64: MPS has
    none): the mean from per-chunk sums, then the variance from sums of squares about that mean."""
    t, c = x.shape[:2]
    g = gn.num_groups

    def groups(i: int) -> torch.Tensor:        # chunk i as (g, elements of the group), float32
        return x[i:i + chunk].float().reshape(-1, g, c // g, x[0, 0].numel()).transpose(0, 1).reshape(g, -1)

    n = t * (c // g) * x[0, 0].numel()
    total = x.new_zeros(g, dtype=torch.float32)
    for i in range(0, t, chunk):
        total += groups(i).sum(dim=1)
    mean = total / n
    m2 = torch.zeros_like(mean)
    for i in range(0, t, chunk):
        m2 += (groups(i) - mean[:, None]).square().sum(dim=1)
    rstd = torch.rsqrt(m2 / n + gn.eps)
    scale = rstd.repeat_interleave(c // g) * gn.weight.float()
    shift = gn.bias.float() - mean.repeat_interleave(c // g) * scale
    return scale, shift


def _clip_norm_silu_conv_time(x: torch.Tensor, gn: nn.GroupNorm, conv: nn.Conv3d, chunk: int) -> torch.Tensor:
    """conv(silu(GroupNorm(x))) over a clip x (T, C, H, W), GroupNorm statistics of the whole
    clip, the (k,1,1) convolution over time with zero padding at the clip ends."""
    scale, shift = _clip_group_norm_affine(x, gn, chunk)
    scale, shift = scale.to(x.dtype)[:, None, None], shift.to(x.dtype)[:, None, None]
    t, halo = x.shape[0], conv.padding[0]
    out = x.new_empty((t, conv.out_channels) + x.shape[2:])
    for i in range(0, t, chunk):
        j = min(t, i + chunk)
        lo, hi = max(0, i - halo), min(t, j + halo)
        a = F.silu(torch.addcmul(shift, x[lo:hi], scale))
        a = F.pad(a.transpose(0, 1)[None], (0, 0, 0, 0, halo - (i - lo), halo - (hi - j)))
        out[i:j] = F.conv3d(a, conv.weight, conv.bias)[0].transpose(0, 1)
    return out


# ----------------------------------------------------------------------------- blocks

class TimeStack(nn.Module):
    """The temporal residual branch: GN -> SiLU -> conv(3,1,1) -> GN -> SiLU -> conv(3,1,1), + x."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, ch, eps=TIME_NORM_EPS), nn.SiLU(),
                                       nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0)))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, ch, eps=TIME_NORM_EPS), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0)))


class VideoResBlock(ResnetBlock):
    """A spatial ResnetBlock (per frame), then out = a * (x + time_stack(x)) + (1 - a) * x with
    a = sigmoid(mix_factor)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__(cin, cout, groups)
        self.time_stack = TimeStack(cout, groups)
        self.mix_factor = nn.Parameter(torch.zeros(1))

    def spatial(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        return _per_chunk(super().forward, x, chunk)

    def temporal(self, xs: torch.Tensor, chunk: int) -> torch.Tensor:
        """Blends the temporal branch into xs (T, C, H, W) in place and returns it."""
        ts = self.time_stack
        h = _clip_norm_silu_conv_time(xs, ts.in_layers[0], ts.in_layers[2], chunk)
        r = _clip_norm_silu_conv_time(h, ts.out_layers[0], ts.out_layers[3], chunk)
        del h
        alpha = torch.sigmoid(self.mix_factor).to(xs.dtype)
        for i in range(0, xs.shape[0], chunk):
            x = xs[i:i + chunk]
            x.copy_(alpha * (x + r[i:i + chunk]) + (1.0 - alpha) * x)
        return xs

    def forward(self, x: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        return self.temporal(self.spatial(x, chunk), chunk)


class RefCrossAttention(nn.Module):
    """Every frame's pixels attend to the pixels of both references (first ; last), heads x 64
    wide; queries from the GroupNormed frame, keys/values from the raw reference features."""

    def __init__(self, ch: int, inner: int, groups: int):
        super().__init__()
        self.heads = inner // REF_ATTN_DIM_HEAD
        self.norm = norm(ch, groups)
        self.to_q = nn.Linear(ch, inner, bias=False)
        self.to_k = nn.Linear(ch, inner, bias=False)
        self.to_v = nn.Linear(ch, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, ch), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, ref: torch.Tensor, chunk: int) -> torch.Tensor:
        """x (T, C, H, W) of one clip, ref (C, 2, h, w); returns a new clip tensor."""
        tokens = ref.to(x.dtype).flatten(2).permute(1, 2, 0).reshape(1, -1, ref.shape[0])   # (1, 2hw, C)
        k, v = self.to_k(tokens), self.to_v(tokens)

        def refine(xc):
            n, c, hh, ww = xc.shape
            q = self.to_q(self.norm(xc).flatten(2).transpose(1, 2))
            out = attention(q, k.expand(n, -1, -1), v.expand(n, -1, -1), self.heads)
            return xc + self.to_out(out).transpose(1, 2).reshape(n, c, hh, ww)
        return _per_chunk(refine, x, chunk)


class Combiner(nn.Module):
    """A 1x1 conv of each reference, added to the clip's first (first reference) and last frame."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 1)

    def add_to(self, x: torch.Tensor, ref: torch.Tensor, first: bool, last: bool) -> torch.Tensor:
        """x: frames of a clip (in place); ref (C, 2, h, w); first/last: x[0] / x[-1] is the clip's."""
        if first:
            x[0] += self.conv(ref[:, 0][None].to(x.dtype))[0]
        if last:
            x[-1] += self.conv(ref[:, 1][None].to(x.dtype))[0]
        return x


class TimeMixConv(nn.Conv2d):
    """The output conv: a 3x3 conv per frame, then a (3,1,1) conv over time (key `time_mix_conv`)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1)
        self.time_mix_conv = nn.Conv3d(cout, cout, (3, 1, 1), padding=(1, 0, 0))

    def mix_time(self, y: torch.Tensor) -> torch.Tensor:   # y (T, C, H, W) of one clip
        return self.time_mix_conv(y.transpose(0, 1)[None])[0].transpose(0, 1)


class VideoMidBlock(MidBlock):
    """The mid block over a clip (T, C, H, W): video ResnetBlocks, per-frame attention."""

    def forward(self, h: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        h = self.block_1(h, chunk)
        h = _per_chunk(self.attn_1, h, chunk)
        return self.block_2(h, chunk)


class VideoDecoder(Decoder):
    """The dual-reference video decoder: the image decoder's levels built from video blocks;
    `attn_refinement[i]` refines level i (cross-attention at `cfg.ref_attn_levels`, else a
    Combiner), index len(ch_mult) the output before `conv_out`."""
    resblock, midblock, out_conv = VideoResBlock, VideoMidBlock, TimeMixConv

    def __init__(self, cfg: VAEConfig):
        super().__init__(cfg)
        chans, g = [cfg.ch * m for m in cfg.ch_mult], cfg.norm_groups
        self.attn_refinement = nn.ModuleList(
            RefCrossAttention(chans[i], cfg.ref_attn_inner, g) if i in cfg.ref_attn_levels else Combiner(chans[i])
            for i in range(len(cfg.ch_mult)))
        self.attn_refinement.append(Combiner(chans[0]))

    def _refine(self, i: int, h: torch.Tensor, ref: torch.Tensor, chunk: int) -> torch.Tensor:
        module = self.attn_refinement[i]
        if isinstance(module, RefCrossAttention):
            return module(h, ref, chunk)
        return module.add_to(h, ref, True, True)

    def forward(self, z: torch.Tensor, references: Optional[Sequence[torch.Tensor]] = None,
                chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        """One clip: z (T, z_channels, h, w) unscaled latents, references: per level (C, 2, h, w)
        (first, last keyframe) or None. Returns (T, out_ch, 8h, 8w), not clamped."""
        h = self.mid(_per_chunk(self.conv_in, z, chunk), chunk)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block.spatial(h, chunk)      # the block input is freed here
                h = block.temporal(h, chunk)
            if references is not None:
                h = self._refine(i, h, references[i], chunk)
            if hasattr(level, "upsample"):
                h = _per_chunk(level.upsample, h, chunk)
        final = self.attn_refinement[-1]
        t = h.shape[0]

        def out(i_h):
            i, hc = i_h
            a = F.silu(self.norm_out(hc))
            if references is not None:
                a = final.add_to(a, references[-1], i == 0, i + hc.shape[0] == t)
            return self.conv_out(a)
        y = torch.cat([out((i, h[i:i + chunk])) for i in range(0, t, chunk)])
        del h
        return self.conv_out.mix_time(y)


# ----------------------------------------------------------------------------- autoencoder

class AutoencoderKLDualref(AutoencoderKL):
    """KL-f8 encoder (+ reference features) and the dual-reference video decoder;
    `post_quant_conv` is stored (the checkpoints have it) but never applied."""
    decoder_class = VideoDecoder

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(n, 3, H, W) -> the encoder's outputs of levels 0..L-1 (before each downsample, the
        last level before the mid block), then conv_in's output: what the decoder refers to."""
        enc = self.encoder
        first = h = enc.conv_in(x)
        out = []
        for level in enc.down:
            for block in level.block:
                h = block(h)
            out.append(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return out + [first]

    def references(self, start: torch.Tensor, end: torch.Tensor) -> list[torch.Tensor]:
        """Features of the start and end images (b, 3, H, W) -> per level (b, C, 2, h, w)."""
        b = start.shape[0]
        return [torch.stack([f[:b], f[b:]], dim=2) for f in self.features(torch.cat([start, end]))]

    def decode(self, z: torch.Tensor, references: Optional[Sequence[torch.Tensor]] = None,
               chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        """Unscaled latents of ONE clip (T, embed_dim, h, w) -> frames (T, 3, 8h, 8w), not
        clamped; references per level (C, 2, h, w) (one video's) or None."""
        return self.decoder(z, references, chunk)


def decode_videos(vae: AutoencoderKLDualref, z: torch.Tensor, references: Optional[Sequence[torch.Tensor]],
                  clip_frames: int, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Unscaled latents (b, 4, T, h, w) -> (b, 3, T, H, W) in the VAE's dtype, each video on its
    own with its references (batch 1 or b, per level (b, C, 2, h, w)), in clips of `clip_frames`
    frames (the official decoder call takes the model's temporal length at a time)."""
    videos = []
    for i in range(z.shape[0]):
        refs = None if references is None else [r[i if r.shape[0] > 1 else 0] for r in references]
        frames = z[i].transpose(0, 1)
        videos.append(torch.cat([vae.decode(frames[s:s + clip_frames], refs, chunk)
                                 for s in range(0, frames.shape[0], clip_frames)]).transpose(0, 1))
    return torch.stack(videos)
