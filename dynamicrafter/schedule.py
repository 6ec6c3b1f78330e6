"""Noise schedules (design §6, §8): scaled-linear betas, zero terminal SNR, the dynamic
x0 rescale array, the DDIM timestep spacings. Computed in float64 like the official code,
then stored as float32 buffers (the checkpoints carry the same values)."""
from __future__ import annotations

import numpy as np
import torch

NUM_TIMESTEPS = 1000


def scaled_linear_betas(start=0.00085, end=0.012, n=NUM_TIMESTEPS) -> np.ndarray:
    return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alphas_cumprod) so the last one is exactly 0, the first unchanged."""
    abar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    first, last = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def scale_arr(base_scale: float, n=NUM_TIMESTEPS, fix_scale_bug: bool = False) -> np.ndarray:
    """1 -> base_scale linearly over t = 0..399, then base_scale: 1400 entries like the checkpoints,
    or n (1000) with the official `fix_scale_bug` (VideoCrafter1 1024); entries 0..999 agree."""
    return np.concatenate([np.linspace(1.0, base_scale, 400), np.full(n - 400 if fix_scale_bug else n, base_scale)])


def schedule_buffers(zero_snr: bool, parameterization: str, rescale_base: float | None,
                     fix_scale_bug: bool = False) -> dict:
    """Every schedule buffer the official checkpoints store, as float32 tensors."""
    betas = scaled_linear_betas()
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1.0 - betas)
    prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    with np.errstate(divide="ignore"):
        buffers = dict(
            betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=prev,
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
            posterior_mean_coef1=betas * np.sqrt(prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod))
    if parameterization == "v":   # stored as zeros by the official code (infinite at t=999)
        buffers["sqrt_recip_alphas_cumprod"] = np.zeros_like(betas)
        buffers["sqrt_recipm1_alphas_cumprod"] = np.zeros_like(betas)
    if rescale_base is not None:
        buffers["scale_arr"] = scale_arr(rescale_base, fix_scale_bug=fix_scale_bug)
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in buffers.items()}


def variant_schedule(variant) -> dict:
    """The schedule buffers of a `config.Variant` (VideoCrafter's use_scale array ends at scale_b)."""
    rescale = variant.dynamic_rescale_base
    if rescale is None and variant.use_scale:
        rescale = variant.scale_b
    return schedule_buffers(variant.zero_snr, variant.parameterization, rescale,
                            fix_scale_bug=variant.use_scale and variant.fix_scale_bug)


# The official 'uniform_trailing' spacing is defined for every step count up to here; above it a
# float quirk of the official code leaves some counts undefined (61, 103, 121, ...).
MAX_TRAILING_STEPS = 60


def _trailing(steps: int, n: int) -> np.ndarray | None:
    t = np.flip(np.round(np.arange(n, 0, -n / steps))).astype(np.int64) - 1
    return t if len(t) == steps and t[0] >= 0 else None


def ddim_timesteps(steps: int, spacing: str = "uniform_trailing", n=NUM_TIMESTEPS) -> np.ndarray:
    """Ascending DDPM timesteps the DDIM sampler visits (in reverse), as `make_ddim_timesteps`:
    'uniform' = 0, c, 2c, ... plus 1; 'uniform_trailing' = round(n, n-c, ...) minus 1."""
    if not 1 <= steps <= n:
        raise ValueError(f"steps must be between 1 and {n}, got {steps}")
    if spacing == "uniform":
        t = np.asarray(range(0, n, n // steps)) + 1
        return t[t < n]   # the official code indexes past the schedule here (e.g. 3 steps -> 1000)
    if spacing == "uniform_trailing":
        t = _trailing(steps, n)
        if t is None:   # float arange quirk of the official code for some steps > MAX_TRAILING_STEPS
            below = next(s for s in range(steps - 1, 0, -1) if _trailing(s, n) is not None)
            above = next((s for s in range(steps + 1, n + 1) if _trailing(s, n) is not None), None)
            nearest = f"{below}" if above is None else f"{below} or {above}"
            raise ValueError(f"'uniform_trailing' spacing is not defined for {steps} steps (the official code "
                             f"yields a timestep of -1): use {nearest} steps (every count up to "
                             f"{MAX_TRAILING_STEPS} works), or spacing 'uniform'")
        return t
    if spacing == "quad":
        return ((np.linspace(0, np.sqrt(n * 0.8), steps)) ** 2).astype(int) + 1
    raise ValueError(f"unknown timestep spacing {spacing!r} (uniform, uniform_trailing, quad)")
