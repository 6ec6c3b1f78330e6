"""The fast solvers (dynamicrafter.sampling.solvers): solver="ddim" is sample_ddim, the level formulation
reproduces the official DDIM, DPM-Solver++ 2M / UniPC reach the 50-step DDIM latent in few steps
with dual CFG + guidance rescale + dynamic x0 rescale on the zero-SNR v model, the step cache and
the CFG interval, the CLI flag."""
import math

import pytest
import torch

import dynamicrafter
from dynamicrafter.sampling.solvers import noise_levels, sample, unipc_coefficients

# stated in the README's Speed section: latent PSNR to 50-step DDIM of DPM-Solver++ 2M / UniPC in
# 15 steps on the tiny reference model (measured 41.5 dB; DDIM in 15 steps: 37.4 dB)
LATENT_PSNR_DB = 39.0


@pytest.fixture(scope="module")
def tiny(tiny_random):
    dc, x_T, concat, cond, uncond = tiny_random
    return dc, x_T, cond, uncond, dict(concat=concat, fs=24, cfg_text=7.5, cfg_img=1.5, guidance_rescale=0.7)


@pytest.fixture(scope="module")
def tiny_ref(tiny_ckpt):
    """The tiny reference checkpoint (random weights, official layout) at 64x64, 8 frames, its
    reference image and prompt, dual CFG + guidance rescale, and its 50-step DDIM latent."""
    from dynamicrafter.pipeline import fit_image, image_conditioning
    dc = dynamicrafter.load_model(str(tiny_ckpt)).eval()
    inputs = tiny_ckpt.parent / "inputs" / "single"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        c = image_conditioning(dc, fit_image(dynamicrafter.load_image(str(inputs / "image.png")), 64, 64),
                               [(inputs / "prompt.txt").read_text().strip()], 8, generator=g)
        x_T = torch.randn(1, 4, 8, 8, 8, generator=g)
        kw = dict(concat=c.concat, fs=24, cfg_text=7.5, cfg_img=1.5, guidance_rescale=0.7)
        ref = dynamicrafter.sample_ddim(dc, x_T, c.cond, c.uncond, steps=50, **kw)
    return dc, x_T, c.cond, c.uncond, kw, ref


def psnr(a, ref):
    """Latent PSNR with the reference's value range as the peak."""
    return 10 * math.log10(float((ref.max() - ref.min()) ** 2) / float(((a - ref) ** 2).mean()))


def test_model_is_the_zero_snr_v_setting_with_dynamic_rescale(tiny):
    dc = tiny[0]
    v = dc.variant
    assert v["parameterization"] == "v" and v["zero_snr"] and v["dynamic_rescale_base"] is not None
    lv = noise_levels(dc, 10)
    assert lv.alpha[0] == 0 and lv.t[0] == 999 and len(lv.alpha) == 11
    assert lv.scale[-1] < 1 and lv.scale[0] == pytest.approx(v["dynamic_rescale_base"])


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_solver_ddim_is_sample_ddim_bit_for_bit(tiny, eta):
    dc, x_T, cond, uncond, kw = tiny
    noise = [torch.randn_like(x_T) for _ in range(6)]
    with torch.no_grad():
        a = dynamicrafter.sample(dc, x_T, cond, uncond, solver="ddim", steps=6, eta=eta, noise=noise, **kw)
        b = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, steps=6, eta=eta, noise=noise, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_first_order_on_the_levels_is_the_official_ddim(tiny, eta):
    """DDIM written on the (alpha * scale, sigma) levels with a denoiser returning x0 / scale (the
    k-diffusion form the other solvers use): cfg_interval covering every step forces that path."""
    dc, x_T, cond, uncond, kw = tiny
    noise = [torch.randn_like(x_T) for _ in range(8)]
    with torch.no_grad():
        levels = sample(dc, x_T, cond, uncond, solver="ddim", steps=8, eta=eta, noise=noise, cfg_interval=(0, 999),
                        **kw)
        official = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, steps=8, eta=eta, noise=noise, **kw)
    torch.testing.assert_close(levels, official, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_fast_solver_reaches_50_step_ddim_in_15_steps(tiny_ref, solver):
    dc, x_T, cond, uncond, kw, ddim50 = tiny_ref
    stats = {}
    with torch.no_grad():
        fast = sample(dc, x_T, cond, uncond, solver=solver, steps=15, stats=stats, **kw)
        ddim15 = sample(dc, x_T, cond, uncond, solver="ddim", steps=15, **kw)
    assert stats == {"evaluations": 45, "cached": 0}        # 15 steps x 3 guidance branches
    assert torch.isfinite(fast).all()
    assert psnr(fast, ddim50) >= LATENT_PSNR_DB, psnr(fast, ddim50)
    assert psnr(fast, ddim50) > psnr(ddim15, ddim50) + 2      # and clearly closer than DDIM at 15


def test_cached_unet_forward_equals_the_unet(tiny):
    dc, x_T, cond, uncond, kw = tiny
    x = torch.cat([x_T, kw["concat"]], 1)
    ctx = torch.cat([cond, uncond, cond])
    t, fs = torch.tensor([500]), torch.tensor([24])
    with torch.no_grad():
        ref = dc.unet(x, t, ctx, fs)
        for depth in (0, 1):
            full, deep = dc.unet.forward_cut(x, t, ctx, fs, depth=depth)
            reused, _ = dc.unet.forward_cut(x, t, ctx, fs, depth=depth, deep=deep)
            assert torch.equal(full, ref)
            assert torch.equal(reused, ref)       # same step: reusing its own deep features changes nothing


def test_unipc_coefficients_tend_to_adams_weights():
    """As h -> 0 on an even grid, UniPC-bh2 becomes Adams: the order-2 corrector Adams-Moulton 3
    (5/12 new, 8/12 last, -1/12 older), the order-3 predictor Adams-Bashforth 3 (23/12, -16/12, 5/12)."""
    assert unipc_coefficients([], 0.5, corrector=False) == []
    assert unipc_coefficients([], 0.5, corrector=True) == [0.5]
    assert unipc_coefficients([-1.0], 0.5, corrector=False) == [0.5]
    r_old, r_new = unipc_coefficients([-1.0], 1e-4, corrector=True)
    assert (r_new, 1 + r_old - r_new, -r_old) == pytest.approx((5 / 12, 8 / 12, -1 / 12), abs=1e-4)
    r1, r2 = unipc_coefficients([-1.0, -2.0], 1e-4, corrector=False)
    assert (1 + r1 + r2 / 2, -r1, -r2 / 2) == pytest.approx((23 / 12, -16 / 12, 5 / 12), abs=1e-4)


@pytest.mark.parametrize("kw,match", [(dict(solver="euler_a"), "unknown solver"),
                                      (dict(solver="dpmpp_2m", eta=1.0), "deterministic"),
                                      (dict(cfg_interval=(800, 200)), "cfg_interval"),
                                      (dict(cache_interval=0), "cache_interval")])
def test_bad_solver_arguments_are_named(tiny, kw, match):
    dc, x_T, cond, uncond, base = tiny
    with pytest.raises(ValueError, match=match):
        sample(dc, x_T, cond, uncond, steps=2, **(base | kw))


def test_cli_solver_flag(tmp_path, monkeypatch, tiny_ckpt):
    from dynamicrafter import cli, pipeline
    args = cli.build_parser().parse_args(["animate", "--ckpt", "m.safetensors", "--out", "o.mp4",
                                          "--solver", "dpmpp_2m", "--steps", "15"])
    assert args.solver == "dpmpp_2m" and args.eta is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["animate", "--ckpt", "m", "--out", "o.mp4", "--solver", "nope"])
    seen = []

    def recording_sample(*a, **kw):
        seen.append(kw)
        return sample(*a, **kw)
    monkeypatch.setattr(pipeline, "sample", recording_sample)
    image = tmp_path / "in.png"
    image.write_bytes((tiny_ckpt.parent / "inputs" / "single" / "image.png").read_bytes())
    out = tmp_path / "o.png"
    assert cli.main(["animate", "--ckpt", str(tiny_ckpt), "--image", str(image), "--prompt", "x", "--out", str(out),
                     "--solver", "unipc", "--steps", "3", "--frames", "8", "--width", "64", "--height", "64"]) == 0
    assert out.is_file() and out.stat().st_size > 0
    sch = seen[0]["schedule"]
    assert len(seen) == 1 and sch.solver == "unipc" and sch.eta == 0.0 and sch.steps == 3


@pytest.mark.parametrize("name", ["tiny_vc1", "tiny_vc2"])
def test_levels_cover_eps_models_and_videocrafter_scale(comfy_reference, name):
    """eps prediction without zero SNR (VideoCrafter 1), and VideoCrafter 2's use_scale x0 rescale:
    DDIM on the levels equals the official DDIM there too; the fast solvers run."""
    path = comfy_reference / name / "model.safetensors"
    if not path.is_file():
        pytest.skip(f"no {name} reference checkpoint")
    dc = dynamicrafter.load_model(str(path)).eval()
    g = torch.Generator().manual_seed(3)
    cond, uncond = [torch.randn(1, 77, dc.unet.cfg.context_dim, generator=g) for _ in range(2)]
    x_T = torch.randn(1, 4, 4, 8, 8, generator=g)
    kw = dict(concat=None, fs=None, steps=6, cfg_text=12.0, spacing=dc.variant["spacing"])
    with torch.no_grad():
        official = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, **kw)
        levels = sample(dc, x_T, cond, uncond, solver="ddim", cfg_interval=(0, 999), **kw)
        fast = sample(dc, x_T, cond, uncond, solver="dpmpp_2m", **kw)
    torch.testing.assert_close(levels, official, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(fast).all() and psnr(fast, official) > 15


def test_step_cache_and_cfg_interval_on_the_tiny_model(tiny_ref):
    """The work savings of the options against their quality cost, on the tiny reference model:
    latent PSNR to 50-step DDIM of dpmpp_2m 15 steps plain, with the step cache (k=3, depth 1:
    deep features reused on 10 of 15 steps), with guidance only for t in [150, 850], and plain
    dpmpp_2m at 10 steps (the same work as the cache saves, spent on fewer steps instead)."""
    dc, x_T, cond, uncond, kw, ddim50 = tiny_ref
    got = {}
    with torch.no_grad():
        for name, extra in [("plain15", dict(steps=15)), ("cache15", dict(steps=15, cache_interval=3)),
                            ("cfg15", dict(steps=15, cfg_interval=(150, 850))), ("plain10", dict(steps=10))]:
            stats = {}
            out = sample(dc, x_T, cond, uncond, solver="dpmpp_2m", stats=stats, **(kw | extra))
            got[name] = (psnr(out, ddim50), stats)
    print({k: (round(v[0], 2), v[1]) for k, v in got.items()})
    assert got["cache15"][1] == {"evaluations": 45, "cached": 30}
    assert got["cfg15"][1]["evaluations"] == 45 - 2 * sum(not 150 <= t <= 850 for t in noise_levels(dc, 15).t)
    assert all(math.isfinite(v[0]) and v[0] > 20 for v in got.values())
    # measured: plain 15 40.4 dB, cached 15 39.2 dB (51% less UNet work: a reused step costs 23.6%
    # of a full one), plain 10 38.8 dB; guidance in [150, 850] only: 31.7 dB for 22% less work
    assert got["cache15"][0] >= got["plain15"][0] - 2.0
    assert got["cache15"][0] >= got["plain10"][0] - 0.5
