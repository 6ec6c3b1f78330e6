"""DynamiCrafter Long Video: videos longer than one segment by chaining segments.

Segment k+1 is generated from the last decoded frame of segment k (image-to-video), so every
segment starts exactly where the previous one ended; the repeated first frame of each later
segment is dropped when joining.  N frames need 1 + ceil((N - T) / (T - 1)) segments of T frames.
"""
from __future__ import annotations

import math

import torch

from .clip_vision import encode_clip_vision
from .conditioning import build_conditioning, check_size
from .decode import decode_video
from .images import check_finite
from .resampler import resample_context
from .sampler import MAX_STEPS, SPACINGS, run_ddim

MAX_TOTAL_FRAMES = 1024


def segments_needed(total: int, seg: int) -> int:
    return 1 if total <= seg else 1 + math.ceil((total - seg) / (seg - 1))


def chained_video(model, clip_vision, vae, positive, negative, start_image, width, height, total_frames,
                  segment_frames, fs, seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing,
                  frames_per_batch=4) -> torch.Tensor:
    if segment_frames < 2:
        raise ValueError(f"segment_frames must be at least 2, got {segment_frames}")
    if not 2 <= total_frames <= MAX_TOTAL_FRAMES:
        raise ValueError(f"total_frames must be in 2..{MAX_TOTAL_FRAMES}, got {total_frames}")
    check_size(width, height)
    check_finite(start_image, "start_image")
    current = start_image[:1]
    pieces = []
    have = 0
    for k in range(segments_needed(total_frames, segment_frames)):
        tokens = encode_clip_vision(clip_vision, current)
        context = resample_context(model, tokens)
        pos, neg, _, latent = build_conditioning(positive, negative, vae, context, current, width, height,
                                                 segment_frames, 1, fs, "image-to-video")
        out = run_ddim(model, pos, neg, latent, seed + k, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing)
        frames = decode_video(vae, out, frames_per_batch, "keep all frames")
        if k > 0:
            frames = frames[1:]      # re-creates the previous segment's last frame
        pieces.append(frames)
        have += frames.shape[0]
        current = frames[-1:]
    return torch.cat(pieces)[:total_frames]


class DynamiCrafterLongVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "clip_vision": ("CLIP_VISION",),
            "vae": ("VAE",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "start_image": ("IMAGE",),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64}),
            "height": ("INT", {"default": 320, "min": 64, "max": 2048, "step": 64}),
            "total_frames": ("INT", {"default": 48, "min": 2, "max": MAX_TOTAL_FRAMES}),
            "segment_frames": ("INT", {"default": 16, "min": 2, "max": 64,
                                       "tooltip": "frames per generated segment (the model's 16)"}),
            "fs": ("INT", {"default": 24, "min": 1, "max": 60}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
            "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS}),
            "cfg_text": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1}),
            "cfg_img": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1}),
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05}),
            "guidance_rescale": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.05}),
            "spacing": (SPACINGS, {"default": "auto"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "generate"
    CATEGORY = "DynamiCrafter"
    DESCRIPTION = ("Longer videos as chained segments: each segment is animated from the previous segment's "
                   "last frame, so there are no jumps at the joins.")

    def generate(self, model, clip_vision, vae, positive, negative, start_image, width, height, total_frames,
                 segment_frames, fs, seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing):
        return (chained_video(model, clip_vision, vae, positive, negative, start_image, width, height,
                              total_frames, segment_frames, fs, seed, steps, cfg_text, cfg_img, eta,
                              guidance_rescale, spacing),)


NODE_CLASS_MAPPINGS = {"DynamiCrafterLongVideo": DynamiCrafterLongVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamiCrafterLongVideo": "DynamiCrafter Long Video (chained segments)"}
