"""Sampler behaviour beyond the reference cases: eta > 0 on a zero-SNR schedule, supplied
per-step noise, argument checks, and the image-only third branch."""
import pytest
import torch

import dynamicrafter
from dynamicrafter.sampling.ddim import guidance_contexts, guided_output, image_only_context


@pytest.fixture(scope="module")
def tiny(tiny_random):
    dc, x_T, concat, cond, uncond = tiny_random
    return dc, x_T, concat, (cond, uncond)


def test_eta_one_on_zero_snr_is_finite_and_noise_is_used(tiny):
    dc, x_T, concat, (cond, uncond) = tiny
    assert dc.alphas_cumprod[-1] == 0   # first trailing step sits at alpha_bar = 0
    noise = [torch.randn_like(x_T) for _ in range(5)]
    kw = dict(concat=concat, fs=24, steps=5, cfg_text=7.5, eta=1.0, guidance_rescale=0.7)
    with torch.no_grad():
        a = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, noise=noise, **kw)
        b = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, noise=noise, **kw)
        c = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, noise=[n * 0 for n in noise], **kw)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_dual_cfg_derives_the_image_only_branch(tiny):
    dc, x_T, concat, (cond, uncond) = tiny
    kw = dict(concat=concat, fs=24, steps=3, cfg_text=7.5, cfg_img=1.5)
    with torch.no_grad():
        derived = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, **kw)
        explicit = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, image_only_context(cond, uncond), **kw)
        # cfg_img == cfg_text reduces dual CFG to single CFG mathematically
        dual_eq = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, concat=concat, fs=24, steps=3, cfg_text=5.0,
                                            cfg_img=5.0)
        single = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, concat=concat, fs=24, steps=3, cfg_text=5.0)
    assert torch.equal(derived, explicit)
    torch.testing.assert_close(dual_eq, single, rtol=1e-4, atol=1e-4)


def test_text_only_guidance_runs_two_branches_with_the_dual_sum(tiny):
    """Dual CFG at cfg_img 1 is uncond_img + cfg_text (cond - uncond_img): the unconditional branch
    cancels, so it is evaluated as single CFG against the image-only branch."""
    dc, x_T, concat, (cond, uncond) = tiny
    img_only = image_only_context(cond, uncond)
    contexts, cfg_img = guidance_contexts(cond, uncond, None, 3.0, 1.0)
    assert cfg_img is None and len(contexts) == 2
    assert torch.equal(contexts[0], cond) and torch.equal(contexts[1], img_only)
    branches = [cond, uncond, img_only]
    outs = [torch.randn_like(x_T) for _ in branches]      # a different model output per branch

    def denoise(x, t, ctx):
        return torch.cat([outs[next(i for i, b in enumerate(branches) if torch.equal(b, c))]
                          for c in ctx.split(cond.shape[0])])
    for rescale in (0.0, 0.7):
        three = guided_output(denoise, x_T, None, branches, 3.0, 1.0, rescale)
        two = guided_output(denoise, x_T, None, contexts, 3.0, cfg_img, rescale)
        torch.testing.assert_close(two, three, rtol=1e-5, atol=1e-5)
    with torch.no_grad():     # the sampler takes it: single CFG against the image-only branch
        a = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, concat=concat, fs=24, steps=3, cfg_text=3.0, cfg_img=1.0)
        b = dynamicrafter.sample_ddim(dc, x_T, cond, img_only, concat=concat, fs=24, steps=3, cfg_text=3.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw,match", [(dict(steps=0), "steps"), (dict(eta=1.5), "eta"),
                                      (dict(guidance_rescale=-0.1), "guidance_rescale"),
                                      (dict(cfg_text=float("nan")), "cfg_text"),
                                      (dict(spacing="cosine"), "spacing")])
def test_bad_sampling_arguments_are_named(tiny, kw, match):
    dc, x_T, concat, (cond, uncond) = tiny
    args = dict(concat=concat, fs=24, steps=2, cfg_text=7.5) | kw
    with pytest.raises(ValueError, match=match):
        dynamicrafter.sample_ddim(dc, x_T, cond, uncond, **args)


def test_concat_missing_or_extra_is_explained(tiny):
    dc, x_T, concat, (cond, _) = tiny
    with pytest.raises(ValueError, match="needs the image latent"):
        dc.denoise(x_T, torch.tensor([10]), cond, None, None)


def test_values_equal_the_deprecated_loose_keywords_bit_for_bit(tiny):
    """Issue #26: a Conditioning + Guidance + Schedule call is the old tensors-and-keywords call exactly;
    the old call warns (DeprecationWarning naming the values to pass), the new one does not."""
    import warnings

    from dynamicrafter.settings import Guidance, Schedule
    dc, x_T, concat, (cond, uncond) = tiny
    g = torch.Generator()
    with torch.no_grad(), pytest.warns(DeprecationWarning, match=r"cond=Conditioning\(\.\.\.\)"):
        old = dynamicrafter.sample(dc, x_T, cond, uncond, concat=concat, fs=24, steps=3, cfg_text=7.5, cfg_img=1.5,
                                   eta=1.0, start=1, generator=g.manual_seed(3))
    c = dynamicrafter.Conditioning(cond, uncond, concat=concat, fs=24)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        new = dynamicrafter.sample(dc, x_T, c, guidance=Guidance(7.5, 1.5),
                                   schedule=Schedule(3, eta=1.0, start=1), generator=g.manual_seed(3))
    assert torch.equal(old, new)
    with pytest.raises(TypeError, match="pass no contexts after it"):
        dynamicrafter.sample_ddim(dc, x_T, c, uncond)
    with pytest.raises(TypeError, match="unexpected keyword argument 'stpes'"):
        dynamicrafter.sample_ddim(dc, x_T, c, stpes=3)
