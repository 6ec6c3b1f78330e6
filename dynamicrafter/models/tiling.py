"""Spatial tiling for decoders: decode overlapping latent tiles and blend them into one image.

Generic over the decoder: `tiled_decode` takes any per-tile callable (latent tile -> image tile,
channels first), so the library VAE, ComfyUI's VAE or another decoder can use it. The result
differs slightly from decoding the whole frame (the decoder's GroupNorm statistics and its
mid-block attention see one tile instead of the frame); overlaps blended with linear ramps hide
the seams.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

TILE = 64          # latent pixels per tile side (512 image pixels), ComfyUI's default
OVERLAP = 16       # latent pixels shared by neighbouring tiles
AUTO_AREA = 64 * 64   # frames with more latent pixels than this are tiled by default (> 512x512 px)


def should_tile(h: int, w: int, tile: Optional[int]) -> bool:
    """tile None = automatic (larger than AUTO_AREA), 0 = never, else when a side exceeds `tile`."""
    if tile is None:
        return h * w > AUTO_AREA
    return tile > 0 and (h > tile or w > tile)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, size) with tiles of `tile` overlapping by at least `overlap`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, rise: int, fall: int, device=None) -> torch.Tensor:
    """1 inside, linear ramps (never 0) over the first `rise` and last `fall` samples."""
    w = torch.ones(length, device=device)
    if rise:
        w[:rise] = (torch.arange(rise, device=device) + 0.5) / rise
    if fall:
        w[length - fall:] = torch.minimum(w[length - fall:], (torch.arange(fall, 0, -1, device=device) - 0.5) / fall)
    return w


@torch.no_grad()
def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int = TILE,
                 overlap: int = OVERLAP) -> torch.Tensor:
    """z (n, c, h, w) -> decode(z) (n, C, s*h, s*w), computed tile by tile (tiles of `tile` latent
    pixels overlapping by `overlap`) and blended. `decode` maps a latent tile to its image tile."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap {overlap} with tile {tile}")
    n, _, h, w = z.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = weight = None
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            th, tw = min(tile, h), min(tile, w)
            piece = decode(z[:, :, y:y + th, x:x + tw]).float()
            s = piece.shape[-1] // tw
            if out is None:
                out = torch.zeros(n, piece.shape[1], h * s, w * s, device=piece.device)
                weight = torch.zeros(h * s, w * s, device=piece.device)
            # ramps over the rows/columns shared with the previous / next tile
            up = (ys[i - 1] + th - y) * s if i else 0
            down = (y + th - ys[i + 1]) * s if i + 1 < len(ys) else 0
            left = (xs[j - 1] + tw - x) * s if j else 0
            right = (x + tw - xs[j + 1]) * s if j + 1 < len(xs) else 0
            dev = piece.device
            mask = _ramp(th * s, up, down, dev)[:, None] * _ramp(tw * s, left, right, dev)[None]
            out[:, :, y * s:(y + th) * s, x * s:(x + tw) * s] += piece * mask
            weight[y * s:(y + th) * s, x * s:(x + tw) * s] += mask
            del piece
    return out / weight
