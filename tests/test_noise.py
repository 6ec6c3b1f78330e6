"""The noise process and the sampler's random draws (issues #26, #27, #29): every draw comes from
a CPU generator in float32 and is moved to the sampling device; no float64 torch op runs while
sampling; one guided DDIM step traces to one graph that does not recompile across steps; the
hooks other features build on (start at step k, noise a clean latent to step k's level)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import dynamicrafter
from dynamicrafter.sampling.long_shots import continue_latents, pinned_levels
from dynamicrafter.sampling.ddim import guidance_contexts, guided_output, step_noises
from dynamicrafter.sampling.schedule import NoiseSchedule
from dynamicrafter.settings import Guidance, Schedule, Windows
from dynamicrafter.sampling.schedule import randn as dc_randn


class Watch(TorchFunctionMode):
    """Records every torch.randn call (generator, device, dtype) and every op touching float64."""

    def __init__(self):
        super().__init__()
        self.draws, self.float64 = [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn:
            gen = kwargs.get("generator")
            self.draws.append((None if gen is None else gen.device, torch.device(kwargs.get("device") or "cpu"),
                               kwargs.get("dtype")))
        out = func(*args, **kwargs)
        leaves = tree_flatten((args, kwargs, out))[0]
        if any(isinstance(v, torch.Tensor) and v.dtype == torch.float64 or v is torch.float64 for v in leaves):
            self.float64.append(getattr(func, "__name__", str(func)))
        return out


@pytest.fixture(scope="module")
def tiny(tiny_random):
    return tiny_random


def run_every_sampler(dc, x_T, concat, cond, uncond):
    """Every sampling entry point the library has (2 steps each, eta 1 where it takes noise)."""
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    kw = dict(concat=concat, fs=24, guidance=Guidance(7.5, 1.5, 0.7))
    ddim, two = Schedule(2, eta=1.0), Schedule(2)
    with torch.no_grad():
        return [dynamicrafter.sample_ddim(dc, x_T, cond, uncond, schedule=ddim, generator=g(), **kw),
                dynamicrafter.sample(dc, x_T, cond, uncond, concat=concat, fs=24,
                                     guidance=Guidance(7.5, interval=(0, 500)), schedule=ddim, generator=g()),
                dynamicrafter.sample(dc, x_T, cond, uncond, schedule=Schedule(2, solver="dpmpp_2m"), **kw),
                dynamicrafter.sample(dc, x_T, cond, uncond, schedule=Schedule(2, solver="unipc"),
                                     windows=Windows(2, 1), **kw),
                dynamicrafter.sample_ddim(dc, x_T, cond, uncond, schedule=ddim, windows=Windows(3, 1, "looped"),
                                          generator=g(), **kw),
                continue_latents(dc, x_T[:, :, :1] * 0.5, x_T, cond, uncond, schedule=two, generator=g(), **kw)]


def test_sampling_runs_no_float64_op_and_draws_from_the_cpu_generator(tiny):
    dc, x_T, concat, cond, uncond = tiny
    with Watch() as watch:
        outs = run_every_sampler(dc, x_T, concat, cond, uncond)
    assert watch.float64 == [], f"float64 torch ops while sampling: {sorted(set(watch.float64))}"
    assert watch.draws, "eta 1 must draw noise"
    assert {d for d in watch.draws} == {(torch.device("cpu"), torch.device("cpu"), torch.float32)}
    kw = dict(concat=concat, fs=24, guidance=Guidance(7.5, 1.5, 0.7), schedule=Schedule(2, eta=1.0))
    with torch.no_grad():
        again, other = (dynamicrafter.sample_ddim(dc, x_T, cond, uncond, generator=torch.Generator().manual_seed(s),
                                                  **kw) for s in (5, 6))
    assert torch.equal(outs[0], again) and not torch.equal(again, other)            # seeded


def test_a_generator_on_another_device_draws_there_and_the_noise_moves(monkeypatch):
    class FakeCuda:
        device = torch.device("meta")      # stands in for a CUDA / MPS generator on this CPU machine
    fake, draws, real = FakeCuda(), [], torch.randn

    def randn(shape, generator=None, device=None, dtype=None):
        draws.append((generator, torch.device(device), dtype))
        return real(shape, dtype=dtype) if generator is not fake else torch.zeros(shape, dtype=dtype)
    monkeypatch.setattr(torch, "randn", randn)
    noise = dc_randn((2, 3), fake, torch.device("cpu"), torch.bfloat16)
    assert draws == [(fake, torch.device("meta"), torch.float32)]
    assert noise.dtype == torch.bfloat16 and noise.device.type == "cpu"


def test_same_seed_same_noise_whatever_the_sampling_dtype():
    """Drawn in float32 then cast: a bf16 / fp16 run gets the fp32 run's noise, rounded."""
    fp32 = step_noises((1, 4, 2, 8, 8), 3, torch.Generator().manual_seed(3), "cpu", torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        low = step_noises((1, 4, 2, 8, 8), 3, torch.Generator().manual_seed(3), "cpu", dtype)
        assert torch.equal(low, fp32.to(dtype))
    # drawn at once for all steps, the stream is the one the per-step loop drew
    g = torch.Generator().manual_seed(3)
    assert torch.equal(fp32, torch.stack([torch.randn(1, 4, 2, 8, 8, generator=g) for _ in range(3)]))


def test_same_seed_same_latent_with_a_bf16_model(tiny):
    """The model's dtype changes the UNet's rounding, never the noise: the draws are identical, and
    the bf16 video is the fp32 one up to rounding (2% in norm measured; another seed is ~115% away).
    The bf16 model is a copy whose weights are bf16 and whose schedule buffers stay float32, as
    `load_model(dtype=torch.bfloat16)` makes it (a `.to(bf16)` of the shared fixture would round its
    schedule for the tests after this one). No guidance here: at cfg 7.5 this random tiny model
    amplifies bf16 rounding to ~30%."""
    dc, x_T, concat, cond, uncond = tiny
    low = copy.deepcopy(dc)
    for p in low.parameters():
        p.data = p.data.to(torch.bfloat16)
    kw = dict(concat=concat, fs=24, guidance=Guidance(1.0), schedule=Schedule(2, eta=1.0))
    draws = {}
    for dtype, model in ((torch.float32, dc), (torch.bfloat16, low)):
        with Watch() as watch, torch.no_grad():
            draws[dtype] = dynamicrafter.sample_ddim(model, x_T, cond, uncond, generator=torch.Generator()
                                                     .manual_seed(4), **kw)
        assert {d for d in watch.draws} == {(torch.device("cpu"), torch.device("cpu"), torch.float32)}
    fp32 = draws[torch.float32]
    assert (draws[torch.bfloat16].float() - fp32).norm() < 0.05 * fp32.norm()
    with torch.no_grad():
        other = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, generator=torch.Generator().manual_seed(5), **kw)
    assert (other - fp32).norm() > 0.5 * fp32.norm()


def test_start_at_step_k_continues_the_run_bit_for_bit(tiny):
    dc, x_T, concat, cond, uncond = tiny
    kw = dict(concat=concat, fs=24, guidance=Guidance(7.5), schedule=Schedule(4))
    seen = {}
    with torch.no_grad():
        full = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, **kw,
                                         callback=lambda i, n, x, x0: seen.update({i: x.clone()}))
        rest = dynamicrafter.sample_ddim(dc, seen[1], cond, uncond, start=2, **kw)
        with pytest.raises(ValueError, match="start"):
            dynamicrafter.sample_ddim(dc, x_T, cond, uncond, start=5, **kw)
    assert torch.equal(full, rest)


def test_noise_to_step_is_the_samplers_level(tiny):
    dc = tiny[0]
    sched = NoiseSchedule.of(dc)
    z, eps = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 4, 2, 4, 4)
    levels = pinned_levels(dc, 6, "uniform_trailing")
    for k in range(1, 7):                      # after step k-1 = what step k reads
        signal, noise = levels[k - 1]
        assert torch.equal(sched.noise_to_step(z, eps, 6, "uniform_trailing", k), signal * z + noise * eps)
    lv = sched.levels(6, "uniform_trailing")
    assert torch.equal(sched.noise_to_step(z, eps, 6, "uniform_trailing", 0), eps)     # zero SNR: pure noise
    for k in range(1, 6):                      # and the forward process at that timestep (float32 buffers)
        t = torch.full((2,), lv.t[k])
        torch.testing.assert_close(sched.noise_to_step(z, eps, 6, "uniform_trailing", k), sched.q_sample(z, t, eps))
    with pytest.raises(ValueError, match="step 7"):
        sched.noise_to_step(z, eps, 6, "uniform_trailing", 7)


def test_one_guided_step_is_one_graph_without_recompiles(tiny):
    """UNet + dual CFG + rescale + DDIM update under torch.compile(fullgraph=True): no graph break,
    and the next steps (other timestep, coefficients, noise) reuse the graph. The 'eager' backend
    checks the capture (what fullgraph / recompiles are about) without a C++ build on the CPU."""
    import torch._dynamo
    dc, x_T, concat, cond, uncond = tiny
    table = NoiseSchedule.of(dc).ddim_table(3, "uniform_trailing", 1.0)
    contexts, cfg_img = guidance_contexts(cond, uncond, None, 7.5, 1.5)
    fs = torch.tensor([24])
    noises = step_noises(x_T.shape, 3, torch.Generator().manual_seed(0), "cpu", torch.float32)

    def step(x, t, row, noise):
        out = guided_output(lambda a, b, c: dc.denoise(a, b, c, concat, fs), x, t, contexts, 7.5, cfg_img, 0.7)
        return table.step(x, out, row, noise)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    x = ref = x_T
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for n in range(len(table)):
            t = table.timesteps[n].expand(1).contiguous()
            x, _ = compiled(x, t, table.coef[n], noises[n])
            ref, _ = step(ref, t, table.coef[n], noises[n])
            assert torch.equal(x, ref)
    torch._dynamo.reset()


def test_ddim_node_draws_from_a_cpu_generator(comfy, monkeypatch):
    """The DDIM node once built its generator on the model's load device, which fails at eta > 0 on
    every CUDA GPU (torch draws on a CPU generator only into CPU tensors): the shipped workflow
    (eta 1) must hand the library a CPU generator, whatever the device."""
    import dynamicrafter.sampling.ddim as sampling
    from test_comfy_nodes import run_and_get_video, tiny_prompt
    seen, real = [], sampling.step_noises

    def recording(shape, count, generator, device, dtype):
        seen.append(generator.device)
        return real(shape, count, generator, device, dtype)
    monkeypatch.setattr(sampling, "step_noises", recording)
    run_and_get_video(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json"))
    assert seen == [torch.device("cpu")]
