"""DDIM with single / dual classifier-free guidance and guidance rescale (design §8-9).

`denoise(x_t, t, context)` is the only model access: everything else is the math of one step.
The guidance branches (cond, uncond, uncond_img) run as one UNet call on one x_t with stacked
contexts: the same computation as the official separate calls, with the layers before the first
cross-attention shared.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .config import TEXT_CONTEXT_LEN
from .contract import STEPS, check_guidance, check_int, check_sample_ddim
from .schedule import ddim_timesteps
from .windows import WindowPlan, plan_windows, take_context, take_frames

# denoise(x_t (b, ...), t (b,), contexts (k*b, L, C)) -> (k*b, ...): k guidance branches on one x_t
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rescale_guidance(guided: torch.Tensor, cond_out: torch.Tensor, phi: float) -> torch.Tensor:
    """Pull the guided output's std back toward the conditional output's (unbiased std over C,T,H,W)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


def guided_output(denoise: Denoiser, x, t, contexts: Sequence[torch.Tensor], cfg_text: float,
                  cfg_img: Optional[float], guidance_rescale: float) -> torch.Tensor:
    """contexts = [cond] (no guidance), [cond, uncond] (single CFG) or
    [cond, uncond, uncond_img] (dual CFG: uncond_img = empty text + the real image tokens)."""
    outs = denoise(x, t, torch.cat(list(contexts))).split(x.shape[0])
    k = len(outs)
    if k == 1:
        return outs[0]
    if k == 2:
        cond, uncond = outs
        guided = uncond + cfg_text * (cond - uncond)
    else:
        cond, uncond, uncond_img = outs
        guided = uncond + cfg_img * (uncond_img - uncond) + cfg_text * (cond - uncond_img)
    if guidance_rescale > 0:
        guided = rescale_guidance(guided, cond, guidance_rescale)
    return guided


def window_guided_output(dc, x, t, contexts, concat, fs, cfg_text: float, cfg_img: Optional[float],
                         guidance_rescale: float, plan: Optional[WindowPlan], unet: Optional[Callable] = None,
                         window_contexts: Optional[Callable] = None):
    """The guided output for the whole video: one UNet pass (plan None) or the windows' outputs
    blended (`dynamicrafter.windows`). `unet(x, t, context, concat)` defaults to `dc.denoise` with fs.
    `window_contexts(frame indices, contexts) -> contexts`: per-window contexts (a prompt schedule)."""
    if unet is None:
        def unet(x_, t_, context, concat_):
            return dc.denoise(x_, t_, context, concat_, fs)

    def run(x_, contexts_, concat_):
        return guided_output(lambda a, b, c: unet(a, b, c, concat_), x_, t, contexts_, cfg_text, cfg_img,
                             guidance_rescale)

    def cut(idx, frames):
        cs = [take_context(c, idx, frames) for c in contexts]
        return cs if window_contexts is None else window_contexts(idx, cs)

    if plan is None:
        return run(x, contexts if window_contexts is None else cut(list(range(x.shape[2])), x.shape[2]), concat)
    return plan.blend(x, lambda idx: run(take_frames(x, idx), cut(idx, plan.frames), take_frames(concat, idx)))


def guidance_contexts(cond, uncond, uncond_img, cfg_text: float, cfg_img):
    """The guidance branches to evaluate, [cond] + [uncond] + [uncond_img], and the image scale:
    none without uncond or at cfg_text 1; dual when cfg_img or uncond_img is given (uncond_img
    derived from cond/uncond when not passed; cfg_img defaults to cfg_text). Dual at cfg_img 1 is
    text-only guidance, uncond_img + cfg_text (cond - uncond_img): two branches, the same sum."""
    contexts = [cond]
    if uncond is not None and cfg_text != 1.0:
        contexts.append(uncond)
        if uncond_img is not None or cfg_img is not None:
            img_only = uncond_img if uncond_img is not None else image_only_context(cond, uncond)
            cfg_img = cfg_text if cfg_img is None else cfg_img
            if cfg_img == 1.0:
                return [cond, img_only], None
            contexts.append(img_only)
    return contexts, cfg_img


def image_only_context(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """The dual-CFG third branch: the unconditional (empty) text with the real image tokens."""
    return torch.cat([uncond[:, :TEXT_CONTEXT_LEN], cond[:, TEXT_CONTEXT_LEN:]], dim=1)


def ddim_step(x, out, a_t, a_prev, sigma, sqrt_ab, sqrt_1m_ab, parameterization, x0_factor, prev_factor, noise):
    """One DDIM update from the (guided) model output; returns (x_prev, pred_x0).

    eps: x0 = (x - sqrt(1-a_t) eps) / sqrt(a_t). v: eps and x0 from the stored sqrt buffers.
    x0_factor rescales pred_x0 (DynamiCrafter: scale_arr[t_prev]/scale_arr[t]; VideoCrafter:
    1/scale_arr[t]); prev_factor multiplies it again in the update (VideoCrafter: scale_arr[t_prev])."""
    if parameterization == "v":
        eps = sqrt_ab * out + sqrt_1m_ab * x
        x0 = sqrt_ab * x - sqrt_1m_ab * out
    else:
        eps = out
        x0 = (x - torch.sqrt(1.0 - a_t) * eps) / a_t.sqrt()
    if x0_factor is not None:
        x0 = x0 * x0_factor
    # clamp: with zero-SNR and eta=1 the first step's 1 - a_prev - sigma^2 is 0 exactly and can
    # round to -1 ulp in float32 (the official code then yields NaN); elsewhere this is a no-op
    direction = (1.0 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    x_prev = a_prev.sqrt() * (x0 if prev_factor is None else prev_factor * x0) + direction
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def sample_ddim(dc, x_T: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor] = None,
                uncond_img: Optional[torch.Tensor] = None, *, concat: Optional[torch.Tensor], fs=None,
                steps: int = 50, cfg_text: float = 1.0, cfg_img: Optional[float] = None, eta: float = 0.0,
                guidance_rescale: float = 0.0, spacing: str = "uniform_trailing",
                noise: Optional[Sequence[torch.Tensor]] = None, generator: Optional[torch.Generator] = None,
                callback: Optional[Callable] = None, window: Optional[int] = None, window_overlap: int = 4,
                window_schedule: str = "uniform", start: int = 0,
                window_contexts: Optional[Callable] = None) -> torch.Tensor:
    """Sample from x_T with DDIM; returns the final latent (b, 4, T, h, w) at alpha_bar[0].

    cond/uncond/uncond_img are contexts [text | image tokens]. Guidance: none when uncond is None
    or cfg_text == 1; dual when cfg_img is given (uncond_img is derived from cond/uncond when not
    passed) or uncond_img is passed (cfg_img defaults to cfg_text); single otherwise.
    `noise[i]` supplies step i's noise for eta > 0 (else drawn from `generator`).
    `callback(i, total, x, pred_x0)` runs after each step; raise from it to stop.
    `window=W` < T: context windows (`dynamicrafter.windows`): each step runs the UNet on windows
    of W frames overlapping by `window_overlap`, "uniform" or "looped" (around the end, for loop
    videos), and blends their outputs; videos up to 1024 frames. None or W >= T: one pass, as without.
    `start=k`: x_T is at step k's level (`dynamicrafter.motion`): steps 0..k-1 are skipped (k = steps:
    x_T is returned). `window_contexts(frame indices, contexts)`: per-window contexts (prompt schedule).
    """
    check_sample_ddim(dc, x_T, cond, uncond, uncond_img, concat, fs, steps, cfg_text, cfg_img, eta, guidance_rescale,
                      spacing, noise, window, window_overlap, window_schedule)
    variant = dc.variant
    param = variant["parameterization"]
    device = x_T.device
    fs_t = None if fs is None else torch.as_tensor(fs, device=device).reshape(-1).long().expand(x_T.shape[0])

    contexts, cfg_img = guidance_contexts(cond, uncond, uncond_img, cfg_text, cfg_img)
    plan = plan_windows(x_T.shape[2], window, window_overlap, window_schedule)

    timesteps = ddim_timesteps(steps, spacing)
    ac = dc.alphas_cumprod.float().cpu()
    alphas = ac[timesteps]
    alphas_prev = torch.cat([ac[:1], ac[timesteps[:-1]]])
    sigmas = (eta * torch.sqrt((1 - alphas_prev.double()) / (1 - alphas.double())
                               * (1 - alphas.double() / alphas_prev.double()))).float()
    x0_factor = prev_factor = [None] * len(timesteps)
    scale = getattr(dc, "scale_arr", None)
    if scale is not None and (variant.get("dynamic_rescale_base") is not None or variant.get("use_scale")):
        scale = scale.float().cpu()
        step_scale = scale[timesteps]
        if variant.get("use_scale"):    # VideoCrafter: x0 / scale_t, then * scale_prev in the update
            prev_scale = torch.cat([scale[:1], step_scale[:-1]])
            x0_factor, prev_factor = 1.0 / step_scale, prev_scale
        else:                           # DynamiCrafter: x0 * scale_prev / scale_t
            x0_factor = torch.cat([step_scale[:1], step_scale[:-1]]) / step_scale
    # per-step coefficients, on the sampling device: (t, a_t, a_prev, sigma, sqrt_ab, sqrt_1m_ab, x0_f, prev_f)
    on = lambda v: None if v is None else v.to(device=device, dtype=x_T.dtype)  # noqa: E731
    table = [(int(timesteps[i]), on(alphas[i]), on(alphas_prev[i]), on(sigmas[i]),
              on(dc.sqrt_alphas_cumprod[int(timesteps[i])]), on(dc.sqrt_one_minus_alphas_cumprod[int(timesteps[i])]),
              on(x0_factor[i]), on(prev_factor[i])) for i in range(len(timesteps))]

    check_int("start", start, 0, len(table))
    x = x_T
    total = len(table)
    for n, (t, a_t, a_prev, sigma, sqrt_ab, sqrt_1m_ab, x0_f, prev_f) in enumerate(reversed(table)):
        if n < start:
            continue
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        out = window_guided_output(dc, x, t_batch, contexts, concat, fs_t, cfg_text, cfg_img, guidance_rescale, plan,
                                   window_contexts=window_contexts)
        step_noise = None
        if eta > 0:
            step_noise = (noise[n] if noise is not None else torch.randn(x.shape, generator=generator)).to(x)
        x, x0 = ddim_step(x, out, a_t, a_prev, sigma, sqrt_ab, sqrt_1m_ab, param, x0_f, prev_f, step_noise)
        if callback is not None:
            callback(n, total, x, x0)
    return x


def validate_sampling_args(steps, cfg_text, cfg_img, eta, guidance_rescale):
    """The scalar part of the sampling contract (dynamicrafter.contract)."""
    check_int("steps", steps, *STEPS)
    check_guidance(cfg_text, cfg_img, eta, guidance_rescale)
