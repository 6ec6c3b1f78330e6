"""Few-step solvers (k-diffusion style): DPM-Solver++ 2M, UniPC, and DDIM in the same terms.

Noise levels (`schedule.NoiseSchedule.levels`). A solver walks levels i = 0..n with
x_i = alpha_i * x0 + sigma_i * eps: the n visited DDPM timesteps (descending), then the level where
the official DDIM ends (alpha_bar[0]).
The model is seen through a denoiser `model(x, i) -> x0` at level i. DynamiCrafter's dynamic x0
rescale fits in these terms: the model was trained on data scaled by scale_arr[t] at timestep t,
so level t has alpha = sqrt(alpha_bar[t]) * scale_arr[t] and the denoiser divides the model's x0
by scale_arr[t] (the official DDIM multiplies x0 by scale_prev / scale_t: the same update). The
official last step keeps its x0 unscaled (DynamiCrafter) or rescales it to scale_arr[0]
(VideoCrafter): the end level copies that, so first order here is the official DDIM.

Zero terminal SNR: the first level has alpha = 0 (log-SNR -inf, k-diffusion's sigma = inf).
A step from it is the first-order (x0) step x = alpha D + sigma x_T, the limit of every update
below as the step length h -> inf; multistep history from that level is never used.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..contract import check_frames, check_windows
from .ddim import (SAMPLER_KEYWORDS, Conditioning, ddim_loop, guidance_contexts, sample_ddim, sampler_values,
                   timestep_batch, validate_sampling_args, window_guided_output)
from .schedule import Levels, NoiseSchedule
from ..settings import Guidance, Schedule, Windows
from .step_cache import DeepCache
from .windows import plan_windows

# model(x, i) -> x0 prediction at level i
Model = Callable[[torch.Tensor, int], torch.Tensor]


# ------------------------------------------------------------------------------------ levels
def noise_levels(dc, steps: int, spacing: str = "uniform_trailing") -> Levels:
    """The DDIM timesteps of `steps` and `spacing` as levels (`NoiseSchedule.levels`)."""
    return NoiseSchedule.of(dc).levels(steps, spacing)


def log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma); -inf at the zero-SNR level."""
    return math.log(alpha / sigma) if alpha > 0 else -math.inf


def first_order_step(x, x0, a, s, a_next, s_next):
    """DDIM (eta 0) = DPM-Solver++ 1: keep the implied noise (x - a x0) / s, move x0 to the next level.
    Finite at a = 0, where it is the x0 step a_next x0 + s_next x."""
    return a_next * x0 + (s_next / s) * (x - a * x0)


# ------------------------------------------------------------------------------------ solvers
def dpmpp_2m_x0(x0, x0_prev, h, h_prev):
    """DPM-Solver++(2M)'s corrected x0: linear extrapolation in log-SNR over the last two outputs
    (r = h_prev / h); first order when there is no usable previous output."""
    if x0_prev is None or not math.isfinite(h_prev):
        return x0
    r = h_prev / h
    return (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x, lv: Levels, callback: Optional[Callable] = None):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep: one model call per step."""
    x0_prev, h_prev = None, math.inf
    for i in range(len(lv)):
        x0 = model(x, i)
        a, s, a_n, s_n = lv.alpha[i], lv.sigma[i], lv.alpha[i + 1], lv.sigma[i + 1]
        h = log_snr(a_n, s_n) - log_snr(a, s)
        x = first_order_step(x, dpmpp_2m_x0(x0, x0_prev, h, h_prev), a, s, a_n, s_n)
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, len(lv), x, x0)
    return x


def unipc_coefficients(rks: Sequence[float], h: float, corrector: bool) -> list:
    """UniPC-bh2 weights of the differences D_k = (x0_k - x0_0) / r_k (Zhao et al. 2023, data
    prediction, B(h) = e^-h - 1): with r = rks + [1], solve sum_k rho_k r_k^(j-1) = j! h phi_(j+1)(h) / B(h)
    for j = 1..K. The predictor uses the K - 1 older outputs (rho = 1/2 for K = 2), the corrector
    also the new output (r = 1; rho = 1/2 for K = 1, the trapezoid)."""
    rks = list(rks) + [1.0]
    k = len(rks)
    if k == 1:
        return [0.5] if corrector else []
    if k == 2 and not corrector:
        return [0.5]
    hh = -h
    b_h = math.expm1(hh)
    phi, fact, rows, rhs = math.expm1(hh) / hh - 1.0, 1, [], []
    for j in range(1, k + 1):
        rows.append([r ** (j - 1) for r in rks])
        rhs.append(phi * fact / b_h)
        fact *= j + 1
        phi = phi / hh - 1.0 / fact
    R, b = np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)     # NumPy: no float64 torch op
    return (np.linalg.solve(R, b) if corrector else np.linalg.solve(R[:-1, :-1], b[:-1])).tolist()


def unipc_update(x, x0s, lams, a, s, a_n, s_n, lam_n, x0_new=None):
    """One UniPC update from the last level to level n: predictor (x0_new None) or corrector (x0_new
    the model's output at level n). x0s / lams: usable outputs and their log-SNRs, newest last."""
    h = lam_n - lams[-1]
    x = first_order_step(x, x0s[-1], a, s, a_n, s_n)
    rks = [(lams[-1 - k] - lams[-1]) / h for k in range(1, len(x0s))]
    diffs = [(x0s[-1 - k] - x0s[-1]) / r for k, r in zip(range(1, len(x0s)), rks)]
    rhos = unipc_coefficients(rks, h, corrector=x0_new is not None)
    if x0_new is not None:
        diffs.append(x0_new - x0s[-1])
    if not diffs:
        return x
    res = sum(r * d for r, d in zip(rhos, diffs))
    return x - a_n * math.expm1(-h) * res


@torch.no_grad()
def sample_unipc(model: Model, x, lv: Levels, order: int = 2, callback: Optional[Callable] = None):
    """UniPC-bh2 (predictor order `order`, corrector one above it), one model call per step: the
    corrector reuses the output the next step needs anyway; none after the last step."""
    x0s, lams = [], []
    x_prev, lv_prev = None, None
    for i in range(len(lv)):
        a, s = lv.alpha[i], lv.sigma[i]
        lam = log_snr(a, s)
        x0 = model(x, i)
        if lv_prev is not None and x0s:       # correct the point just reached with its own output
            pa, ps = lv_prev
            x = unipc_update(x_prev, x0s, lams, pa, ps, a, s, lam, x0_new=x0)
        if math.isfinite(lam):
            x0s, lams = (x0s + [x0])[-order:], (lams + [lam])[-order:]
        a_n, s_n = lv.alpha[i + 1], lv.sigma[i + 1]
        x_prev, lv_prev = x, (a, s)
        if x0s:
            x = unipc_update(x, x0s, lams, a, s, a_n, s_n, log_snr(a_n, s_n))
        else:                                 # from the zero-SNR level: the x0 step
            x = first_order_step(x, x0, a, s, a_n, s_n)
        if callback is not None:
            callback(i, len(lv), x, x0)
    return x


SOLVERS = {"ddim": ddim_loop, "dpmpp_2m": sample_dpmpp_2m, "unipc": sample_unipc}   # ddim: the one DDIM loop


# ------------------------------------------------------------------------------------ the denoiser
class GuidedDenoiser:
    """model(x, i) -> x0 for `Levels`: the UNet with single/dual CFG and guidance rescale (as
    `sample_ddim`), its v/eps output turned into x0 (`DDIMTable.eps_x0`) and divided by the level's
    data scale; `output(x, i)` is the guided output itself (what the DDIM loop reads).

    cfg_interval (t_lo, t_hi): the guidance branches run only at timesteps t_lo <= t <= t_hi;
    elsewhere the conditional branch alone. cache: a `DeepCache` (deep UNet features reused).
    plan: context windows (`dynamicrafter.sampling.windows.plan_windows`; None = one pass).
    `evaluations` counts UNet branch evaluations, `cached` those that reused deep features.
    contexts: the guidance branches (`guidance_contexts`), `guidance` with their image scale; `cond` (a
    `Conditioning`) gives concat and fs."""

    def __init__(self, dc, lv: Levels, table, contexts, cond: Conditioning, guidance: Guidance,
                 cache: Optional[DeepCache] = None, plan=None):
        self.dc, self.lv, self.table, self.contexts, self.cond = dc, lv, table, list(contexts), cond
        self.guidance, self.cfg_interval, self.cache, self.plan = guidance, guidance.interval, cache, plan
        self.evaluations = self.cached = 0

    def branches(self, t: int) -> list:
        lo, hi = self.cfg_interval if self.cfg_interval is not None else (0, 999)
        return self.contexts if lo <= t <= hi else self.contexts[:1]

    def unet(self, i: int):
        def call(x, t, context, concat):
            k = context.shape[0] // x.shape[0]
            self.evaluations += k
            if self.cache is None:
                return self.dc.denoise(x, t, context, concat, self.cond.fs)
            out, reused = self.cache(self.dc, i, x, t, context, concat, self.cond.fs)
            self.cached += k * reused
            return out
        return call

    def output(self, x, i: int):
        t_batch = timestep_batch(self.table, i, x.shape[0])
        return window_guided_output(self.dc, x, t_batch, self.branches(self.lv.t[i]), self.cond, self.guidance,
                                    self.plan, unet=self.unet(i))

    def __call__(self, x, i: int):
        _, x0 = self.table.eps_x0(x, self.output(x, i), self.table.coef[i])
        return x0 / self.lv.scale[i]


# ------------------------------------------------------------------------------------ entry point
def sample(dc, x_T: torch.Tensor, cond: Conditioning, *contexts, guidance: Optional[Guidance] = None,
           schedule: Optional[Schedule] = None, windows: Optional[Windows] = None,
           noise: Optional[Sequence[torch.Tensor]] = None, generator: Optional[torch.Generator] = None,
           callback: Optional[Callable] = None, stats: Optional[dict] = None, **legacy) -> torch.Tensor:
    """`sample_ddim` with a choice of solver (`schedule.solver`): "ddim" (exactly `sample_ddim`),
    "dpmpp_2m" (DPM-Solver++ 2M), "unipc" (UniPC-bh2, order 2).

    guidance.interval=(t_lo, t_hi): guidance only at DDPM timesteps in [t_lo, t_hi] (the rest run
    the conditional branch alone). schedule.cache=(k, depth), k > 1: the deep UNet blocks (below input
    block `depth`) are computed every k-th step and reused between (DeepCache). `stats`, when
    given, receives {"evaluations": UNet branch evaluations, "cached": how many of them reused the
    deep features}. eta > 0 is DDIM's only. windows: context windows as in `sample_ddim` (every
    solver; not with the cache). Earlier releases' calls (tensor contexts, solver=, steps=,
    cfg_interval=, cache=, cache_interval=, cache_depth=, ...) still work with a DeprecationWarning.
    schedule.start / cond.window_contexts: as in `sample_ddim` (plain DDIM only).
    """
    if "cache_interval" in legacy or "cache_depth" in legacy:
        cache = legacy.pop("cache", Schedule().cache if schedule is None else schedule.cache)
        legacy["cache"] = (legacy.pop("cache_interval", cache[0]), legacy.pop("cache_depth", cache[1]))
    c, g, sch, win = sampler_values("sample", cond, contexts, (guidance, schedule, windows), legacy,
                                    {**SAMPLER_KEYWORDS, "cache": ("schedule", "cache")})
    validate_sampling_args(sch.steps, g.cfg_text, g.cfg_img, sch.eta, g.rescale)
    check_windows(win.size, win.overlap, win.schedule)
    solver, cfg_interval, eta = sch.solver, g.interval, sch.eta
    (cache_interval, cache_depth), start = sch.cache, sch.start
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if eta > 0 and solver != "ddim":
        raise ValueError(f"eta={eta} adds DDIM's noise; the {solver} solver is deterministic: pass eta=0")
    if not isinstance(cache_interval, int) or cache_interval < 1:
        raise ValueError(f"cache_interval must be an integer >= 1 (1 = no caching), got {cache_interval!r}")
    if cfg_interval is not None:
        lo, hi = cfg_interval
        if not 0 <= lo <= hi <= 999:
            raise ValueError(f"cfg_interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 999, got {cfg_interval}")
    video = isinstance(x_T, torch.Tensor) and x_T.ndim == 5
    plan = plan_windows(x_T.shape[2], win.size, win.overlap, win.schedule) if video else None
    if plan is not None and cache_interval > 1:
        raise ValueError(f"cache_interval={cache_interval} keeps one UNet pass's deep features, which context "
                         f"windows (window={win.size}) do not share: use cache_interval=1 with windows")
    contexts, branch_cfg_img = guidance_contexts(c.cond, c.uncond, c.image_only, g.cfg_text, g.cfg_img)
    plain_ddim = solver == "ddim" and cfg_interval is None and cache_interval == 1
    if not plain_ddim and (start or c.window_contexts is not None):
        raise ValueError("a start step (strength / motion < 1) and prompt schedules run on the plain DDIM "
                         "sampler: use solver='ddim' without cfg_interval or the cache")
    if plain_ddim:
        if stats is not None:
            stats.update(evaluations=sch.steps * len(contexts) * (1 if plan is None else len(plan.windows)), cached=0)
        return sample_ddim(dc, x_T, c, guidance=g, schedule=sch, windows=win, noise=noise, generator=generator,
                           callback=callback)
    if video:
        check_frames(x_T.shape[2], win.size)
    noise_schedule = NoiseSchedule.of(dc)
    lv = noise_schedule.levels(sch.steps, sch.spacing)
    table = noise_schedule.ddim_table(sch.steps, sch.spacing, eta, x_T.device, x_T.dtype)
    fs_t = None if c.fs is None else torch.as_tensor(c.fs, device=x_T.device).reshape(-1).long().expand(x_T.shape[0])
    deep_cache = DeepCache(cache_interval, cache_depth) if cache_interval > 1 else None
    model = GuidedDenoiser(dc, lv, table, contexts, dataclasses.replace(c, fs=fs_t),
                           dataclasses.replace(g, cfg_img=branch_cfg_img), deep_cache, plan)
    if solver == "ddim":
        x = ddim_loop(model.output, x_T, table, eta=eta, noise=noise, generator=generator, callback=callback)
    else:
        x = SOLVERS[solver](model, x_T, lv, callback=callback)
    if stats is not None:
        stats.update(evaluations=model.evaluations, cached=model.cached)
    return x
