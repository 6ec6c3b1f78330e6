"""Directing the motion in the library (dynamicrafter.sampling.motion + animate): start step, video to video,
motion amount, motion brush, prompt schedule; identities on the bundled demo model (64x64)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dynamicrafter
from dynamicrafter.sampling.motion import (MaskPin, analytic_init, fit_mask, init_latent, parse_prompt_schedule,
                                  paste_back, pixel_mask, prompt_schedule, schedule_weights, start_step)
from dynamicrafter.sampling.ddim import sample_ddim
from dynamicrafter.sampling.solvers import noise_levels, sample

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo" / "dynamicrafter_demo.safetensors"
KW = dict(prompt="a red circle moves to the right", steps=4, seed=3, frames=8)


@pytest.fixture(scope="module")
def demo():
    if not DEMO.is_file():
        pytest.skip(f"{DEMO} not found (the demo model is built by training/; see README)")
    dc = dynamicrafter.load_model(str(DEMO)).float()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    return dc, image


def _inputs(dc, frames=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(1, 4, frames, 8, 8, generator=g)
    ctx = torch.randn(1, 77 + 16, dc.cfg.unet.context_dim, generator=g)
    concat = torch.randn(1, 4, 1, 8, 8, generator=g).expand(-1, -1, frames, -1, -1)
    return x_T, ctx, concat


# ------------------------------------------------------------------------------ start step
def test_start_step_maps_amounts_to_steps():
    assert [start_step(10, s) for s in (1.0, 0.75, 0.5, 0.0)] == [0, 2, 5, 10]
    assert start_step(7, 1.0, "uniform") == 0 and start_step(7, 0.0, "uniform") == 8   # "uniform" makes 8
    for bad in (1.5, -0.1, float("nan"), "1", True):
        with pytest.raises(ValueError, match="strength must be a number in \\[0, 1\\]"):
            start_step(10, bad)


def test_sampling_from_step_k_continues_the_full_run_bit_for_bit(demo):
    dc, _ = demo
    x_T, ctx, concat = _inputs(dc)
    kw = dict(concat=concat, fs=24, steps=5, eta=0.0, cfg_text=1.0)
    seen = {}
    with torch.inference_mode():
        full = sample_ddim(dc, x_T, ctx, callback=lambda i, n, x, x0: seen.setdefault(i, x.clone()), **kw)
        tail = sample_ddim(dc, seen[1], ctx, start=2, **kw)
        same = sample_ddim(dc, x_T, ctx, start=0, **kw)
        none = sample_ddim(dc, x_T, ctx, start=5, **kw)
    assert torch.equal(tail, full) and torch.equal(same, full) and torch.equal(none, x_T)
    with pytest.raises(ValueError, match="start"):
        sample_ddim(dc, x_T, ctx, start=6, **kw)
    with pytest.raises(ValueError, match="plain DDIM"):
        sample(dc, x_T, ctx, solver="dpmpp_2m", start=1, **kw)


# ------------------------------------------------------------------------------ video to video
def test_init_latent_levels(demo):
    dc, _ = demo
    x_T, _, _ = _inputs(dc)
    z = torch.randn_like(x_T)
    lv = noise_levels(dc, 5, "uniform_trailing")
    assert init_latent(dc, z, x_T, 5, "uniform_trailing", 0) is x_T
    assert torch.equal(init_latent(dc, z, x_T, 5, "uniform_trailing", 5), z)
    mid = init_latent(dc, z, x_T, 5, "uniform_trailing", 2)
    assert torch.allclose(mid, lv.alpha[2] * z + lv.sigma[2] * x_T)
    with pytest.raises(ValueError, match="same frames and size"):
        init_latent(dc, z[:, :, :2], x_T, 5, "uniform_trailing", 2)


def test_strength_one_is_todays_sampler_and_zero_returns_the_clip(demo):
    dc, image = demo
    clip = dynamicrafter.animate(dc, image, **KW)
    noisy = dynamicrafter.animate(dc, image, **dict(KW, seed=11)).clamp(-1, 1)     # another clip to start from
    again = dynamicrafter.animate(dc, image, init_video=noisy, strength=1.0, **KW)
    assert torch.equal(again, clip)                                    # s = 1: pure noise, bit-for-bit
    back = dynamicrafter.animate(dc, image, init_video=noisy, strength=0.0, **KW)
    with torch.inference_mode():
        z = dc.encode_first_stage(noisy[0].transpose(0, 1), sample=False)
        roundtrip = dc.decode(z.transpose(0, 1)[None])
    assert torch.equal(back, roundtrip)                                # s = 0: the clip's latents, decoded
    err_vae = (roundtrip - noisy).pow(2).mean()
    half = dynamicrafter.animate(dc, image, init_video=noisy, strength=0.5, **KW)
    assert (half - noisy).pow(2).mean() > err_vae                      # s = 0.5 re-samples part of it
    assert not torch.equal(half, clip)


def test_v2v_errors(demo):
    dc, image = demo
    with pytest.raises(ValueError, match="give init_video"):
        dynamicrafter.animate(dc, image, strength=0.5, **KW)
    with pytest.raises(ValueError, match="init_video must be a clip"):
        dynamicrafter.animate(dc, image, init_video=torch.zeros(3, 8, 64, 64), strength=0.5, **KW)
    with pytest.raises(ValueError, match="has 4 frames but frames=8"):
        dynamicrafter.animate(dc, image, init_video=torch.zeros(1, 3, 4, 64, 64), strength=0.5, **KW)


# ------------------------------------------------------------------------------ motion amount
def test_analytic_init_is_the_moment_matched_gaussian(demo):
    dc, _ = demo
    x_T, _, _ = _inputs(dc)
    z_img = torch.randn(1, 4, 8, 8)
    assert analytic_init(dc, z_img, x_T, 5, "uniform_trailing", 0) is x_T
    lv = noise_levels(dc, 5, "uniform_trailing")
    a, s = lv.alpha[3], lv.sigma[3]
    out = analytic_init(dc, z_img, x_T, 5, "uniform_trailing", 3, spread=0.25)
    assert torch.allclose(out, a * z_img[:, :, None] + (a * a * 0.25 + s * s) ** 0.5 * x_T)


def test_motion_one_is_todays_sampler_and_lower_stays_nearer_the_image(demo):
    dc, image = demo
    kw = dict(KW, eta=1.0)
    clip = dynamicrafter.animate(dc, image, **kw)
    assert torch.equal(dynamicrafter.animate(dc, image, motion=1.0, **kw), clip)
    still = dynamicrafter.animate(dc, image, motion=0.0, **kw)
    with torch.inference_mode():
        c = dynamicrafter.pipeline.image_conditioning(dc, image, [KW["prompt"]], 8,
                                                      generator=torch.Generator().manual_seed(3))
        assert torch.equal(still, dc.decode(c.concat))                 # m = 0: the image latent on every frame
    with pytest.raises(ValueError, match="motion must be a number"):
        dynamicrafter.animate(dc, image, motion=2.0, **kw)
    with pytest.raises(ValueError, match="needs an image and no init_video"):
        dynamicrafter.animate(dc, image, motion=0.5, init_video=clip, strength=0.5, **kw)


# ------------------------------------------------------------------------------ motion brush
def test_fit_mask_resizes_softens_and_checks():
    m = torch.zeros(64, 64)
    m[:, 32:] = 1
    hard = fit_mask(m, 5, 8, 8, feather=0)
    assert hard.shape == (1, 1, 5, 8, 8) and torch.equal(hard[0, 0, 0, :, 4:], torch.ones(8, 4))
    assert torch.equal(hard[0, 0, :, :, :4], torch.zeros(5, 8, 4))
    soft = fit_mask(m, 5, 8, 8, feather=1.0)
    assert 0 < soft[0, 0, 0, 0, 3] < 0.5 < soft[0, 0, 0, 0, 4] < 1     # a soft edge across the border
    assert soft[0, 0, 0, 0, 0] < 0.01 and soft[0, 0, 0, 0, 7] > 0.99
    per_frame = fit_mask(torch.stack([m, 1 - m]), 4, 8, 8, feather=0)  # 2 mask frames over 4 video frames
    assert torch.equal(per_frame[0, 0, 1], hard[0, 0, 0]) and torch.equal(per_frame[0, 0, 2], 1 - hard[0, 0, 0])
    for bad, needle in ((torch.zeros(2, 2, 2, 2), "must be an \\(H, W\\)"), (m * 2, "in \\[0, 1\\]"),
                        (m * float("nan"), "in \\[0, 1\\]")):
        with pytest.raises(ValueError, match=needle):
            fit_mask(bad, 4, 8, 8)


def test_mask_pin_holds_the_image_outside_the_mask_at_every_step(demo):
    dc, _ = demo
    x_T, ctx, concat = _inputs(dc)
    z = concat[:, :, :1]
    m = torch.zeros(64, 64)
    m[:, 32:] = 1
    mask = fit_mask(m, 6, 8, 8, feather=0)
    lv = noise_levels(dc, 5, "uniform_trailing")
    resid = []

    def record(i, n, x, x0):        # outside: (x - alpha z) / sigma is the fresh N(0, 1) draw
        if i < n - 1:
            resid.append(float(((x[..., :4] - lv.alpha[i + 1] * z[..., :4]) / lv.sigma[i + 1]).std()))

    pin = MaskPin(dc, z, mask, 5, "uniform_trailing", torch.Generator().manual_seed(2), record)
    with torch.inference_mode():
        x = pin.apply(x_T, 0)
        out = sample_ddim(dc, x, ctx, concat=concat, fs=24, steps=5, eta=1.0, callback=pin,
                          generator=torch.Generator().manual_seed(4))
        free = sample_ddim(dc, x_T, ctx, concat=concat, fs=24, steps=5, eta=1.0,
                           generator=torch.Generator().manual_seed(4))
    assert torch.equal(out[..., :4], z.expand(-1, -1, 6, -1, -1)[..., :4])   # final: the image latent
    assert all(0.8 < r < 1.2 for r in resid), resid
    assert (out[..., 4:] - free[..., 4:]).abs().max() > 1e-3                   # inside sees the held part
    assert not torch.equal(out[..., 4:], z.expand(-1, -1, 6, -1, -1)[..., 4:])


def test_pixel_mask_is_the_latent_mask_at_pixel_size():
    m = torch.zeros(64, 64)
    m[:, 32:] = 1
    hard = pixel_mask(m, 3, 64, 64, feather=0)
    assert hard.shape == (1, 1, 3, 64, 64)
    # latent columns 0-3 hold, 4-7 move: pixel columns up to 27 are 0, from 36 on 1, a bilinear ramp between
    assert torch.equal(hard[..., :28], torch.zeros(1, 1, 3, 64, 28))
    assert torch.equal(hard[..., 36:], torch.ones(1, 1, 3, 64, 28))
    ramp = hard[0, 0, 0, 0, 27:37]
    assert (ramp[1:] > ramp[:-1]).all() and abs(float(hard[0, 0, 0, 0, 31] + hard[0, 0, 0, 0, 32]) - 1) < 1e-6
    soft = pixel_mask(m, 3, 64, 64, feather=1.0)
    assert 0 < soft[0, 0, 0, 0, 20] < hard[0, 0, 0, 0, 30] < soft[0, 0, 0, 0, 30] < 0.5       # a wider soft edge
    with pytest.raises(ValueError, match="multiples of 8"):
        pixel_mask(m, 3, 60, 64)


def test_paste_back_blends_the_image_into_the_held_part():
    g = torch.Generator().manual_seed(1)
    video, image = torch.rand(2, 3, 4, 16, 24, generator=g), torch.rand(1, 3, 16, 24, generator=g)
    m = torch.zeros(16, 24)
    m[:, 12:] = 1
    pm = pixel_mask(m, 4, 16, 24, feather=0.5)
    out = paste_back(video, image, m, feather=0.5)
    assert torch.allclose(out, pm * video + (1 - pm) * image[:, :, None])
    assert out.dtype == video.dtype and paste_back(video.half(), image, m).dtype == torch.float16
    assert torch.equal(paste_back(video, image, torch.ones(16, 24), feather=0), video)       # all free: unchanged
    assert torch.equal(paste_back(video, image, torch.zeros(8, 8), feather=0), image[:, :, None].expand_as(video))
    for bad in (image[..., :8], torch.rand(3, 3, 16, 24), image[:, :1]):
        with pytest.raises(ValueError, match="does not fit the video"):
            paste_back(video, bad, m)


def test_animate_motion_brush_keeps_the_image_outside(demo):
    dc, image = demo
    m = torch.zeros(64, 64)
    m[:, 32:] = 1
    last = {}
    video = dynamicrafter.animate(dc, image, motion_mask=m, mask_feather=0,
                                  callback=lambda i, n, x, x0: last.update(x=x.clone()), **KW)
    with torch.inference_mode():
        c = dynamicrafter.pipeline.image_conditioning(dc, image, [KW["prompt"]], 8,
                                                      generator=torch.Generator().manual_seed(3))
        round_trip = dc.decode(c.concat)
        decoded = dc.decode(last["x"])        # the sampled latent (held part: the image latent), before the paste
    pm = pixel_mask(m, 8, 64, 64, feather=0)
    still = image[:, :, None].expand_as(video)
    assert torch.allclose(video, pm * decoded + (1 - pm) * still, atol=1e-6)       # the paste-back rule
    assert torch.equal(video[..., :28], still[..., :28])                          # mask 0: the input's pixels
    assert torch.equal(video[..., 36:], decoded[..., 36:])                        # mask 1: the decoded video
    # the held half: within the VAE's own reconstruction error of the input, and nearer than the held latent's
    # decode, which the decoder's frame-wide GroupNorms move with the other half
    held, vae_err, latent_only = [(v[..., :32] - still[..., :32]).abs().mean() for v in (video, round_trip, decoded)]
    assert held < vae_err / 4 and held < latent_only / 4, (held, vae_err, latent_only)
    assert (video[:, :, 1:, :, 36:] - video[:, :, :1, :, 36:]).abs().mean() > 0.02     # the free half moves


# ------------------------------------------------------------------------------ prompt schedule
def test_parse_prompt_schedule():
    assert parse_prompt_schedule("24: a storm rises | 0: a boat on a calm lake") == \
        [(0, "a boat on a calm lake"), (24, "a storm rises")]
    assert parse_prompt_schedule("a boat: calm") == [(0, "a boat: calm")]       # no key: one prompt
    with pytest.raises(ValueError, match="is not 'frame: prompt'"):
        parse_prompt_schedule("0: a boat | a storm")
    with pytest.raises(ValueError, match="twice"):
        parse_prompt_schedule("0: a | 0: b")
    assert schedule_weights([0, 24], 6) == [0.75, 0.25]
    assert schedule_weights([8, 24], 0) == [1.0, 0.0] and schedule_weights([8, 24], 30) == [0.0, 1.0]


def test_prompt_schedule_per_window(demo):
    dc, image = demo
    kw = dict(KW, frames=12, prompt="a red circle moves to the right")
    one = dynamicrafter.animate(dc, image, window=8, window_overlap=4, **kw)
    same = dynamicrafter.animate(dc, image, window=8, window_overlap=4,
                                 prompt_schedule="0: a red circle moves to the right", **kw)
    assert torch.equal(one, same)                 # a one-prompt schedule is the prompt
    moved = dynamicrafter.animate(dc, image, window=8, window_overlap=4,
                                  prompt_schedule="0: a red circle moves to the right | 11: a red circle moves to "
                                                  "the left", **kw)
    assert not torch.equal(one, moved)
    with torch.inference_mode():
        ps = prompt_schedule(dc.encode_text, "0: a | 8: b")
        texts = dc.encode_text(["a", "b"])
        ctx = torch.randn(2, 77 + 16, texts.shape[-1])
        out = ps.window_contexts([2, 3, 4, 5, 6], [ctx, ctx + 1])     # centre 4: halfway
    assert torch.allclose(out[0][:, :77], (0.5 * texts[0] + 0.5 * texts[1]).expand(2, -1, -1))
    assert torch.equal(out[0][:, 77:], ctx[:, 77:]) and torch.equal(out[1], ctx + 1)


# ------------------------------------------------------------------------------ CLI
def test_cli_motion_flags(demo, tmp_path, monkeypatch):
    from PIL import Image

    from dynamicrafter import cli, pipeline
    seen = []
    real = pipeline.animate

    def recording(*a, **kw):
        seen.append(kw)
        return real(*a, **kw)
    monkeypatch.setattr(pipeline, "animate", recording)
    repo = Path(__file__).resolve().parents[1]
    mask = tmp_path / "mask.png"
    Image.fromarray(((torch.arange(64)[None, :].expand(64, -1) >= 32) * 255).to(torch.uint8).numpy()).save(mask)
    clip = repo / "assets" / "examples" / "clip.mp4"
    out = tmp_path / "o.png"
    base = ["animate", "--ckpt", str(DEMO), "--image", str(repo / "assets" / "example.png"), "--prompt", "x",
            "--steps", "2", "--frames", "8", "--out", str(out)]
    assert cli.main(base + ["--mask", str(mask), "--mask-feather", "0.5", "--motion", "0.5",
                            "--prompt-schedule", "0: a | 4: b"]) == 0
    assert cli.main(base + ["--init-video", str(clip), "--strength", "0.5"]) == 0
    assert out.is_file()
    first, second = (kw["motion"] for kw in seen)       # the CLI passes one settings.Motion
    assert first.amount == 0.5 and first.feather == 0.5 and first.prompt_schedule == "0: a | 4: b"
    assert first.mask.shape == (64, 64) and set(first.mask.unique().tolist()) == {0.0, 1.0}
    assert second.init_video.shape[:3] == (1, 3, 8) and second.strength == 0.5
    assert -1 <= float(second.init_video.min()) and float(second.init_video.max()) <= 1


def test_animate_shot_and_motion_values_equal_the_deprecated_keywords(demo):
    """Issue #26: animate(shot=Shot(...), motion=Motion(...), schedule=...) is the old loose-keyword call
    bit for bit; the old call warns, naming the values to pass."""
    from dynamicrafter.settings import Motion, Schedule, Shot
    dc, image = demo
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1
    with pytest.warns(DeprecationWarning, match=r"motion=Motion\(\.\.\.\), shot=Shot\(\.\.\.\)"):
        old = dynamicrafter.animate(dc, image, "a boat", frames=6, seed=4, steps=3, motion_mask=mask, motion=0.6)
    new = dynamicrafter.animate(dc, image, "a boat", shot=Shot(frames=6, seed=4), motion=Motion(mask, amount=0.6),
                                schedule=Schedule(3, dc.variant["spacing"], 1.0))
    assert torch.equal(old, new)
    with pytest.raises(ValueError, match="leave schedule.start at 0"):
        dynamicrafter.animate(dc, image, "a boat", shot=Shot(frames=6), schedule=Schedule(3, start=1))
