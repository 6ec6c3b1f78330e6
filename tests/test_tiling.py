"""Spatial tiled decoding (dynamicrafter/models/tiling.py): blending is exact for a decoder without
spatial context, and close to whole-frame decoding for the tiny reference VAE."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynamicrafter.models.tiling import should_tile, tile_starts, tiled_decode

# Tiny reference VAE (random weights, outputs up to |3.5|), a 40x72 latent frame decoded in
# 32-latent-pixel tiles overlapping by 8 vs whole: measured max |diff| 0.185, mean 0.0147 (its
# GroupNorm statistics and mid-block attention see a tile, not the frame). Bounds 1.5x.
TINY_MAX, TINY_MEAN = 0.28, 0.022


def test_tile_starts_cover_with_overlap():
    assert tile_starts(40, 64, 16) == [0]
    starts = tile_starts(72, 32, 8)
    assert starts[0] == 0 and starts[-1] == 72 - 32
    assert all(b - a <= 32 - 8 for a, b in zip(starts, starts[1:]))
    assert should_tile(72, 128, None) and not should_tile(40, 64, None) and not should_tile(72, 128, 0)


def test_blending_is_exact_for_a_pointwise_decoder():
    """A decoder with no spatial context (x8 nearest upsampling of a 1x1 conv): any tiling must
    reproduce it exactly, so every output pixel's blend weights sum to one and tiles land in place."""
    torch.manual_seed(0)
    weight = torch.randn(3, 4, 1, 1)

    def decode(z):
        return F.interpolate(F.conv2d(z, weight), scale_factor=8, mode="nearest")

    z = torch.randn(2, 4, 37, 70)
    whole = decode(z)
    for tile, overlap in ((16, 4), (32, 8), (24, 0)):
        torch.testing.assert_close(tiled_decode(decode, z, tile, overlap), whole, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="overlap"):
        tiled_decode(decode, z, 16, 16)


def test_tiny_vae_tiled_decode_is_close(ref_v):
    dc = ref_v[0]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 1, 40, 72, generator=g)
    whole = dc.decode(latents, tile=0)
    tiled = dc.decode(latents, tile=32)
    diff = (tiled - whole).abs()
    assert tiled.shape == whole.shape == (1, 3, 1, 320, 576)
    assert 0 < float(diff.mean()) <= TINY_MEAN and float(diff.max()) <= TINY_MAX, \
        (float(diff.mean()), float(diff.max()))
    # auto: small frames whole
    assert torch.equal(dc.decode(latents[..., :16, :16]), dc.decode(latents[..., :16, :16], tile=0))
