"""DeepCache-style step caching (Ma et al. 2023) for the UNet: between adjacent sampling steps the
deep features change little, so every `interval`-th step runs the whole UNet and keeps the input of
the shallow output blocks; the steps between recompute only the shallow blocks (input blocks
0..depth, the output blocks that take their skips, the output head) and reuse the kept features.

`unet_forward` is `UNet3D.forward` written out with that cut (tested equal to it when nothing is
reused)."""
from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from .unet import SpatialTransformer, expand_batch, timestep_embedding


def unet_forward(unet, x, timesteps, context, fs=None, depth: int = 0, deep: Optional[torch.Tensor] = None):
    """UNet3D.forward (temporal layers on) returning (output, deep features): the input of output
    block L-1-depth. With `deep` given, input blocks past `depth`, the middle block and the output
    blocks before L-1-depth are skipped and `deep` is used in their place."""
    cfg = unet.cfg
    b, _, t, _, _ = x.shape
    emb = unet.time_embed(timestep_embedding(timesteps.reshape(-1).expand(b), cfg.model_channels).to(x.dtype))
    if cfg.fs_condition:
        if fs is None:
            fs = torch.full((b,), cfg.default_fs, dtype=torch.long, device=x.device)
        emb = emb + unet.fps_embedding(timestep_embedding(fs.reshape(-1).expand(b), cfg.model_channels).to(x.dtype))
    emb = emb.repeat_interleave(t, dim=0)
    context = unet.per_frame_context(context, t)
    n = context.shape[0]
    inputs = unet.input_blocks if deep is None else unet.input_blocks[:depth + 1]

    h = rearrange(x, "b c t h w -> (b t) c h w")
    skips = []
    for i, block in enumerate(inputs):
        if h.shape[0] == n:
            h = block(h, expand_batch(emb, n), context, t)
        else:   # guidance branches still shared: part them at the first cross-attention
            cut = next((j for j, layer in enumerate(block) if isinstance(layer, SpatialTransformer)), len(block))
            h = block(h, emb, context, t, stop=cut)
            if cut < len(block):
                emb, h = expand_batch(emb, n), expand_batch(h, n)
                h = block(h, emb, context, t, start=cut)
        if i == 0 and hasattr(unet, "init_attn"):
            h = unet.init_attn(h, emb, context, t)
        skips.append(h)
    emb = expand_batch(emb, n)
    first_shallow = len(unet.output_blocks) - 1 - depth
    if deep is None:
        h = unet.middle_block(expand_batch(h, n), emb, context, t)
        for block in unet.output_blocks[:first_shallow]:
            h = block(h, emb, context, t, skip=skips.pop())
        deep = h
    else:
        h = deep
    for block in unet.output_blocks[first_shallow:]:
        h = block(h, emb, context, t, skip=skips.pop())
    return rearrange(unet.out(h), "(b t) c h w -> b c t h w", t=t), deep


class DeepCache:
    """Per sampling run: call as `cache(dc, step, x_t, t, context, concat, fs) -> (output, reused)`.
    Step `step` runs the whole UNet when step % interval == 0 (or nothing usable is kept: the
    branch count grew), otherwise only the blocks at depth <= `depth`."""

    def __init__(self, interval: int, depth: int = 1):
        if interval < 1 or depth < 0:
            raise ValueError(f"cache interval must be >= 1 and depth >= 0, got {interval}, {depth}")
        self.interval, self.depth = interval, depth
        self.deep: Optional[torch.Tensor] = None

    def __call__(self, dc, step: int, x_t, t, context, concat=None, fs=None):
        unet = dc.unet
        if not 0 <= self.depth < len(unet.output_blocks) - 1:
            raise ValueError(f"cache depth must be in 0..{len(unet.output_blocks) - 2} for this UNet, got {self.depth}")
        x = x_t if concat is None else torch.cat([x_t, concat.to(x_t)], dim=1)
        dt = dc.dtype
        rows = context.shape[0] * x.shape[2]
        reuse = step % self.interval != 0 and self.deep is not None and self.deep.shape[0] >= rows
        deep = self.deep[:rows] if reuse else None     # branch-major: the first rows are the first branches
        out, kept = unet_forward(unet, x.to(dt), torch.as_tensor(t, device=x.device), context.to(x.device, dt),
                                 None if fs is None else torch.as_tensor(fs, device=x.device).long(),
                                 self.depth, deep)
        if not reuse:
            self.deep = kept
        return out.to(x_t.dtype), reuse
