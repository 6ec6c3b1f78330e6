"""Long shots in the library (dynamicrafter.sampling.long_shots): frame picking, chained segments, and
continuing a clip with its last frames pinned, on the tiny reference model."""
from __future__ import annotations

import pytest
import torch

from dynamicrafter.sampling.long_shots import (chain_segments, continue_clip, continue_latents, frame_index,
                                               pinned_levels, segment_joins, segments_needed)
from dynamicrafter.sampling.ddim import sample_ddim


# ------------------------------------------------------------------------------ 1. picking a frame
@pytest.mark.parametrize("which,index,expected", [("first", 7, 0), ("last", 0, 9), ("index", 3, 3), ("index", -1, 9),
                                                  ("index", -10, 0)])
def test_frame_index(which, index, expected):
    assert frame_index(10, which, index) == expected


@pytest.mark.parametrize("count,which,index,needle", [(10, "index", 10, "outside the video's 10 frames"),
                                                      (10, "index", -11, "outside"), (0, "first", 0, "no frames"),
                                                      (5, "middle", 0, "which must be one of")])
def test_frame_index_errors(count, which, index, needle):
    with pytest.raises(ValueError, match=needle):
        frame_index(count, which, index)


# ------------------------------------------------------------------------------ 2. chained segments
def test_chain_segments_drops_the_repeated_frame_and_starts_from_the_last():
    seen = []

    def animate_from(k, image):          # a segment: its start image, then 10k+1, 10k+2, ...
        seen.append(float(image[0]))
        return torch.cat([image, torch.arange(1, 4, dtype=torch.float32) + 10 * k])

    out = chain_segments(animate_from, torch.tensor([-1.0]), total=8, segment=4)
    assert segments_needed(8, 4) == 3 and segment_joins(8, 4) == [3, 6]
    assert out.tolist() == [-1, 1, 2, 3, 11, 12, 13, 21]
    assert seen == [-1.0, 3.0, 13.0]     # each segment starts on the previous one's last frame
    assert segments_needed(4, 4) == 1 and segment_joins(4, 4) == []
    with pytest.raises(ValueError, match="at least 2"):
        segments_needed(8, 1)


def test_chain_segments_refuses_a_segment_of_the_wrong_length():
    with pytest.raises(ValueError, match="segment 0 has 2 frames, expected 4"):
        chain_segments(lambda k, im: torch.cat([im, im]), torch.zeros(1), 8, 4)


# ------------------------------------------------------------------------------ 3. continuing a clip
class OracleDenoiser:
    """The model with its UNet replaced by the exact v-prediction for a known clean latent z:
    DDIM from x_T then walks the forward process's levels, so `pinned_levels` can be checked
    against the sampler's own trajectory (dynamic x0 rescale included)."""

    def __init__(self, dc, z):
        self.dc, self.z = dc, z

    def __getattr__(self, name):
        return getattr(self.dc, name)

    def denoise(self, x, t, context, concat, fs):
        ab = self.dc.alphas_cumprod[t[0]].double()
        s = self.dc.scale_arr[t[0]].double()
        signal = ab.sqrt() * s * self.z.double()
        eps = x.double() if ab == 0 else (x.double() - signal) / (1 - ab).sqrt()
        return (ab.sqrt() * eps - (1 - ab).sqrt() * s * self.z.double()).to(x)


def test_pinned_levels_are_the_samplers_own_levels(ref_v):
    dc = ref_v[0]
    assert dc.variant["dynamic_rescale_base"] is not None     # the x0 rescale is part of what is checked
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 3, 4, 4, generator=g)
    x_T = torch.randn(1, 4, 3, 4, 4, generator=g)
    ctx = torch.zeros(1, 77 + 16 * 3, dc.cfg.unet.context_dim)
    steps = 6
    levels = pinned_levels(dc, steps, "uniform_trailing")
    errs = []

    def check(i, total, x, x0):
        signal, noise = levels[i]
        # with the oracle and eta 0, x = signal * z + noise * x_T at every level (eps stays x_T)
        errs.append(float((x - (signal * z + noise * x_T)).abs().max()))

    sample_ddim(OracleDenoiser(dc, z), x_T, ctx, concat=torch.zeros(1, 4, 3, 4, 4), fs=24, steps=steps,
                eta=0.0, spacing="uniform_trailing", callback=check)
    assert len(errs) == steps and max(errs) < 1e-4, errs
    assert levels[-1][0] == pytest.approx(float(dc.scale_arr[int(round(1000 / steps)) - 1]) *
                                          float(dc.alphas_cumprod[0].sqrt()), rel=1e-6)


def _tiny_clip(dc, frames=6):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(1, 3, frames, 64, 128, generator=g) * 2 - 1), dc


def test_continue_clip_keeps_the_clip_and_adds_frames_minus_overlap(ref_v):
    clip, dc = _tiny_clip(ref_v[0])
    out = continue_clip(dc, clip, "a cat", frames=8, overlap=3, steps=3, seed=1)
    assert out.shape == (1, 3, 6 + 8 - 3, 64, 128)
    assert torch.equal(out[:, :, :6], clip)
    assert torch.isfinite(out).all()
    again = continue_clip(dc, clip, "a cat", frames=8, overlap=3, steps=3, seed=1)
    assert torch.equal(out, again)                               # seeded
    other = continue_clip(dc, clip, "a cat", frames=8, overlap=3, steps=3, seed=1, condition="clip_end")
    assert not torch.equal(out[:, :, 6:], other[:, :, 6:])       # the conditioning image matters


def test_continue_latents_pins_the_overlap_and_changes_the_new_frames(ref_v):
    dc = ref_v[0]
    g = torch.Generator().manual_seed(0)
    known = torch.randn(1, 4, 2, 8, 16, generator=g)
    x_T = torch.randn(1, 4, 5, 8, 16, generator=g)
    ctx = torch.randn(1, 77 + 16 * 5, dc.cfg.unet.context_dim, generator=g)
    concat = torch.randn(1, 4, 5, 8, 16, generator=g)
    kw = dict(concat=concat, fs=24, steps=4, eta=1.0, spacing="uniform_trailing")
    with torch.inference_mode():
        pinned = continue_latents(dc, known, x_T, ctx, generator=torch.Generator().manual_seed(1), **kw)
        free = sample_ddim(dc, x_T.clone(), ctx, generator=torch.Generator().manual_seed(1), **kw)
    signal, noise = pinned_levels(dc, 4, "uniform_trailing")[-1]
    assert (pinned[:, :, :2] - signal * known).abs().max() < 5 * noise     # the clip's latents, barely noised
    assert (pinned[:, :, 2:] - free[:, :, 2:]).abs().max() > 1e-3          # the new frames see them
    with pytest.raises(ValueError, match="overlap must be in 1..4"):
        continue_latents(dc, torch.zeros(1, 4, 5, 8, 16), x_T, ctx, **kw)
    with pytest.raises(ValueError, match="do not fit the window"):
        continue_latents(dc, torch.zeros(1, 4, 2, 4, 4), x_T, ctx, **kw)


def test_continue_clip_errors(ref_v):
    clip, dc = _tiny_clip(ref_v[0], frames=2)
    with pytest.raises(ValueError, match="longer than the clip"):
        continue_clip(dc, clip, "a cat", frames=8, overlap=3, steps=2)
    with pytest.raises(ValueError, match="overlap must be in 1..7"):
        continue_clip(dc, clip, "a cat", frames=8, overlap=8, steps=2)
    with pytest.raises(ValueError, match="condition must be"):
        continue_clip(dc, clip, "a cat", frames=8, overlap=1, steps=2, condition="middle")
    with pytest.raises(ValueError, match="clip must be a video"):
        continue_clip(dc, clip[0], "a cat", frames=8, overlap=1, steps=2)
