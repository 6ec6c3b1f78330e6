"""DDIM with single / dual classifier-free guidance and guidance rescale (design §8-9).

`denoise(x_t, t, context)` is the only model access: everything else is the math of one step.
The guidance branches (cond, uncond, uncond_img) run as one UNet call on one x_t with stacked
contexts: the same computation as the official separate calls, with the layers before the first
cross-attention shared.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..config import TEXT_CONTEXT_LEN
from ..contract import STEPS, check_guidance, check_int, check_sample_ddim
from .schedule import DDIMTable, NoiseSchedule, randn
from ..settings import LEGACY, Guidance, Schedule, Windows, apply_legacy
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


def window_guided_output(dc, x, t, contexts, cond: "Conditioning", guidance: Guidance,
                         plan: Optional[WindowPlan] = None, unet: Optional[Callable] = None):
    """The guided output for the whole video: one UNet pass (plan None) or the windows' outputs
    blended (`dynamicrafter.sampling.windows`). `contexts`: the guidance branches (`guidance_contexts`),
    `guidance` with the branches' image scale; `cond` gives concat, fs, the CamI2V camera and the
    per-window contexts (`Conditioning.window_contexts`). `unet(x, t, context, concat)` defaults to
    `dc.denoise` with fs (and the camera; guidance.camera != 1 adds the camera CFG,
    camera_model.camera_guidance)."""
    concat, fs, camera, window_contexts = cond.concat, cond.fs, cond.camera, cond.window_contexts
    if unet is None:
        def unet(x_, t_, context, concat_):
            if camera is None:      # any denoiser; only CamI2V models take a camera
                return dc.denoise(x_, t_, context, concat_, fs)
            return dc.denoise(x_, t_, context, concat_, fs, camera=camera)
    extra = None
    if camera is not None and guidance.camera != 1.0:
        from ..models.camera import camera_guidance
        extra = camera_guidance(lambda c: dc.denoise(x, t, c, concat, fs), contexts[0], guidance.camera)

    def run(x_, contexts_, concat_):
        return guided_output(lambda a, b, c: unet(a, b, c, concat_), x_, t, contexts_, guidance.cfg_text,
                             guidance.cfg_img, guidance.rescale, extra)

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


@dataclass(frozen=True, eq=False)
class Conditioning:
    """What the UNet is conditioned on, one value for the samplers: cond [prompt text | image tokens],
    uncond [negative text | tokens of a zero image] (None: no guidance), image_only the dual-CFG third
    branch (None: derived, `uncond_img`), concat the image latent (b, 4, T, h, w) (None for
    text-to-video models), fs (None: the model's default), camera a CamI2V condition
    (dc.encode_camera), window_contexts(frame indices, contexts) -> contexts per context window (a
    prompt schedule, `sampling.motion`)."""
    cond: torch.Tensor
    uncond: Optional[torch.Tensor] = None
    image_only: Optional[torch.Tensor] = None
    concat: Optional[torch.Tensor] = None
    fs: object = None
    camera: object = None
    window_contexts: Optional[Callable] = None

    @property
    def uncond_img(self) -> torch.Tensor:
        """[negative text | real image tokens], the dual-CFG third branch."""
        return self.image_only if self.image_only is not None else image_only_context(self.cond, self.uncond)


# the samplers' loose keywords of earlier releases: keyword -> (value, field)
SAMPLER_KEYWORDS = {**LEGACY, "cfg_camera": ("guidance", "camera"), "start": ("schedule", "start"),
                    "cond": ("cond", "cond"), "uncond": ("cond", "uncond"), "uncond_img": ("cond", "image_only"),
                    "concat": ("cond", "concat"), "fs": ("cond", "fs"), "camera": ("cond", "camera"),
                    "window_contexts": ("cond", "window_contexts")}


def sampler_values(where: str, cond, contexts: tuple, settings: tuple, legacy: dict,
                   keywords: dict = SAMPLER_KEYWORDS) -> tuple:
    """(Conditioning, Guidance, Schedule, Windows) of a sampler call: `settings` (guidance, schedule,
    windows; None = the defaults) with the loose keywords of earlier releases applied (DeprecationWarning),
    as is a tensor `cond` followed by uncond, uncond_img (positional) and concat=, fs=, camera= ..."""
    if not isinstance(cond, Conditioning):
        if len(contexts) > 2:
            raise TypeError(f"{where}() takes cond, uncond and uncond_img as contexts, got {len(contexts) + 1}")
        legacy = {"cond": cond, **dict(zip(("uncond", "uncond_img"), contexts)), **legacy}
        cond = Conditioning(cond)
    elif contexts:
        raise TypeError(f"{where}(): the Conditioning carries uncond and image_only; pass no contexts after it")
    guidance, schedule, windows = settings
    out = apply_legacy(where, {"cond": cond, "guidance": guidance or Guidance(), "schedule": schedule or Schedule(),
                               "windows": windows or Windows()}, legacy, keywords, stacklevel=4)
    return out["cond"], out["guidance"], out["schedule"], out["windows"]


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


def sample_ddim(dc, x_T: torch.Tensor, cond: Conditioning, *contexts, guidance: Optional[Guidance] = None,
                schedule: Optional[Schedule] = None, windows: Optional[Windows] = None,
                noise: Optional[Sequence[torch.Tensor]] = None, generator: Optional[torch.Generator] = None,
                callback: Optional[Callable] = None, **legacy) -> torch.Tensor:
    """Sample from x_T with DDIM; returns the final latent (b, 4, T, h, w) at alpha_bar[0].

    `cond` (`Conditioning`): the contexts [text | image tokens] cond / uncond / image_only, concat,
    fs, camera, window_contexts. `guidance` (`settings.Guidance`):
    none when uncond is None or cfg_text == 1; dual when cfg_img is given (image_only is derived
    from cond/uncond when not passed) or image_only is passed (cfg_img defaults to cfg_text);
    single otherwise. `schedule` (`settings.Schedule`): steps, spacing, eta (its solver is DDIM).
    `noise[i]` supplies step i's noise for eta > 0 (else drawn from `generator`: a CPU generator
    seeded by the user, as core ComfyUI; one on another device draws there).
    `callback(i, total, x, pred_x0)` runs after each step; raise from it to stop.
    `windows` (`settings.Windows`, size W < T): context windows (`dynamicrafter.sampling.windows`): each
    step runs the UNet on windows of W frames overlapping by `overlap`, "uniform" or "looped"
    (around the end, for loop videos), and blends their outputs; videos up to 1024 frames.
    `schedule.start=k`: x_T is the latent at step k's level (`NoiseSchedule.noise_to_step`), the run skips
    steps 0..k-1 (video-to-video, denoise strength; k = steps returns x_T).
    `cond.camera`: a CamI2V condition (dc.encode_camera), given to every branch; `guidance.camera` != 1 adds
    the official camera CFG, (camera - 1) * (cond - cond without camera), a third UNet call per step.
    `cond.window_contexts(frame indices, contexts)`: per-window contexts (a prompt schedule, `motion`).
    Earlier releases' calls (tensors cond, uncond, uncond_img, then concat=, fs=, steps=, cfg_text=,
    window=, start=, camera=, cfg_camera=, ...) still work, with a DeprecationWarning (`SAMPLER_KEYWORDS`).
    """
    c, g, sch, win = sampler_values("sample_ddim", cond, contexts, (guidance, schedule, windows), legacy)
    check_sample_ddim(dc, x_T, c, g, sch, win, noise)
    device = x_T.device
    fs_t = None if c.fs is None else torch.as_tensor(c.fs, device=device).reshape(-1).long().expand(x_T.shape[0])
    contexts, cfg_img = guidance_contexts(c.cond, c.uncond, c.image_only, g.cfg_text, g.cfg_img)
    plan = plan_windows(x_T.shape[2], win.size, win.overlap, win.schedule)
    table = NoiseSchedule.of(dc).ddim_table(sch.steps, sch.spacing, sch.eta, device, x_T.dtype)

    if c.camera is not None or g.camera != 1.0:
        from ..models.camera import check_camera_sampling
        check_camera_sampling(dc, c.camera, g.camera, plan)
    run_cond, run_guidance = dataclasses.replace(c, fs=fs_t), dataclasses.replace(g, cfg_img=cfg_img)

    def output(x, n):
        t = timestep_batch(table, n, x.shape[0])
        return window_guided_output(dc, x, t, contexts, run_cond, run_guidance, plan)

    return ddim_loop(output, x_T, table, eta=sch.eta, noise=noise, generator=generator, callback=callback,
                     start=sch.start)


def validate_sampling_args(steps, cfg_text, cfg_img, eta, guidance_rescale):
    """The scalar part of the sampling contract (dynamicrafter.contract)."""
    check_int("steps", steps, *STEPS)
    check_guidance(cfg_text, cfg_img, eta, guidance_rescale)
