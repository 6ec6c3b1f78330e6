"""Scaled dot-product attention for every attention layer: torch SDPA by default,
xformers when installed and asked for (`DYNAMICRAFTER_ATTENTION=xformers`), or any function a host
installs with :func:`attention_function` (ComfyUI's nodes install its `optimized_attention`, so
its sage / flash / xformers / pytorch switches apply); and the relative-position temporal attention
of VideoCrafter1 (always SDPA, with an additive bias)."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

_BACKEND = os.environ.get("DYNAMICRAFTER_ATTENTION", "sdpa")
if _BACKEND == "xformers":
    import xformers.ops as xops  # noqa: F401  (optional dependency, fails loudly if asked for and absent)


# fn(q, k, v, heads) -> out, all (n, tokens, heads*d): replaces the built-in backends while set
_OVERRIDE: Optional[Callable] = None


@contextlib.contextmanager
def attention_function(fn: Optional[Callable]):
    """Inside this block every `attention` call (not the relative-position one) runs
    `fn(q, k, v, heads)` on (n, tokens, heads*d) tensors, e.g. ComfyUI's `optimized_attention`;
    None keeps the built-in backend. A process-wide switch (one sampling at a time, as in
    ComfyUI): a module global, so torch.compile guards on it instead of breaking the graph."""
    global _OVERRIDE
    previous, _OVERRIDE = _OVERRIDE, fn
    try:
        yield
    finally:
        _OVERRIDE = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (n, tokens, heads*d) inputs; returns (n, tokens_q, heads*d)."""
    if _OVERRIDE is not None:
        return _OVERRIDE(q, k, v, heads)
    if _BACKEND == "xformers" and q.is_cuda:
        q, k, v = (rearrange(x, "n l (h d) -> n l h d", h=heads).contiguous() for x in (q, k, v))
        return rearrange(xops.memory_efficient_attention(q, k, v), "n l h d -> n l (h d)")
    q, k, v = (rearrange(x, "n l (h d) -> n h l d", h=heads) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    # contiguous (n, l, h*d): a Linear on the permuted view would fall back to a slow batched matmul
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


class RelativePosition(nn.Module):
    """Learned embeddings of the signed distance key - query between two frames (VideoCrafter1's
    temporal attention), one row per distance in [-max_distance, max_distance]; longer distances
    use the last row (so clips longer than the training length still work)."""

    def __init__(self, dim_head: int, max_distance: int):
        super().__init__()
        self.embeddings_table = nn.Parameter(torch.zeros(2 * max_distance + 1, dim_head))

    def forward(self, length: int) -> torch.Tensor:
        """(length, length, dim_head): row [i, j] embeds the distance j - i (query i, key j)."""
        max_distance = (self.embeddings_table.shape[0] - 1) // 2
        pos = torch.arange(length, device=self.embeddings_table.device)
        distance = (pos[None, :] - pos[:, None]).clamp(-max_distance, max_distance)
        return self.embeddings_table[distance + max_distance]


def relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       rel_k: torch.Tensor, rel_v: torch.Tensor) -> torch.Tensor:
    """Self-attention over T tokens with relative-position terms, shared by every head:
    logits q_i.k_j/sqrt(d) + q_i.rel_k[i,j]/sqrt(d) and output sum_j p_ij (v_j + rel_v[i,j]).

    The key term is an additive bias, so SDPA computes the softmax and p.v. The value term needs
    the probabilities p themselves: SDPA returns them too when the values carry a one-hot of the
    key position in T extra channels (sum_j p_ij e_j = p_i)."""
    n, t, _ = q.shape
    q, k, v = (rearrange(x, "n l (h d) -> n h l d", h=heads) for x in (q, k, v))
    d = q.shape[-1]
    bias = torch.einsum("nhid,ijd->nhij", q, rel_k.to(q)) * d ** -0.5
    one_hot = torch.eye(t, dtype=v.dtype, device=v.device).expand(n, heads, t, t)
    out = F.scaled_dot_product_attention(q, k, torch.cat([v, one_hot], dim=-1), attn_mask=bias)
    out, probs = out[..., :d], out[..., d:]
    out = out + torch.einsum("nhij,ijd->nhid", probs, rel_v.to(out))
    return out.transpose(1, 2).reshape(n, t, heads * d)
