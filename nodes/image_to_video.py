"""Image to Video (DynamiCrafter): CLIP vision + context resampler + image conditioning in one node,
with size, frames and fs taken from the loaded model's metadata unless set.

The three parts stay available as nodes of their own for experts; this one is what a new user
(and core SVD's users) expect: one image in, conditioning and an empty video latent out.  0 in
width / height / frames / fs means "what the model was trained at" (its variant metadata), so a
graph built at node defaults fits whichever model is loaded, the 64x64 demo model included."""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from .clip_vision import encode_clip_vision
from .comfy_model import require_dynamicrafter_model
from .conditioning import MODES, build_conditioning, conditioning_outputs
from .inputs import (CATEGORY, ClipVision, Pipeline, VideoSettings, fs_input, or_trained, prompt_inputs, size_inputs,
                     video_inputs)
from .resampler import resample_context

DISPLAY_NAME = "Image to Video (DynamiCrafter, ToonCrafter): animate, interpolate, loop"


def size_warning(variant: dict, width: int, height: int) -> str | None:
    """A one-line warning when a size differs from the one the model was trained at, else None."""
    res = variant.get("resolution")
    if not res or (int(height), int(width)) == (int(res[0]), int(res[1])):
        return None
    return (f"DynamiCrafter: this model was trained at {res[1]}x{res[0]} but the graph asks for {width}x{height}; "
            f"other sizes usually give distorted motion (set width/height to 0 to use the model's size)")


def image_to_video(pipe: Pipeline, start_image, video: VideoSettings, batch_size, mode, end_image=None):
    """The node's outputs; `video`'s AUTO (0) values are the model's (`inputs.or_trained`)."""
    model = pipe.model
    inner = require_dynamicrafter_model(model)
    s = or_trained(inner.variant, width=video.width, height=video.height, frames=video.frames, fs=video.fs)
    warning = size_warning(inner.variant, s["width"], s["height"])
    if warning:
        logging.warning(warning)
    tokens = encode_clip_vision(pipe.clip_vision, start_image[:1])
    context = resample_context(model, tokens)
    return build_conditioning(pipe.positive, pipe.negative, pipe.vae, context, start_image, VideoSettings(**s),
                              batch_size, mode, end_image)


class DynamiCrafterImageToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterI2V",
            display_name=DISPLAY_NAME,
            category=CATEGORY,
            description="Animate an image in one node (like core SVD / Wan image to video): the model's CLIP "
                        "vision encode, context resampler and image conditioning together. Size, frames and fs "
                        "default to the loaded model's; interpolation (two keyframes: ToonCrafter, 512_interp) "
                        "and seamless loop are modes. Feeds the DDIM node or core samplers.",
            inputs=[
                io.Model.Input("model", tooltip="from 'DynamiCrafter Checkpoint Loader'"),
                ClipVision.Input("clip_vision", tooltip="the loader's clip_vision (OpenCLIP ViT-H-14)"),
                io.Vae.Input("vae"),
                *prompt_inputs("prompt from CLIPTextEncode (OpenCLIP-H text encoder)",
                               "CLIPTextEncode of an empty prompt (the official unconditional text)"),
                io.Image.Input("start_image", tooltip="first frame; scaled to cover width x height and "
                                                      "centre-cropped"),
                *size_inputs(from_model=True),
                *video_inputs("frames of the video (16 for the released models)", from_model=True),
                fs_input(tooltip="frame-rate conditioning (fps, or frame stride for 256)", from_model=True),
                io.Combo.Input("mode", options=MODES, default="image-to-video",
                               tooltip="image-to-video; interpolation: start..end image (ToonCrafter / 512_interp "
                                       "model); loop: start image at both ends"),
                io.Image.Input("end_image", optional=True, tooltip="last frame, interpolation mode only"),
            ],
            outputs=conditioning_outputs())

    @classmethod
    def execute(cls, model, clip_vision, vae, positive, negative, start_image, width, height, frames, batch_size,
                fs, mode, end_image=None) -> io.NodeOutput:
        return io.NodeOutput(*image_to_video(Pipeline(model, clip_vision, vae, positive, negative), start_image,
                                             VideoSettings(width, height, frames, fs), batch_size, mode, end_image))


NODES = [DynamiCrafterImageToVideo]
