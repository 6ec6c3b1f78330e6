"""The context resampler (`image_proj_model`, design §4): a Perceiver whose 16*T learned
queries read the 257 CLIP image tokens and become 16 context tokens per frame (frame-major)."""
from __future__ import annotations

import torch
from torch import nn

from .attention import attention
from ..config import ResamplerConfig
from .ops import building_with
from .ops import layers as ops


class PerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head, heads):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1, self.norm2 = ops.LayerNorm(dim), ops.LayerNorm(dim)
        self.to_q = ops.Linear(dim, inner, bias=False)
        self.to_kv = ops.Linear(dim, inner * 2, bias=False)
        self.to_out = ops.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        # keys/values come from the image tokens and the queries themselves
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


def feed_forward(dim, mult):
    return nn.Sequential(ops.LayerNorm(dim), ops.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         ops.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    def __init__(self, cfg: ResamplerConfig, operations=None):
        super().__init__()
        with building_with(operations):
            self._build(cfg)

    def _build(self, cfg: ResamplerConfig):
        self.cfg = cfg
        n = cfg.num_queries * cfg.video_length
        self.latents = nn.Parameter(torch.randn(1, n, cfg.dim) / cfg.dim ** 0.5)
        self.proj_in = ops.Linear(cfg.embedding_dim, cfg.dim)
        self.layers = nn.ModuleList(
            [nn.ModuleList([PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), feed_forward(cfg.dim, cfg.ff_mult)])
             for _ in range(cfg.depth)])
        self.proj_out = ops.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = ops.LayerNorm(cfg.output_dim)

    def forward(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """(b, 257, D) CLIP tokens -> (b, 16*T, C) context tokens (token 16f+j: query j of frame f)."""
        x = self.proj_in(clip_tokens)
        latents = self.latents.to(x).expand(clip_tokens.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))
