"""DynamiCrafter DDIM Sampler: the official DDIM with single/dual CFG and guidance rescale (design §8-9),
run by ``dynamicrafter.sample_ddim`` on the MODEL's UNet (or, with ``solver``, a faster solver of
``dynamicrafter.solvers`` with the same guidance), with ComfyUI's progress bar, latent
previews and interrupt."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
import comfy.utils
import latent_preview
from comfy_api.v0_0_2 import io

import dynamicrafter
from dynamicrafter.config import TEXT_CONTEXT_LEN
from dynamicrafter.contract import FRAMES, GUIDANCE, WINDOW_SCHEDULES, check_int, check_number, check_steps

from .comfy_model import model_speed_switches, require_dynamicrafter_model
from .inputs import CATEGORY, sampler_inputs

SOLVERS = list(dynamicrafter.solvers.SOLVERS)


def _first_cond(conditioning, name: str):
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError(f"{name} conditioning is empty; connect a CONDITIONING output")
    text, extras = conditioning[0][0], conditioning[0][1]
    return text, extras


def _context(text: torch.Tensor, image: torch.Tensor | None, batch: int) -> torch.Tensor:
    text = text[:, :TEXT_CONTEXT_LEN]
    ctx = text if image is None else torch.cat([text, image.to(text)], dim=1)
    return comfy.utils.repeat_to_batch_size(ctx, batch)


def prepare_inputs(inner, positive, negative, latent):
    """Contexts, concat latent (model space) and fs from the conditioning of the Image Conditioning node."""
    samples = latent["samples"]
    if samples.ndim != 5:
        raise ValueError(f"the latent must be a video latent (b, 4, T, h, w); got {tuple(samples.shape)}: use the "
                         "LATENT of 'Animate Image to Video / Interpolation (DynamiCrafter)' or 'VideoCrafter Text "
                         "to Video (DynamiCrafter)'")
    b = samples.shape[0]
    ptext, pext = _first_cond(positive, "positive")
    ntext, next_ = _first_cond(negative, "negative")
    ctx_dim = inner.diffusion_model.cfg.context_dim
    for name, t in (("positive", ptext), ("negative", ntext)):
        if t.shape[-1] != ctx_dim:
            raise ValueError(f"the {name} text embedding is {t.shape[-1]}-dimensional but the model expects "
                             f"{ctx_dim}: encode the prompt with the OpenCLIP-H (SD2.x) text encoder "
                             f"({'1024' if ctx_dim == 1024 else ctx_dim} wide)")
    cond = _context(ptext, pext.get("dc_image_context"), b)
    uncond = _context(ntext, next_.get("dc_image_context"), b)
    uncond_img = _context(ntext, pext.get("dc_image_context"), b) if pext.get("dc_image_context") is not None else None
    concat = pext.get("concat_latent_image")
    if inner.needs_concat:
        if concat is None:
            raise ValueError("this image-to-video model needs the image latent: connect positive/negative from "
                             "'Animate Image to Video / Interpolation (DynamiCrafter)'")
        if tuple(concat.shape[2:]) != tuple(samples.shape[2:]):
            raise ValueError(f"image latent {tuple(concat.shape)} and latent {tuple(samples.shape)} differ in "
                             f"frames/size: use the LATENT from the same conditioning node")
        concat = inner.process_latent_in(comfy.utils.repeat_to_batch_size(concat, b))
    else:
        concat = None
    fs = pext.get("dc_fs", inner.variant.get("default_fs"))
    levels = len(inner.diffusion_model.cfg.channel_mult) - 1
    h, w = samples.shape[-2:]
    if h % (2 ** levels) or w % (2 ** levels):
        raise ValueError(f"latent size {w}x{h} must be divisible by {2 ** levels} (pixel size a multiple of "
                         f"{8 * 2 ** levels})")
    return cond, uncond, uncond_img, concat, fs


@torch.no_grad()
def run_ddim(model, positive, negative, latent, seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing,
             x_T: torch.Tensor | None = None, previews: bool = True, solver: str = "ddim", context_window: int = 0,
             context_overlap: int = 4, context_schedule: str = "uniform"):
    """context_window 0 = one UNet pass over all frames; W > 0: context windows (library `window`)."""
    inner = require_dynamicrafter_model(model, "DDIM Sampler")
    if spacing == "auto":
        spacing = inner.variant.get("spacing", "uniform_trailing")
    check_steps(steps, spacing)
    cond, uncond, uncond_img, concat, fs = prepare_inputs(inner, positive, negative, latent)
    samples = latent["samples"]
    if x_T is None:
        x_T = comfy.sample.prepare_noise(samples, seed)    # N(0, I) from the seed, like KSampler
    comfy.model_management.load_models_gpu([model])
    device = model.load_device
    dc = inner.dc_model
    gen = torch.Generator(device=device).manual_seed(int(seed) + 1)
    from dynamicrafter.schedule import ddim_timesteps
    total = len(ddim_timesteps(steps, spacing))   # 'uniform' can make more steps than asked (official quirk)
    preview = latent_preview.prepare_callback(model, total) if previews else None
    pbar = None if previews else comfy.utils.ProgressBar(total)

    def callback(i, n, x, x0):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if preview is not None:
            preview(i, x0, x, n)
        else:
            pbar.update_absolute(i + 1, n)

    check_number("cfg_img", cfg_img, *GUIDANCE)    # NaN would read as 'off' below (NaN > 0 is False)
    if context_window:
        check_int("context_window", context_window, 2, FRAMES[1], extra=" or 0 (off)")
        check_int("context_overlap", context_overlap, 0, context_window - 1,
                  extra=f" (less than context_window={context_window})")
    use_dual = cfg_img > 0
    with model_speed_switches(model):    # ComfyUI's attention flags, a 'Compile UNet' node's blocks
        out = dynamicrafter.sample(
            dc, x_T.to(device, torch.float32), cond.to(device), uncond.to(device),
            uncond_img.to(device) if (use_dual and uncond_img is not None) else None,
            concat=None if concat is None else concat.to(device, torch.float32), fs=fs, steps=int(steps),
            cfg_text=float(cfg_text), cfg_img=float(cfg_img) if use_dual else None,
            eta=float(eta) if solver == "ddim" else 0.0, solver=solver,
            guidance_rescale=float(guidance_rescale), spacing=spacing, generator=gen, callback=callback,
            window=context_window or None, window_overlap=context_overlap, window_schedule=context_schedule)
    result = dict(latent)
    result["samples"] = inner.process_latent_out(out.float()).to(comfy.model_management.intermediate_device())
    return result


class DynamiCrafterDDIMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterDDIMSampler",
            display_name="DynamiCrafter DDIM Sampler (dual CFG)",
            category=CATEGORY,
            description="The official DynamiCrafter / VideoCrafter sampler, exact: DDIM with the dynamic x0 "
                        "rescale, zero-SNR trailing steps, single or dual (text + image) CFG and guidance "
                        "rescale, with previews and interrupt; or a faster solver with the same guidance.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="shape/batch of the video; sampling starts from pure noise"),
                *sampler_inputs(),
                # after every older widget: saved workflows keep their widget order
                io.Combo.Input("solver", options=SOLVERS, default="ddim", optional=True,
                               tooltip="ddim: the official sampler (uses eta); dpmpp_2m / unipc: deterministic "
                                       "(eta ignored), close to 50-step DDIM in 10-15 steps (README: Speed)"),
                io.Int.Input("context_window", default=0, min=0, max=FRAMES[1], optional=True,
                             tooltip="context windows: frames per UNet call (16 = what the models are trained "
                                     "on); longer videos run in overlapping windows blended at every step. 0 = "
                                     "off (one pass over all frames, as without windows)"),
                io.Int.Input("context_overlap", default=4, min=0, max=FRAMES[1] - 1, optional=True,
                             tooltip="frames shared by neighbouring windows, blended with a ramp (less than "
                                     "context_window)"),
                io.Combo.Input("context_schedule", options=list(WINDOW_SCHEDULES), default="uniform", optional=True,
                               tooltip="uniform: windows from the first to the last frame; looped: windows also "
                                       "wrap from the last frame to the first (loop mode)"),
            ],
            outputs=[io.Latent.Output()])

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg_text, cfg_img, eta,
                guidance_rescale, spacing, solver="ddim", context_window=0, context_overlap=4,
                context_schedule="uniform") -> io.NodeOutput:
        return io.NodeOutput(run_ddim(model, positive, negative, latent_image, seed, steps, cfg_text, cfg_img, eta,
                                      guidance_rescale, spacing, solver=solver, context_window=context_window,
                                      context_overlap=context_overlap, context_schedule=context_schedule))


NODES = [DynamiCrafterDDIMSampler]
