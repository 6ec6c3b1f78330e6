"""DeepCache-style step caching (Ma et al. 2023) for the UNet: between adjacent sampling steps the
deep features change little, so every `interval`-th step runs the whole UNet and keeps the input of
the shallow output blocks; the steps between recompute only the shallow blocks (input blocks
0..depth, the output blocks that take their skips, the output head) and reuse the kept features.

The cut is `UNet3D.forward_cut` (tested equal to `UNet3D.forward` when nothing is reused)."""
from __future__ import annotations

from typing import Optional

import torch


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
        out, kept = unet.forward_cut(x.to(dt), torch.as_tensor(t, device=x.device), context.to(x.device, dt),
                                     None if fs is None else torch.as_tensor(fs, device=x.device).long(),
                                     depth=self.depth, deep=deep)
        if not reuse:
            self.deep = kept
        return out.to(x_t.dtype), reuse
