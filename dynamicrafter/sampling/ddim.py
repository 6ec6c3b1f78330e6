"""DDIM with single / dual classifier-free guidance and guidance rescale (design §8-9).

`denoise(x_t, t, context)` is the only model access: everything else is the math of one step.
The guidance branches (cond, uncond, uncond_img) run as one UNet call on one x_t with stacked
contexts: the same computation as the official separate calls, with the layers before the first
cross-attention shared.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..config import TEXT_CONTEXT_LEN
from ..contract import STEPS, check_guidance, check_int, check_sample_ddim
from .schedule import DDIMTable, NoiseSchedule, randn
from ..settings import Guidance, Schedule, Windows, resolve
from .windows import WindowPlan, plan_windows, take_context, take_frames

# denoise(x_t (b, ...), t (b,), contexts (k*b, L, C)) -> (k*b, ...): k guidance branches on one x_t
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rescale_guidance(guided: torch.Tensor, cond_out: torch.Tensor, phi: float) -> torch.Tensor:
    """Pull the guided output's std back toward the conditional output's (unbiased std over C,T,H,W)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


def guided_output(denoise: Denoiser, x, t, contexts: Sequence[torch.Tensor], cfg_text: float,
                  cfg_img: Optional[float], guidance_rescale: float,
                  extra_guidance: Optional[Callable] = None) -> torch.Tensor:
    """contexts = [cond] (no guidance), [cond, uncond] (single CFG) or
    [cond, uncond, uncond_img] (dual CFG: uncond_img = empty text + the real image tokens).
    `extra_guidance(cond_out)`: a term added to the guided output before the rescale (CamI2V's camera
    CFG); like the rescale, only when there is guidance."""
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
    if extra_guidance is not None:
        guided = guided + extra_guidance(cond)
    if guidance_rescale > 0:
        guided = rescale_guidance(guided, cond, guidance_rescale)
    return guided


def window_guided_output(dc, x, t, contexts, concat, fs, cfg_text: float, cfg_img: Optional[float],
                         guidance_rescale: float, plan: Optional[WindowPlan], unet: Optional[Callable] = None,
                         camera=None, cfg_camera: float = 1.0, window_contexts: Optional[Callable] = None):
    """The guided output for the whole video: one UNet pass (plan None) or the windows' outputs
    blended (`dynamicrafter.sampling.windows`). `unet(x, t, context, concat)` defaults to `dc.denoise` with fs
    (and the CamI2V `camera`; `cfg_camera` != 1 adds the camera CFG, camera_model.camera_guidance).
    `window_contexts(frame indices, contexts) -> contexts`: per-window contexts (a prompt schedule)."""
    if unet is None:
        def unet(x_, t_, context, concat_):
            if camera is None:      # any denoiser; only CamI2V models take a camera
                return dc.denoise(x_, t_, context, concat_, fs)
            return dc.denoise(x_, t_, context, concat_, fs, camera=camera)
    extra = None
    if camera is not None and cfg_camera != 1.0:
        from ..models.camera import camera_guidance
        extra = camera_guidance(lambda c: dc.denoise(x, t, c, concat, fs), contexts[0], cfg_camera)

    def run(x_, contexts_, concat_):
        return guided_output(lambda a, b, c: unet(a, b, c, concat_), x_, t, contexts_, cfg_text, cfg_img,
                             guidance_rescale, extra)

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


# the sampler keeps every step's eta noise on the sampling device up to this size (else it moves per step)
NOISE_ON_DEVICE_BYTES = 1 << 30


def step_noises(shape, count: int, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    """(count, *shape) N(0, I) for `count` steps, drawn step by step from `generator` as the loop
    used to (same stream), in float32 on the generator's device; moved to `device` once when small."""
    draws = torch.stack([randn(shape, generator) for _ in range(count)])
    if draws.numel() * draws.element_size() <= NOISE_ON_DEVICE_BYTES:
        draws = draws.to(device=device, dtype=dtype)
    return draws


def ddim_loop(output: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, table: DDIMTable, *,
              eta: float = 0.0, noise: Optional[Sequence[torch.Tensor]] = None,
              generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None,
              start: int = 0) -> torch.Tensor:
    """The DDIM walk (the library's only one): for n = start .. len(table) - 1, out = output(x, n)
    (the guided model output at step n), x = the DDIM update, then `callback(n, total, x, pred_x0)`
    (it may write into x in place: `long_shots.pin_frames` pins frames this way; raise to stop).
    `start` = k begins at step k from x = x_k (`NoiseSchedule.noise_to_step`). eta > 0 adds
    `noise[n]`, or noise drawn once for all steps from `generator` (a CPU one by convention)."""
    total = len(table)
    if not 0 <= start <= total:    # start = total: nothing left to do (strength 0 returns x)
        raise ValueError(f"start must be a step of the run, 0..{total}, got {start}")
    draws = None
    if eta > 0 and noise is None and start < total:
        draws = step_noises(x.shape, total - start, generator, x.device, x.dtype)
    for n in range(start, total):
        out = output(x, n)
        step_noise = None
        if eta > 0:
            step_noise = (noise[n] if noise is not None else draws[n - start]).to(x)
        x, x0 = table.step(x, out, table.coef[n], step_noise)
        if callback is not None:
            callback(n, total, x, x0)
    return x


def timestep_batch(table: DDIMTable, n: int, batch: int) -> torch.Tensor:
    """Step n's DDPM timestep for a batch, from the table's device copy (no host transfer)."""
    return table.timesteps[n].expand(batch).contiguous()


def sample_ddim(dc, x_T: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor] = None,
                uncond_img: Optional[torch.Tensor] = None, *, concat: Optional[torch.Tensor], fs=None,
                guidance: Optional[Guidance] = None, schedule: Optional[Schedule] = None,
                windows: Optional[Windows] = None, noise: Optional[Sequence[torch.Tensor]] = None,
                generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None, start: int = 0,
                camera=None, cfg_camera: float = 1.0, window_contexts: Optional[Callable] = None,
                **legacy) -> torch.Tensor:
    """Sample from x_T with DDIM; returns the final latent (b, 4, T, h, w) at alpha_bar[0].

    cond/uncond/uncond_img are contexts [text | image tokens]. `guidance` (`settings.Guidance`):
    none when uncond is None or cfg_text == 1; dual when cfg_img is given (uncond_img is derived
    from cond/uncond when not passed) or uncond_img is passed (cfg_img defaults to cfg_text);
    single otherwise. `schedule` (`settings.Schedule`): steps, spacing, eta (its solver is DDIM).
    `noise[i]` supplies step i's noise for eta > 0 (else drawn from `generator`: a CPU generator
    seeded by the user, as core ComfyUI; one on another device draws there).
    `callback(i, total, x, pred_x0)` runs after each step; raise from it to stop.
    `windows` (`settings.Windows`, size W < T): context windows (`dynamicrafter.sampling.windows`): each
    step runs the UNet on windows of W frames overlapping by `overlap`, "uniform" or "looped"
    (around the end, for loop videos), and blends their outputs; videos up to 1024 frames.
    `start=k`: x_T is the latent at step k's level (`NoiseSchedule.noise_to_step`), the run skips
    steps 0..k-1 (video-to-video, denoise strength; k = steps returns x_T). The loose keywords of earlier releases
    (steps=, cfg_text=, window=, ...) still work, with a DeprecationWarning (`settings.LEGACY`).
    `camera`: a CamI2V condition (dc.encode_camera), given to every branch; `cfg_camera` != 1 adds the
    official camera CFG, (cfg_camera - 1) * (cond - cond without camera), a third UNet call per step.
    `window_contexts(frame indices, contexts)`: per-window contexts (a prompt schedule, `motion`).
    """
    g, sch, win = resolve("sample_ddim", guidance or Guidance(), schedule or Schedule(), windows or Windows(), legacy)
    check_sample_ddim(dc, x_T, cond, uncond, uncond_img, concat, fs, sch.steps, g.cfg_text, g.cfg_img, sch.eta,
                      g.rescale, sch.spacing, noise, win.size, win.overlap, win.schedule)
    device = x_T.device
    fs_t = None if fs is None else torch.as_tensor(fs, device=device).reshape(-1).long().expand(x_T.shape[0])
    contexts, cfg_img = guidance_contexts(cond, uncond, uncond_img, g.cfg_text, g.cfg_img)
    plan = plan_windows(x_T.shape[2], win.size, win.overlap, win.schedule)
    table = NoiseSchedule.of(dc).ddim_table(sch.steps, sch.spacing, sch.eta, device, x_T.dtype)

    if camera is not None or cfg_camera != 1.0:
        from ..models.camera import check_camera_sampling
        check_camera_sampling(dc, camera, cfg_camera, plan)

    def output(x, n):
        t = timestep_batch(table, n, x.shape[0])
        return window_guided_output(dc, x, t, contexts, concat, fs_t, g.cfg_text, cfg_img, g.rescale, plan,
                                    camera=camera, cfg_camera=cfg_camera, window_contexts=window_contexts)

    return ddim_loop(output, x_T, table, eta=sch.eta, noise=noise, generator=generator, callback=callback,
                     start=start)


def validate_sampling_args(steps, cfg_text, cfg_img, eta, guidance_rescale):
    """The scalar part of the sampling contract (dynamicrafter.contract)."""
    check_int("steps", steps, *STEPS)
    check_guidance(cfg_text, cfg_img, eta, guidance_rescale)
