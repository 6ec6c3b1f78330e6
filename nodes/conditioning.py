"""DynamiCrafter Image Conditioning: start image (+ end image / loop) -> positive, negative, image_only, LATENT.

Like the core SVD / Wan image-to-video nodes: the image latent (``concat_latent_image``) and the
image context tokens (``dc_image_context``) ride inside the conditioning, so the same outputs
drive the exact DDIM node and core KSampler / SamplerCustomAdvanced (``image_only`` is the
middle conditioning of core DualCFGGuider: empty text + the real image tokens).
"""
from __future__ import annotations

import torch

import comfy.model_management
import node_helpers
from comfy_api.v0_0_2 import io

from dynamicrafter.contract import check_fs, check_int, check_size
from dynamicrafter.pipeline import concat_latent, video_latent_shape

from .images import check_finite, resize_center
from .inputs import (CATEGORY, MAX_BATCH, MAX_FRAMES, MAX_VIDEO_FRAMES, VideoSettings, fs_input, or_trained,
                     prompt_inputs,
                     size_inputs, video_inputs)
from .resampler import ImageContext
from .tooncrafter_vae import REFERENCES_KEY, is_dualref_vae, keyframe_references

def conditioning_outputs() -> list:
    """What an image-to-video conditioning node gives (core I2V nodes' shape, plus the dual-CFG middle)."""
    return [
        io.Conditioning.Output(display_name="positive", tooltip="text + image tokens + image latent"),
        io.Conditioning.Output(display_name="negative", tooltip="empty text + grey-image tokens + image latent"),
        io.Conditioning.Output(display_name="image_only", tooltip="empty text + real image tokens: the "
                                                                  "middle conditioning for DualCFGGuider"),
        io.Latent.Output(display_name="latent", tooltip="empty (b, 4, T, h, w) video latent to sample"),
    ]


MODES = ["image-to-video", "interpolation", "loop"]


def check_batch_and_fs(batch_size, fs) -> None:
    """What the widget limits keep out, for calls that bypass them (API prompts, other nodes)."""
    check_int("batch_size", batch_size, 1, MAX_BATCH)
    check_fs(fs)


def empty_video_latent(batch_size, frames, height, width) -> torch.Tensor:
    return torch.zeros(video_latent_shape(batch_size, frames, height, width),
                       device=comfy.model_management.intermediate_device())


def check_image_context(image_context) -> None:
    if not isinstance(image_context, dict) or not {"cond", "uncond", "variant"} <= set(image_context):
        raise ValueError("image_context must come from 'DynamiCrafter Context Resampler'")


@torch.no_grad()
def build_conditioning(positive, negative, vae, image_context, start_image, video: VideoSettings, batch_size,
                       mode, end_image=None):
    """(positive, negative, image_only, latent) for `video` (width x height, frames, fs) from start_image."""
    width, height, frames, fs = video.width, video.height, video.frames, video.fs
    if vae is None:
        raise ValueError("no VAE connected: this checkpoint has none (pruned file); load the SD KL-f8 VAE "
                         "with VAELoader")
    check_image_context(image_context)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 2 <= frames <= MAX_VIDEO_FRAMES:
        raise ValueError(f"frames must be in 2..{MAX_VIDEO_FRAMES} (more than {MAX_FRAMES} need context windows: "
                         f"the DDIM sampler's context_window, or core 'Context Windows (Manual)'); got {frames}")
    check_batch_and_fs(batch_size, fs)
    check_size(height, width)
    check_finite(start_image, "start_image")
    start = resize_center(start_image[:1], width, height)
    end = None
    if mode == "interpolation":
        if end_image is None:
            raise ValueError("interpolation mode needs an end_image: connect the last frame's image, "
                             "or switch mode to 'image-to-video' or 'loop'")
        check_finite(end_image, "end_image")
        if tuple(end_image.shape[1:3]) != tuple(start_image.shape[1:3]):
            raise ValueError(f"end_image is {end_image.shape[2]}x{end_image.shape[1]} but start_image is "
                             f"{start_image.shape[2]}x{start_image.shape[1]}; give both images the same size")
        end = resize_center(end_image[:1], width, height)
    z_start = vae.encode(start)
    z_end = vae.encode(end) if end is not None else None
    concat = concat_latent(z_start, frames, z_start if mode == "loop" else z_end)
    concat = concat.repeat(batch_size, 1, 1, 1, 1).to(comfy.model_management.intermediate_device())

    common = {"concat_latent_image": concat, "dc_fs": int(fs)}
    pos = node_helpers.conditioning_set_values(positive, {**common, "dc_image_context": image_context["cond"]})
    neg = node_helpers.conditioning_set_values(negative, {**common, "dc_image_context": image_context["uncond"]})
    img_only = node_helpers.conditioning_set_values(negative, {**common, "dc_image_context": image_context["cond"]})
    out = {"samples": empty_video_latent(batch_size, frames, height, width), "dc_mode": mode}
    if end is not None and is_dualref_vae(vae):    # ToonCrafter's decoder looks back at the two keyframes
        out[REFERENCES_KEY] = keyframe_references(vae, start, end)
    return pos, neg, img_only, out


class DynamiCrafterImageConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterImageConditioning",
            display_name="Animate Image to Video / Interpolation (DynamiCrafter): loop, ToonCrafter keyframes",
            category=CATEGORY,
            description="Animate an image: puts the image latent and the image context into the prompt's "
                        "conditioning and makes the empty video latent, for the DDIM node or core samplers. "
                        "Interpolation mode animates from a start to an end image (512-interp model).",
            inputs=[
                *prompt_inputs("prompt from CLIPTextEncode (OpenCLIP-H text encoder)",
                               "CLIPTextEncode of an empty prompt (the official unconditional text)"),
                io.Vae.Input("vae"),
                ImageContext.Input("image_context", tooltip="from 'DynamiCrafter Context Resampler'"),
                io.Image.Input("start_image", tooltip="first frame; scaled to cover width x height and "
                                                      "centre-cropped"),
                *size_inputs(from_model=True),
                *video_inputs("frames of the video; the released models are trained on 16 (more: sample in "
                              "context windows of 16)", from_model=True),
                fs_input(from_model=True),
                io.Combo.Input("mode", options=MODES, default="image-to-video",
                               tooltip="image-to-video: start image on every frame's concat latent; "
                                       "interpolation: start..end image (use the 512_interp model); loop: start "
                                       "image at both ends"),
                io.Image.Input("end_image", optional=True,
                               tooltip="last frame, interpolation mode only; same size as start_image"),
            ],
            outputs=conditioning_outputs())

    @classmethod
    def execute(cls, positive, negative, vae, image_context, start_image, width, height, frames, batch_size, fs,
                mode, end_image=None) -> io.NodeOutput:
        check_image_context(image_context)    # 0 = the model's own: read from the model the context came from
        s = or_trained(image_context["variant"], width=width, height=height, frames=frames, fs=fs)
        return io.NodeOutput(*build_conditioning(positive, negative, vae, image_context, start_image,
                                                 VideoSettings(s["width"], s["height"], s["frames"], s["fs"]),
                                                 batch_size, mode, end_image))


NODES = [DynamiCrafterImageConditioning]
