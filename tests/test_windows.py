"""Context windows (dynamicrafter/sampling/windows.py): the window lists and blend weights, the per-window
slicing of the latent, concat latent and image tokens, and the samplers with `window=`: off or
W >= T is the plain sampler bit for bit; one window covering the video equals the plain pass; two
windows give each frame its own window's output where only one holds it and the ramp in between."""
import pytest
import torch

import dynamicrafter
from dynamicrafter.config import QUERIES_PER_FRAME, TEXT_CONTEXT_LEN
from dynamicrafter.sampling.ddim import Conditioning, window_guided_output
from dynamicrafter.settings import Guidance
from dynamicrafter.sampling.windows import (WindowPlan, blend_weights, context_windows, plan_windows, take_context,
                                   take_frames)

CASES = [(16, 8, 4, "uniform"), (17, 8, 4, "uniform"), (32, 16, 4, "uniform"), (40, 16, 0, "uniform"),
         (9, 4, 3, "uniform"), (32, 16, 4, "looped"), (30, 16, 4, "looped"), (10, 4, 1, "looped"),
         (64, 16, 8, "looped")]


@pytest.mark.parametrize("frames,window,overlap,schedule", CASES)
def test_windows_cover_every_frame_and_weights_sum_to_one(frames, window, overlap, schedule):
    windows = context_windows(frames, window, overlap, schedule)
    weights = blend_weights(windows, frames, overlap)
    total = torch.zeros(frames, dtype=torch.float64)
    for idx, w in zip(windows, weights):
        assert len(idx) == window == len(set(idx)) and all(0 <= f < frames for f in idx)
        if schedule == "uniform":
            assert idx == list(range(idx[0], idx[0] + window))
        else:
            assert idx == [(idx[0] + k) % frames for k in range(window)]
        assert (w > 0).all()
        total.index_add_(0, torch.as_tensor(idx), w)
    torch.testing.assert_close(total, torch.ones(frames, dtype=torch.float64), rtol=0, atol=1e-12)
    # neighbours share at least `overlap` frames (the last uniform window is moved back, so it may share more)
    for a, b in zip(windows, windows[1:] + (windows[:1] if schedule == "looped" else [])):
        assert len(set(a) & set(b)) >= overlap
    if schedule == "looped":
        assert any(frames - 1 in idx and 0 in idx for idx in windows)   # the join of a loop is inside a window


def test_window_lists_and_ramp_values():
    assert context_windows(12, 6, 2, "uniform") == [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9], [6, 7, 8, 9, 10, 11]]
    assert context_windows(8, 6, 2, "looped") == [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 0, 1]]
    assert context_windows(8, 8, 4) == [list(range(8))] and plan_windows(8, 8) is None and plan_windows(8, None) is None
    # two windows overlapping by exactly O: the ramps cross, (j+1)/(O+1) up and (O-j)/(O+1) down
    windows = context_windows(10, 6, 2, "uniform")
    assert windows == [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9]]
    first, second = blend_weights(windows, 10, 2)
    assert first.tolist() == [1, 1, 1, 1, 2 / 3, 1 / 3] and second.tolist() == [1 / 3, 2 / 3, 1, 1, 1, 1]


def test_take_context_slices_the_image_tokens_of_the_window_frames():
    frames, c = 6, 5
    text = torch.randn(2, TEXT_CONTEXT_LEN, c)
    image = torch.arange(frames, dtype=torch.float32).repeat_interleave(QUERIES_PER_FRAME)
    image = image[None, :, None].expand(2, -1, c)
    ctx = torch.cat([text, image], dim=1)
    out = take_context(ctx, [4, 5, 0], frames)
    assert torch.equal(out[:, :TEXT_CONTEXT_LEN], text)
    assert out[0, TEXT_CONTEXT_LEN:, 0].tolist() == [4.0] * 16 + [5.0] * 16 + [0.0] * 16
    # not laid out per frame of this video (text only, or the model's 16*T_model tokens): every frame reads it all
    assert take_context(text, [0, 1], frames) is text
    assert take_context(ctx, [0, 1], frames + 1) is ctx
    x = torch.randn(1, 4, frames, 2, 2)
    assert torch.equal(take_frames(x, [2, 3])[:, :, 1], x[:, :, 3]) and take_frames(None, [0]) is None


class PerFrameModel:
    """A stand-in `dc` whose output at frame f reads only frame f: x_t, the concat latent and (when
    the context is laid out per frame) that frame's image tokens. Windows must not change it."""
    frames = 12

    def denoise(self, x, t, context, concat=None, fs=None):
        b, frames = x.shape[0], x.shape[2]
        k = context.shape[0] // b
        if context.shape[1] == TEXT_CONTEXT_LEN + QUERIES_PER_FRAME * frames:
            tokens = context[:, TEXT_CONTEXT_LEN:].unflatten(1, (frames, QUERIES_PER_FRAME)).mean(dim=(2, 3))
        else:
            tokens = context.mean(dim=(1, 2))[:, None].expand(-1, frames)
        out = 0.5 * x.repeat(k, 1, 1, 1, 1) + concat.repeat(k, 1, 1, 1, 1) * x.repeat(k, 1, 1, 1, 1).tanh()
        return out + tokens[:, None, :, None, None] + t.float().repeat(k)[:, None, None, None, None] / 1000


@pytest.mark.parametrize("overlap,schedule", [(4, "uniform"), (2, "uniform"), (0, "uniform"), (3, "looped")])
@pytest.mark.parametrize("per_frame", [True, False])
def test_windows_slice_latent_concat_and_tokens_at_the_right_frames(overlap, schedule, per_frame):
    model, frames = PerFrameModel(), PerFrameModel.frames
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, frames, 3, 3, generator=g)
    concat = torch.randn(2, 4, frames, 3, 3, generator=g)
    tokens = QUERIES_PER_FRAME * (frames if per_frame else 4)
    cond, uncond = (torch.randn(2, TEXT_CONTEXT_LEN + tokens, 8, generator=g) for _ in range(2))
    t = torch.full((2,), 500)
    args = (model, x, t, [cond, uncond], Conditioning(cond, uncond, concat=concat), Guidance(7.5))
    plain = window_guided_output(*args, None)
    windowed = window_guided_output(*args, plan_windows(frames, 5, overlap, schedule))
    torch.testing.assert_close(windowed, plain, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny(tiny_random):
    """conftest's tiny random model with 8-frame inputs (twice its trained length)."""
    dc = tiny_random[0]
    g = torch.Generator().manual_seed(1)
    frames = 8
    ctx = [torch.randn(1, TEXT_CONTEXT_LEN + QUERIES_PER_FRAME * frames, 64, generator=g) for _ in range(2)]
    return dc, torch.randn(1, 4, frames, 8, 8, generator=g), torch.randn(1, 4, frames, 8, 8, generator=g), ctx


def test_one_window_over_the_whole_video_is_the_plain_pass(tiny):
    dc, x_T, concat, contexts = tiny
    frames = x_T.shape[2]
    whole = WindowPlan(frames, [list(range(frames))], [torch.ones(frames, dtype=torch.float64)])
    t = torch.full((1,), 700)
    with torch.no_grad():
        c, g = Conditioning(contexts[0], contexts[1], concat=concat), Guidance(7.5, 1.5, 0.7)
        plain = window_guided_output(dc, x_T, t, contexts, c, g, None)
        windowed = window_guided_output(dc, x_T, t, contexts, c, g, whole)
    assert torch.equal(windowed, plain)


def test_two_windows_differ_from_plain_only_as_blended(tiny):
    """Frames held by one window are exactly that window's UNet output; the shared ones the ramp
    between the two; the result differs from one pass over all frames (temporal layers)."""
    dc, x_T, concat, contexts = tiny
    frames, t = x_T.shape[2], torch.full((1,), 700)
    plan = plan_windows(frames, 5, 2)
    assert plan.windows == [[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]]
    g = Guidance(7.5, None, 0.7)
    with torch.no_grad():
        windowed = window_guided_output(dc, x_T, t, contexts, Conditioning(contexts[0], concat=concat), g, plan=plan)
        plain = window_guided_output(dc, x_T, t, contexts, Conditioning(contexts[0], concat=concat), g, plan=None)
        parts = [window_guided_output(dc, take_frames(x_T, idx), t, [take_context(c, idx, frames) for c in contexts],
                                      Conditioning(contexts[0], concat=take_frames(concat, idx)), g, plan=None)
                 for idx in plan.windows]
    a, b = parts
    assert torch.equal(windowed[:, :, :3], a[:, :, :3]) and torch.equal(windowed[:, :, 5:], b[:, :, 2:])
    w = torch.tensor([1, 2]) / 3      # the second window's ramp over the 2 shared frames
    expected = a[:, :, 3:] * (1 - w)[:, None, None] + b[:, :, :2] * w[:, None, None]
    torch.testing.assert_close(windowed[:, :, 3:5], expected, rtol=1e-6, atol=1e-6)
    assert (windowed - plain).abs().max() > 1e-3


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_window_off_or_not_smaller_than_the_video_is_bit_identical(tiny, solver):
    dc, x_T, concat, (cond, uncond) = tiny
    kw = dict(solver=solver, concat=concat, fs=24, steps=3, cfg_text=7.5, guidance_rescale=0.7,
              eta=1.0 if solver == "ddim" else 0.0)
    with torch.no_grad():
        plain = dynamicrafter.sample(dc, x_T, cond, uncond, generator=torch.Generator().manual_seed(3), **kw)
        for window in (x_T.shape[2], 64):
            same = dynamicrafter.sample(dc, x_T, cond, uncond, generator=torch.Generator().manual_seed(3),
                                        window=window, window_overlap=2, window_schedule="looped", **kw)
            assert torch.equal(same, plain)
        windowed = dynamicrafter.sample(dc, x_T, cond, uncond, generator=torch.Generator().manual_seed(3),
                                        window=4, window_overlap=2, **kw)
    assert windowed.shape == plain.shape and torch.isfinite(windowed).all() and not torch.equal(windowed, plain)


def test_sample_ddim_default_is_the_reference_sampler_bit_for_bit(ref_v):
    """window=None and window >= T run exactly the sampler the parity tests hold to the official one."""
    dc, ref, manifest = ref_v
    frames = manifest["frames"]
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(1, 4, frames, *manifest["latent_hw"], generator=g)
    concat = torch.randn(1, 4, frames, *manifest["latent_hw"], generator=g)
    n_img = dc.resampler.cfg.num_queries * dc.resampler.cfg.video_length
    cond, uncond = (torch.randn(1, TEXT_CONTEXT_LEN + n_img, dc.unet.cfg.context_dim, generator=g) for _ in range(2))
    kw = dict(concat=concat, fs=24, steps=4, cfg_text=7.5, guidance_rescale=0.7, eta=1.0)
    with torch.no_grad():
        runs = [dynamicrafter.sample_ddim(dc, x_T, cond, uncond, generator=torch.Generator().manual_seed(9), **kw,
                                          **extra) for extra in ({}, dict(window=None), dict(window=frames),
                                                                 dict(window=frames + 8, window_overlap=7))]
        windowed = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, generator=torch.Generator().manual_seed(9),
                                             window=frames // 2 + 2, window_overlap=2, **kw)
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    assert not torch.equal(windowed, runs[0]) and torch.isfinite(windowed).all()


def test_windows_sample_videos_longer_than_one_unet_call(tiny):
    dc, _, _, (cond, uncond) = tiny
    frames = 70
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(1, 4, frames, 8, 8, generator=g)
    concat = torch.randn(1, 4, 1, 8, 8, generator=g).expand(-1, -1, frames, -1, -1)
    stats = {}
    with torch.no_grad():
        out = dynamicrafter.sample(dc, x_T, cond, uncond, concat=concat, fs=24, steps=1, cfg_text=7.5,
                                   window=32, window_overlap=8, stats=stats)
    assert out.shape == x_T.shape and torch.isfinite(out).all()
    assert stats["evaluations"] == 2 * 3     # guidance branches x windows [0..31], [24..55], [38..69]
    with pytest.raises(ValueError, match="pass window=16"):
        dynamicrafter.sample_ddim(dc, x_T, cond, uncond, concat=concat, fs=24, steps=1)
    with pytest.raises(ValueError, match="use cache_interval=1 with windows"):
        dynamicrafter.sample(dc, x_T, cond, uncond, concat=concat, fs=24, steps=2, cache_interval=2, window=32)


def test_animate_and_the_cli_sample_long_videos_in_windows(tmp_path, monkeypatch, tiny_ckpt):
    """The headless entry points pass the window arguments to the sampler: 20 frames of a model
    trained on 8, in windows of 8, from the command line."""
    from dynamicrafter import cli, pipeline
    seen = []

    def recording_sample(*a, **kw):
        seen.append(kw)
        return dynamicrafter.sample(*a, **kw)
    monkeypatch.setattr(pipeline, "sample", recording_sample)
    image = tmp_path / "in.png"
    image.write_bytes((tiny_ckpt.parent / "inputs" / "single" / "image.png").read_bytes())
    out = tmp_path / "o.png"
    assert cli.main(["animate", "--ckpt", str(tiny_ckpt), "--image", str(image), "--prompt", "x", "--out", str(out),
                     "--steps", "2", "--frames", "20", "--width", "64", "--height", "64", "--window", "8",
                     "--window-overlap", "2"]) == 0
    assert out.is_file() and out.stat().st_size > 0
    assert len(seen) == 1 and seen[0]["windows"] == dynamicrafter.Windows(8, 2, "uniform")
    with pytest.raises(ValueError, match="frames must be an integer in 2..64, got 80"):   # one pass: up to 64
        dynamicrafter.animate(dynamicrafter.load_model(str(tiny_ckpt)), torch.zeros(1, 3, 64, 64), "x", frames=80,
                              height=64, width=64, steps=1)
