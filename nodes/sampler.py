"""DynamiCrafter DDIM Sampler: the official DDIM with single/dual CFG and guidance rescale (design §8-9),
run by ``dynamicrafter.sample_ddim`` on the MODEL's UNet (or, with ``solver``, a faster solver of
``dynamicrafter.sampling.solvers`` with the same guidance), with ComfyUI's progress bar, latent
previews and interrupt."""
from __future__ import annotations

import dataclasses
import logging

import torch

import comfy.model_management
import comfy.sample
import comfy.utils
import latent_preview
from comfy.cli_args import LatentPreviewMethod
from comfy.cli_args import args as comfy_args
from comfy_api.v0_0_2 import io

import dynamicrafter
from dynamicrafter.config import TEXT_CONTEXT_LEN
from dynamicrafter.sampling.motion import direct
from dynamicrafter.contract import FRAMES, GUIDANCE, WINDOW_SCHEDULES, check_int, check_number, check_steps
from dynamicrafter.sampling.ddim import Conditioning
from dynamicrafter.settings import Motion, Windows

from . import camera as camera_node
from .comfy_model import model_speed_switches, previews_by_own_vae, require_dynamicrafter_model
from .image_to_video import size_warning
from .inputs import AUTO, CATEGORY, SamplerSettings, sampler_inputs
from .motion import mask_frames, mask_input, motion_inputs, video_latent
from .validation import validate_steps

SOLVERS = list(dynamicrafter.sampling.solvers.SOLVERS)


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


def first_frame(x0: torch.Tensor) -> torch.Tensor:
    """The first video's first frame, (1, 4, h, w), of a (b, 4, T, h, w) latent."""
    return x0[:1, :, 0] if x0.ndim == 5 else x0[:1]


class OwnVAEPreviewer(latent_preview.LatentPreviewer):
    """x0's first frame decoded by the model's own VAE (`comfy_model.previews_by_own_vae`), at the
    video's size."""

    def __init__(self, dc):
        self.dc = dc

    @torch.no_grad()
    def decode_latent_to_preview(self, x0):
        self.dc.vae.to(self.dc.device)      # a small VAE (the demo's), where the UNet samples: no copy after the first
        frame = self.dc.decode(first_frame(x0)[:, :, None])[0, :, 0]      # (3, H, W) in [-1, 1]
        return latent_preview.preview_to_image(frame.movedim(0, -1))


def frame_previewer(model):
    """The step previewer of Settings > preview method (None: off) for x0's first frame: core's
    latent2rgb (SD's factors, the latent's size) or TAESD (SD's, the video's size) for SD latents,
    the model's own VAE for a VAE of its own."""
    inner = model.model
    if not previews_by_own_vae(inner.dc_model):
        return latent_preview.get_previewer(model.load_device, inner.latent_format.frame_format())
    return None if comfy_args.preview_method == LatentPreviewMethod.NoPreviews else OwnVAEPreviewer(inner.dc_model)


def progress_callback(model, total: int, previews: bool = True):
    """The library samplers' `callback(i, total, x, x0)` for ComfyUI: interrupt, progress bar and
    (previews) the step's preview of x0's first frame (`frame_previewer`)."""
    previewer = frame_previewer(model) if previews else None
    pbar = comfy.utils.ProgressBar(total)

    def callback(i, n, x, x0):
        comfy.model_management.throw_exception_if_processing_interrupted()
        image = None if previewer is None else previewer.decode_latent_to_preview_image("JPEG", first_frame(x0))
        pbar.update_absolute(i + 1, n, image)

    return callback


# run_ddim's defaults: one pass over all frames, today's motion (frozen dataclasses, safe to share)
ONE_PASS, FREE_MOTION = Windows(), Motion()


@torch.no_grad()
def run_ddim(model, positive, negative, latent, settings: SamplerSettings, x_T: torch.Tensor | None = None,
             previews: bool = True, windows: Windows = ONE_PASS, motion: Motion = FREE_MOTION):
    """The DDIM Sampler's work, for every node that samples: `settings` from the sampler widgets (and
    the solver, cfg_camera); windows.size None = one UNet pass over all frames, W: context windows
    (library `windows`). `motion` (`nodes.motion`, `dynamicrafter.sampling.motion.direct`): strength
    (the denoise widget) < 1 starts from latent's content (video to video), amount < 1 from the image
    latent, mask (a ComfyUI MASK) holds the image outside it; prompt_schedule: a PromptSchedule for
    the windows' texts."""
    inner = require_dynamicrafter_model(model)
    latent = {**latent, "samples": video_latent(latent["samples"])}
    schedule = settings.schedule(inner.variant)
    check_steps(schedule.steps, schedule.spacing)
    cond, uncond, uncond_img, concat, fs = prepare_inputs(inner, positive, negative, latent)
    samples = latent["samples"]
    warning = size_warning(inner.variant, samples.shape[-1] * 8, samples.shape[-2] * 8)
    if warning:                    # any graph, the three-node chain included: a size the model was not trained at
        logging.warning(warning)
    if x_T is None:
        x_T = comfy.sample.prepare_noise(samples, settings.seed)    # N(0, I) from the seed, like KSampler
    comfy.model_management.load_models_gpu([model])
    device = model.load_device
    dc = inner.dc_model
    gen = torch.Generator().manual_seed(settings.seed + 1)    # a CPU generator, moved to the device (core's way)
    from dynamicrafter.sampling.schedule import ddim_timesteps
    total = len(ddim_timesteps(schedule.steps, schedule.spacing))   # 'uniform' can make more steps than asked
    callback = progress_callback(model, total, previews)

    check_number("cfg_img", settings.cfg_img, *GUIDANCE)    # NaN would read as 'off' (NaN > 0 is False)
    if windows.size:
        check_int("context_window", windows.size, 2, FRAMES[1], extra=" or 0 (off)")
        check_int("context_overlap", windows.overlap, 0, windows.size - 1,
                  extra=f" (less than context_window={windows.size})")
    guidance = settings.guidance(inner.variant)
    if settings.cfg_text == AUTO:
        logging.info("cfg_text 0: the model's own guidance, cfg_text %g, cfg_img %s", guidance.cfg_text,
                     "off (single CFG)" if guidance.cfg_img is None else f"{guidance.cfg_img:g}")
    x_T = x_T.to(device, torch.float32)
    start, denoise, mask = 0, motion.strength, motion.mask
    if denoise < 1 or motion.amount < 1 or mask is not None:
        image_latent = None if concat is None else concat[:, :, 0].to(device, torch.float32)
        controls = Motion(None if mask is None else mask_frames(mask), float(motion.feather),
                          strength=float(denoise), amount=float(motion.amount))
        x_T, start, callback = direct(
            dc, x_T, schedule, controls, image_latent=image_latent,
            video_latent=inner.process_latent_in(samples).to(device, torch.float32) if denoise < 1 else None,
            generator=gen, callback=callback)
    result = dict(latent)
    if start == total:           # denoise 0 / motion 0: nothing to sample
        result["samples"] = inner.process_latent_out(x_T.float()).to(comfy.model_management.intermediate_device())
        return result
    per_window = None if motion.prompt_schedule is None else motion.prompt_schedule.window_contexts
    uncond_img = uncond_img.to(device) if (guidance.cfg_img is not None and uncond_img is not None) else None
    c = Conditioning(cond.to(device), uncond.to(device), uncond_img,
                     None if concat is None else concat.to(device, torch.float32), fs, window_contexts=per_window)
    run = dict(guidance=guidance, schedule=dataclasses.replace(schedule, start=start), generator=gen, callback=callback)
    move, cfg_camera = _first_cond(positive, "positive")[1].get(camera_node.KEY), settings.cfg_camera
    if move is not None or cfg_camera != 1.0:    # CamI2V: the camera sampler path (DDIM, one pass)
        if move is None:
            raise ValueError(f"cfg_camera {cfg_camera} needs a camera move: put 'DynamiCrafter Camera (CamI2V)' "
                             "between the conditioning and this sampler, or set cfg_camera to 1")
        if schedule.solver != "ddim" or windows.size:
            raise ValueError("a camera move samples with solver 'ddim' in one pass: set solver to ddim and "
                             "context_window to 0")
        c = dataclasses.replace(c, camera=camera_node.camera_condition(inner, move, samples.shape, int(settings.seed)))
    with model_speed_switches(model):    # ComfyUI's attention flags, a 'Compile UNet' node's blocks
        if move is not None:
            out = dynamicrafter.sample_ddim(dc, x_T, c, **run)
        else:
            out = dynamicrafter.sample(dc, x_T, c, windows=windows, **run)
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
                io.Latent.Input("latent_image", tooltip="shape/batch of the video; sampling starts from pure noise, "
                                                        "or (denoise < 1) from its content: a clip's latent"),
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
                io.Float.Input("cfg_camera", default=1.0, min=0.0, max=20.0, step=0.1, optional=True,
                               tooltip="CamI2V camera guidance (with 'DynamiCrafter Camera'): 1 = off; above 1 "
                                       "follows the camera move more strongly, at one more UNet call per step"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="video to video: 1 = from pure noise; lower starts from latent_image's clip "
                                       "(DynamiCrafter Video Latent of VAEEncode frames) noised that far: 0 = the "
                                       "clip back, 0.5-0.8 re-animates it"),
                *motion_inputs(),
                mask_input(),
            ],
            outputs=[io.Latent.Output()])

    @classmethod
    def validate_inputs(cls, steps, spacing):    # at queue time: steps the spacing cannot make
        return validate_steps(cls, steps, spacing)

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg_text, cfg_img, eta,
                guidance_rescale, spacing, solver="ddim", context_window=0, context_overlap=4,
                context_schedule="uniform", cfg_camera=1.0, denoise=1.0, mask_feather=1.0, motion=1.0,
                mask=None) -> io.NodeOutput:
        settings = dataclasses.replace(SamplerSettings.of(seed, steps, cfg_text, cfg_img, eta, guidance_rescale,
                                                          spacing), solver=solver, cfg_camera=float(cfg_camera))
        return io.NodeOutput(run_ddim(model, positive, negative, latent_image, settings,
                                      windows=Windows(context_window or None, context_overlap, context_schedule),
                                      motion=Motion(mask, mask_feather, strength=denoise, amount=motion)))


NODES = [DynamiCrafterDDIMSampler]
