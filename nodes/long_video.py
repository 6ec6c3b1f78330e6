"""DynamiCrafter Long Video: videos longer than one segment by chaining segments.

Segment k+1 is generated from the last decoded frame of segment k (image-to-video), so every
segment starts exactly where the previous one ended; the repeated first frame of each later
segment is dropped when joining (`dynamicrafter.long_shots.chain_segments`).
"""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from dynamicrafter.contract import check_size
from dynamicrafter.long_shots import chain_segments

from .clip_vision import encode_clip_vision
from .conditioning import build_conditioning
from .decode import decode_video
from .images import check_finite
from .inputs import CATEGORY, fs_input, sampler_inputs, size_inputs
from .resampler import resample_context
from .sampler import run_ddim

MAX_TOTAL_FRAMES = 1024


def chained_video(model, clip_vision, vae, positive, negative, start_image, width, height, total_frames,
                  segment_frames, fs, seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing,
                  frames_per_batch=4) -> torch.Tensor:
    if segment_frames < 2:
        raise ValueError(f"segment_frames must be at least 2, got {segment_frames}")
    if not 2 <= total_frames <= MAX_TOTAL_FRAMES:
        raise ValueError(f"total_frames must be in 2..{MAX_TOTAL_FRAMES}, got {total_frames}")
    check_size(height, width)
    check_finite(start_image, "start_image")

    def animate_from(k, image):
        context = resample_context(model, encode_clip_vision(clip_vision, image))
        pos, neg, _, latent = build_conditioning(positive, negative, vae, context, image, width, height,
                                                 segment_frames, 1, fs, "image-to-video")
        out = run_ddim(model, pos, neg, latent, seed + k, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing)
        return decode_video(vae, out, frames_per_batch, "keep all frames")

    return chain_segments(animate_from, start_image[:1], total_frames, segment_frames)


class DynamiCrafterLongVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterLongVideo",
            display_name="DynamiCrafter Long Video (chained segments)",
            category=CATEGORY,
            description="Videos longer than one segment: each segment is animated from the previous segment's "
                        "last frame, so positions join without jumps (motion restarts at each join).",
            inputs=[
                io.Model.Input("model"),
                io.ClipVision.Input("clip_vision"),
                io.Vae.Input("vae"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Image.Input("start_image", tooltip="the first frame of the whole video"),
                *size_inputs(),
                io.Int.Input("total_frames", default=48, min=2, max=MAX_TOTAL_FRAMES,
                             tooltip="frames of the whole video"),
                io.Int.Input("segment_frames", default=16, min=2, max=64,
                             tooltip="frames per generated segment (the model's 16)"),
                fs_input(),
                *sampler_inputs(),
            ],
            outputs=[io.Image.Output(display_name="frames")])

    @classmethod
    def execute(cls, model, clip_vision, vae, positive, negative, start_image, width, height, total_frames,
                segment_frames, fs, seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing) -> io.NodeOutput:
        return io.NodeOutput(chained_video(model, clip_vision, vae, positive, negative, start_image, width, height,
                                           total_frames, segment_frames, fs, seed, steps, cfg_text, cfg_img, eta,
                                           guidance_rescale, spacing))


NODES = [DynamiCrafterLongVideo]
