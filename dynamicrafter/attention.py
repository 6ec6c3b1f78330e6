"""Scaled dot-product attention for every attention layer: torch SDPA by default,
xformers when installed and asked for (`DYNAMICRAFTER_ATTENTION=xformers`)."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from einops import rearrange

_BACKEND = os.environ.get("DYNAMICRAFTER_ATTENTION", "sdpa")
if _BACKEND == "xformers":
    import xformers.ops as xops  # noqa: F401  (optional dependency, fails loudly if asked for and absent)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (n, tokens, heads*d) inputs; returns (n, tokens_q, heads*d)."""
    if _BACKEND == "xformers" and q.is_cuda:
        q, k, v = (rearrange(x, "n l (h d) -> n l h d", h=heads).contiguous() for x in (q, k, v))
        return rearrange(xops.memory_efficient_attention(q, k, v), "n l h d -> n l (h d)")
    q, k, v = (rearrange(x, "n l (h d) -> n h l d", h=heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    # contiguous (n, l, h*d): a Linear on the permuted view would fall back to a slow batched matmul
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
