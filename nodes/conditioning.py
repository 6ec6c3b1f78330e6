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
from dynamicrafter.contract import FRAMES, check_fs, check_int

from .images import check_finite, resize_center
from .resampler import IMAGE_CONTEXT_TYPE

MODES = ["image-to-video", "interpolation", "loop"]
MAX_FRAMES = FRAMES[1]
MAX_BATCH = 16


def concat_layout(z_start: torch.Tensor, frames: int, z_end: torch.Tensor | None, mode: str) -> torch.Tensor:
    """(1,4,h,w) latents -> (1,4,T,h,w): the start latent on every frame (image-to-video), or start at
    frame 0, end (interpolation) / start again (loop) at frame T-1 and zeros between."""
    if mode == "image-to-video":
        return z_start.unsqueeze(2).repeat(1, 1, frames, 1, 1)
    out = torch.zeros((z_start.shape[0], z_start.shape[1], frames) + tuple(z_start.shape[2:]),
                      dtype=z_start.dtype, device=z_start.device)
    out[:, :, 0] = z_start
    out[:, :, -1] = z_end if mode == "interpolation" else z_start
    return out


def check_batch_and_fs(batch_size, fs) -> None:
    """What the widget limits keep out, for calls that bypass them (API prompts, other nodes)."""
    check_int("batch_size", batch_size, 1, MAX_BATCH)
    check_fs(fs)


def check_size(width: int, height: int) -> None:
    if width % 64 or height % 64:
        raise ValueError(f"width and height must be multiples of 64 for the DynamiCrafter UNet (8 for the VAE, "
                         f"then 3 downsamplings); got {width}x{height}, e.g. use "
                         f"{max(64, round(width / 64) * 64)}x{max(64, round(height / 64) * 64)}")


@torch.no_grad()
def build_conditioning(positive, negative, vae, image_context, start_image, width, height, frames,
                       batch_size, fs, mode, end_image=None):
    if vae is None:
        raise ValueError("no VAE connected: this checkpoint has none (pruned file); load the SD KL-f8 VAE "
                         "with VAELoader")
    if not isinstance(image_context, dict) or "cond" not in image_context:
        raise ValueError("image_context must come from 'DynamiCrafter Context Resampler'")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be in 2..{MAX_FRAMES} for one segment (use 'DynamiCrafter Long Video' "
                         f"for longer videos); got {frames}")
    check_batch_and_fs(batch_size, fs)
    check_size(width, height)
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
    concat = concat_layout(z_start, frames, z_end, mode)
    concat = concat.repeat(batch_size, 1, 1, 1, 1).to(comfy.model_management.intermediate_device())

    common = {"concat_latent_image": concat, "dc_fs": int(fs)}
    pos = node_helpers.conditioning_set_values(positive, {**common, "dc_image_context": image_context["cond"]})
    neg = node_helpers.conditioning_set_values(negative, {**common, "dc_image_context": image_context["uncond"]})
    img_only = node_helpers.conditioning_set_values(negative, {**common, "dc_image_context": image_context["cond"]})
    latent = torch.zeros([batch_size, 4, frames, height // 8, width // 8],
                         device=comfy.model_management.intermediate_device())
    out = {"samples": latent, "dc_mode": mode}
    return pos, neg, img_only, out


class DynamiCrafterImageConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "prompt from CLIPTextEncode (OpenCLIP-H text encoder)"}),
            "negative": ("CONDITIONING", {"tooltip": "CLIPTextEncode of an empty prompt (the official "
                                                     "unconditional text)"}),
            "vae": ("VAE",),
            "image_context": (IMAGE_CONTEXT_TYPE, {"tooltip": "from 'DynamiCrafter Context Resampler'"}),
            "start_image": ("IMAGE", {"tooltip": "first frame; resized (shorter side) and centre-cropped"}),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64}),
            "height": ("INT", {"default": 320, "min": 64, "max": 2048, "step": 64}),
            "frames": ("INT", {"default": 16, "min": 2, "max": MAX_FRAMES,
                               "tooltip": "frames of this segment; the released models are trained on 16"}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH}),
            "fs": ("INT", {"default": 24, "min": 1, "max": 60,
                           "tooltip": "frame-rate conditioning: fps for 512/1024/interp (512: 15-30, 1024: 5-15; "
                                      "smaller = more motion), frame stride for 256 (1-6; larger = more motion)"}),
            "mode": (MODES, {"default": "image-to-video",
                             "tooltip": "image-to-video: start image on every frame's concat latent; "
                                        "interpolation: start..end image (use the 512_interp model); loop: start "
                                        "image at both ends"}),
        }, "optional": {
            "end_image": ("IMAGE", {"tooltip": "last frame, interpolation mode only; same size as start_image"}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "image_only", "latent")
    OUTPUT_TOOLTIPS = ("text + image tokens + image latent", "empty text + grey-image tokens + image latent",
                       "empty text + real image tokens: the middle conditioning for DualCFGGuider",
                       "empty (b, 4, T, h, w) video latent to sample")
    FUNCTION = "encode"
    CATEGORY = "DynamiCrafter"

    def encode(self, positive, negative, vae, image_context, start_image, width, height, frames, batch_size, fs,
               mode, end_image=None):
        return build_conditioning(positive, negative, vae, image_context, start_image, width, height, frames,
                                  batch_size, fs, mode, end_image)


NODE_CLASS_MAPPINGS = {"DynamiCrafterImageConditioning": DynamiCrafterImageConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamiCrafterImageConditioning": "DynamiCrafter Image Conditioning"}
