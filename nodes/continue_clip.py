"""DynamiCrafter Continue Clip: extend a video so its motion carries on.

A window of `frames` frames starts with the clip's last `overlap` frames, kept pinned to the
clip at every DDIM step (`dynamicrafter.sampling.long_shots.continue_latents`), and animates the rest
from the first pinned frame (or the clip's last one); the output is the clip, then the
frames - overlap new frames, nothing repeated.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
from comfy_api.v0_0_2 import io

from dynamicrafter.contract import GUIDANCE, check_number, check_size, check_steps
from dynamicrafter.sampling.ddim import Conditioning
from dynamicrafter.sampling.long_shots import check_overlap, continue_latents

from .clip_vision import encode_clip_vision
from .comfy_model import require_dynamicrafter_model
from .conditioning import build_conditioning
from .decode import decode_video
from .images import check_finite, resize_center
from .inputs import (CATEGORY, MAX_FRAMES, Pipeline, SamplerSettings, VideoSettings, frames_input, fs_input,
                     or_trained, pipeline_inputs,
                     sampler_inputs, size_inputs)
from .validation import validate_steps
from .resampler import resample_context
from .sampler import prepare_inputs, progress_callback

CONDITIONS = ["window_start", "clip_end"]


@torch.no_grad()
def continued_video(pipe: Pipeline, video, shape: VideoSettings, overlap, settings: SamplerSettings,
                    condition="window_start", frames_per_batch=4) -> torch.Tensor:
    """The clip `video` (an IMAGE batch) at shape's size, then shape.frames - overlap new frames."""
    # 1. checks and the clip at the video size
    model, clip_vision, vae, positive, negative = pipe.model, pipe.clip_vision, pipe.vae, pipe.positive, pipe.negative
    width, height, frames, fs, cfg_img = shape.width, shape.height, shape.frames, shape.fs, settings.cfg_img
    check_size(height, width)
    check_finite(video, "video")
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be in 2..{MAX_FRAMES}, got {frames}")
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    check_overlap(overlap, frames, video.shape[0])
    check_number("cfg_img", cfg_img, *GUIDANCE)
    inner = require_dynamicrafter_model(model)
    schedule, guidance = settings.schedule(inner.variant), settings.guidance(inner.variant)
    check_steps(schedule.steps, schedule.spacing)
    clip = resize_center(video, width, height)
    tail = clip[clip.shape[0] - overlap:]
    image = tail[:1] if condition == "window_start" else tail[-1:]

    # 2. the window's conditioning (animated from `image`) and the clip's latents to pin
    context = resample_context(model, encode_clip_vision(clip_vision, image))
    pos, neg, _, latent = build_conditioning(positive, negative, vae, context, image, shape, 1, "image-to-video")
    cond, uncond, uncond_img, concat, fs = prepare_inputs(inner, pos, neg, latent)
    known = inner.process_latent_in(vae.encode(tail)).movedim(0, 1)[None]      # (1, 4, O, h, w)

    # 3. sample the window with the overlap pinned
    comfy.model_management.load_models_gpu([model])
    device = model.load_device
    x_T = comfy.sample.prepare_noise(latent["samples"], settings.seed)
    progress = progress_callback(model, settings.steps)
    c = Conditioning(cond.to(device), uncond.to(device),
                     uncond_img.to(device) if guidance.cfg_img is not None and uncond_img is not None else None,
                     None if concat is None else concat.to(device, torch.float32), fs)
    out = continue_latents(
        inner.dc_model, known.to(device, torch.float32), x_T.to(device, torch.float32), c, guidance=guidance,
        schedule=schedule, generator=torch.Generator().manual_seed(settings.seed + 1), callback=progress)

    # 4. decode the new frames only and put them after the clip
    new = {"samples": inner.process_latent_out(out[:, :, overlap:].float()).to(
        comfy.model_management.intermediate_device())}
    return torch.cat([clip, decode_video(vae, new, frames_per_batch, "keep all frames").to(clip)])


class DynamiCrafterContinueClip(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterContinueClip",
            display_name="DynamiCrafter Continue Clip (extend a video)",
            category=CATEGORY,
            description="Extends a video (an IMAGE batch, e.g. GetVideoComponents' images): a window that overlaps "
                        "the clip's last frames, kept pinned to them while sampling, so the motion carries on "
                        "instead of restarting from a still. Outputs the clip followed by frames - overlap new "
                        "frames.",
            inputs=[
                *pipeline_inputs(),
                io.Image.Input("video", tooltip="the clip to continue (its frames in order); covered and "
                                                "centre-cropped to width x height"),
                *size_inputs(from_model=True),
                frames_input("frames", "frames of the window (the model's 16); frames - overlap are new", MAX_FRAMES,
                             from_model=True),
                io.Int.Input("overlap", default=8, min=1, max=MAX_FRAMES - 1,
                             tooltip="the clip's last frames the window starts with (pinned); more = the motion "
                                     "follows the clip more closely, fewer new frames per run"),
                io.Combo.Input("condition", options=CONDITIONS, default="window_start",
                               tooltip="image the window is animated from: the first pinned frame (where the "
                                       "model expects it) or the clip's last frame"),
                fs_input(from_model=True),
                *sampler_inputs(),
            ],
            outputs=[io.Image.Output(display_name="frames")])

    @classmethod
    def validate_inputs(cls, steps, spacing):    # at queue time: steps the spacing cannot make
        return validate_steps(cls, steps, spacing)

    @classmethod
    def execute(cls, model, clip_vision, vae, positive, negative, video, width, height, frames, overlap, condition,
                fs, seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing) -> io.NodeOutput:
        s = or_trained(require_dynamicrafter_model(model).variant, width=width, height=height,
                       frames=frames, fs=fs)
        settings = SamplerSettings.of(seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing)
        return io.NodeOutput(continued_video(Pipeline(model, clip_vision, vae, positive, negative), video,
                                             VideoSettings(s["width"], s["height"], s["frames"], s["fs"]), overlap,
                                             settings, condition))


NODES = [DynamiCrafterContinueClip]
