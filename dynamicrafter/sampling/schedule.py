"""Noise schedules (design §6, §8): scaled-linear betas, zero terminal SNR, the dynamic
x0 rescale array, the DDIM timestep spacings. Computed in float64 like the official code,
then stored as float32 buffers (the checkpoints carry the same values)."""
from __future__ import annotations

import math
from dataclasses import dataclass

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


# ------------------------------------------------------------------------------------ random draws
def randn(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) drawn like core ComfyUI: in float32 on the generator's own device (a CPU generator
    seeded by the user is the convention: the same seed gives the same noise on cpu, cuda or mps),
    then moved to `device` and cast to `dtype`. Every random draw of the sampler goes through here."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device=device if device is not None else gen_device, dtype=dtype)


# ------------------------------------------------------------------------------------ the noise process
@dataclass(frozen=True)
class Levels:
    """The n visited DDPM timesteps (descending) as n + 1 levels x_i = alpha_i z + sigma_i eps
    (Python floats): level i is what step i reads, level n where the last step ends. alpha carries
    the data scale of the x0 rescale; abar is the plain alpha_bar (DDIM's eta noise is defined on it)."""
    t: list          # n DDPM timesteps, descending
    alpha: list      # n + 1 signal scales (data scale included)
    sigma: list      # n + 1 noise scales
    scale: list      # n data scales of the visited timesteps (1 without the x0 rescale)
    abar: list       # n + 1 alpha_bar

    def __len__(self):
        return len(self.t)


class DDIMTable:
    """Per-step DDIM coefficients of one run, stacked (n, 9) on the sampling device and dtype, in
    the order the sampler walks them (noisiest first); `step` is the update, tensors only (no host
    sync, no branching on values: one compiled graph serves every step)."""
    COLUMNS = ("sqrt_ab", "sqrt_1m_ab", "sqrt_1m_a", "sqrt_a", "x0_f", "prev_f", "sqrt_a_prev", "direction", "sigma")

    def __init__(self, t: list, coef: torch.Tensor, parameterization: str, x0_rescale: bool, prev_rescale: bool):
        self.t, self.coef, self.parameterization = t, coef, parameterization
        self.x0_rescale, self.prev_rescale = x0_rescale, prev_rescale
        self.timesteps = torch.tensor(t, dtype=torch.long).to(coef.device)

    def __len__(self):
        return len(self.t)

    def eps_x0(self, x: torch.Tensor, out: torch.Tensor, row: torch.Tensor):
        """(eps, x0) from the model output at the row's timestep: eps: x0 = (x - sqrt(1-a) eps) / sqrt(a);
        v: eps = sqrt(ab) v + sqrt(1-ab) x, x0 = sqrt(ab) x - sqrt(1-ab) v (the stored sqrt buffers)."""
        sqrt_ab, sqrt_1m_ab, sqrt_1m_a, sqrt_a = row[:4].unbind()
        if self.parameterization == "v":
            return sqrt_ab * out + sqrt_1m_ab * x, sqrt_ab * x - sqrt_1m_ab * out
        return out, (x - sqrt_1m_a * out) / sqrt_a

    def step(self, x: torch.Tensor, out: torch.Tensor, row: torch.Tensor, noise: torch.Tensor | None = None):
        """One DDIM update from the guided model output, `row` = coef[n]; returns (x_prev, pred_x0)."""
        _, _, _, _, x0_f, prev_f, sqrt_a_prev, direction, sigma = row.unbind()
        eps, x0 = self.eps_x0(x, out, row)
        if self.x0_rescale:
            x0 = x0 * x0_f
        x_prev = sqrt_a_prev * (prev_f * x0 if self.prev_rescale else x0) + direction * eps
        if noise is not None:
            x_prev = x_prev + sigma * noise
        return x_prev, x0


class NoiseSchedule:
    """The model's noise process, the one place its math lives (design §6, §8): alpha_bar (with
    zero terminal SNR when the variant has it), the x0 rescale (`scale_arr`: DynamiCrafter's
    dynamic rescale, x0 * scale[t_prev] / scale[t]; VideoCrafter's use_scale, x0 / scale[t] then
    * scale[t_prev]), eps/v <-> x0, q_sample, the DDIM table and the levels every sampler walks.

    Built from a model's float32 buffers (`of(dc)`); schedule math in NumPy float64 / Python
    floats, never float64 torch ops."""

    def __init__(self, alphas_cumprod, sqrt_ab, sqrt_1m_ab, parameterization: str, scale_arr=None,
                 scale_mode: str | None = None):
        self.ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32).cpu()
        self.sqrt_ab = torch.as_tensor(sqrt_ab, dtype=torch.float32).cpu()
        self.sqrt_1m_ab = torch.as_tensor(sqrt_1m_ab, dtype=torch.float32).cpu()
        self.parameterization = parameterization
        self.scale_mode = scale_mode if scale_arr is not None else None     # None, "dynamic", "use_scale"
        self.scale_arr = None if self.scale_mode is None else torch.as_tensor(scale_arr, dtype=torch.float32).cpu()

    @classmethod
    def of(cls, dc) -> "NoiseSchedule":
        """The schedule of a loaded model (its buffers and `variant`)."""
        v = dc.variant
        mode = "use_scale" if v.get("use_scale") else "dynamic" if v.get("dynamic_rescale_base") is not None else None
        return cls(dc.alphas_cumprod.detach(), dc.sqrt_alphas_cumprod.detach(),
                   dc.sqrt_one_minus_alphas_cumprod.detach(), v["parameterization"],
                   getattr(dc, "scale_arr", None) if mode else None, mode)

    # ---- the forward process and the model's output
    def _at(self, buf: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return buf.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t at DDPM timesteps t (b,): sqrt(ab) * scale[t] * x0 + sqrt(1 - ab) * noise."""
        return self._at(self.sqrt_ab, t, x0.ndim) * self.scaled(x0, t) + self._at(self.sqrt_1m_ab, t, x0.ndim) * noise

    def scaled(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean latent as the model sees it at timestep t: x0 * scale_arr[t] (x0 without a rescale)."""
        return x0 if self.scale_mode is None else x0 * self._at(self.scale_arr, t, x0.ndim)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model learns to output at t: eps, or v = sqrt(ab) eps - sqrt(1-ab) scale[t] x0."""
        if self.parameterization == "eps":
            return noise
        return self._at(self.sqrt_ab, t, x0.ndim) * noise - self._at(self.sqrt_1m_ab, t, x0.ndim) * self.scaled(x0, t)

    # ---- the sampler's walk
    def levels(self, steps: int, spacing: str = "uniform_trailing") -> Levels:
        """The DDIM timesteps of `steps` and `spacing` as levels. The official DDIM ends at alpha_bar[0]
        with the data scale of its smallest timestep (DynamiCrafter; it moves with the step count:
        50 trailing steps scale_arr[19] = 0.986, 15 steps scale_arr[66] = 0.950) or scale_arr[0]
        (VideoCrafter); every solver ends there too."""
        ts = [int(t) for t in reversed(ddim_timesteps(steps, spacing))]
        scale = [float(self.scale_arr[t]) if self.scale_mode else 1.0 for t in ts]
        end_scale = 1.0 if not self.scale_mode else float(self.scale_arr[0]) if self.scale_mode == "use_scale" \
            else scale[-1]
        abar = [float(self.ac[t]) for t in ts] + [float(self.ac[0])]
        alpha = [math.sqrt(a) * s for a, s in zip(abar, scale + [end_scale])]
        sigma = [math.sqrt(1.0 - a) for a in abar]
        return Levels(ts, alpha, sigma, scale, abar)

    def noise_to_step(self, z: torch.Tensor, noise: torch.Tensor, steps: int, spacing: str, k: int) -> torch.Tensor:
        """A clean latent z noised to the level step k of the run reads (k = 0: pure noise on zero-SNR
        models; k = steps: where the run ends): alpha_k z + sigma_k noise. With `sample_ddim(start=k)`
        this is video-to-video / denoise strength; after step k-1, `pinned_levels` give the same level."""
        lv = self.levels(steps, spacing)
        if not 0 <= k <= len(lv):
            raise ValueError(f"step {k} is outside the run's {len(lv)} steps (0..{len(lv)})")
        return lv.alpha[k] * z + lv.sigma[k] * noise

    def ddim_table(self, steps: int, spacing: str, eta: float, device=None, dtype=torch.float32) -> DDIMTable:
        """The official DDIM's per-step coefficients (`DDIMSampler.make_schedule`): alpha_bar of the
        visited and previous timesteps from the float32 buffer, sigma = eta * sqrt((1 - a_prev) / (1 - a)
        * (1 - a / a_prev)) in float64, the x0 rescale factors; computed on the CPU, moved once."""
        timesteps = ddim_timesteps(steps, spacing)
        ac = self.ac
        alphas = ac[timesteps]
        alphas_prev = torch.cat([ac[:1], ac[timesteps[:-1]]])
        a64, p64 = alphas.numpy().astype(np.float64), alphas_prev.numpy().astype(np.float64)
        sigmas = torch.from_numpy((eta * np.sqrt((1 - p64) / (1 - a64) * (1 - a64 / p64))).astype(np.float32))
        ones = torch.ones(len(timesteps))
        x0_f, prev_f = ones, ones
        if self.scale_mode is not None:
            step_scale = self.scale_arr[timesteps]
            if self.scale_mode == "use_scale":     # VideoCrafter: x0 / scale_t, then * scale_prev in the update
                x0_f, prev_f = 1.0 / step_scale, torch.cat([self.scale_arr[:1], step_scale[:-1]])
            else:                                  # DynamiCrafter: x0 * scale_prev / scale_t
                x0_f = torch.cat([step_scale[:1], step_scale[:-1]]) / step_scale
        # clamp: with zero-SNR and eta=1 the first step's 1 - a_prev - sigma^2 is 0 exactly and can
        # round to -1 ulp in float32 (the official code then yields NaN); elsewhere this is a no-op
        direction = (1.0 - alphas_prev - sigmas ** 2).clamp(min=0).sqrt()
        coef = torch.stack([self.sqrt_ab[timesteps], self.sqrt_1m_ab[timesteps], torch.sqrt(1.0 - alphas),
                            alphas.sqrt(), x0_f, prev_f, alphas_prev.sqrt(), direction, sigmas], dim=1)
        return DDIMTable([int(t) for t in timesteps[::-1]], coef.flip(0).to(device=device, dtype=dtype),
                         self.parameterization, self.scale_mode is not None, self.scale_mode == "use_scale")
