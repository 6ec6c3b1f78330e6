"""DynamiCrafter CLIP Vision Encode: the 257-token last-layer grid with the official preprocessing."""
from __future__ import annotations

import torch

import comfy.model_management
from comfy_api.v0_0_2 import io

from dynamicrafter.models.clip import clip_preprocess

from .inputs import CATEGORY, ClipVision
from .images import check_finite, images_to_signed

ClipTokens = io.Custom("DYNAMICRAFTER_CLIP_TOKENS")


@torch.no_grad()
def clip_tokens(clip_vision, signed: torch.Tensor) -> torch.Tensor:
    """All tokens of the last vision block (no post-layernorm, no projection): (n, 1+grid^2, D)."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    device = clip_vision.load_device
    pixels = clip_preprocess(signed.to(device, torch.float32), clip_vision.image_size)
    dtype = next(clip_vision.model.parameters()).dtype
    out = clip_vision.model(pixel_values=pixels.to(dtype), intermediate_output=-2)
    return out[0].float().to(comfy.model_management.intermediate_device())


def encode_clip_vision(clip_vision, image: torch.Tensor) -> dict:
    """IMAGE (b,H,W,C) in [0,1] -> {"cond": tokens of the images, "uncond": tokens of a zero image}."""
    if clip_vision is None:
        raise ValueError("no CLIP vision model: the checkpoint brought none. A VideoCrafter checkpoint is a "
                         "text-to-video model that takes no image: open the 'VideoCrafter text to video' "
                         "template instead. A pruned DynamiCrafter file: load the OpenCLIP ViT-H-14 vision model "
                         "with CLIPVisionLoader")
    check_finite(image, "image")
    signed = images_to_signed(image)
    cond = clip_tokens(clip_vision, signed)
    # Official unconditional image: all zeros in [-1, 1] (mid grey), same size after resizing.
    uncond = clip_tokens(clip_vision, torch.zeros_like(signed[:1]))
    return {"cond": cond, "uncond": uncond}


class DynamiCrafterCLIPVisionEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterCLIPVisionEncode",
            display_name="DynamiCrafter CLIP Vision Encode",
            category=CATEGORY,
            description="CLIP image tokens exactly as DynamiCrafter computes them: 224x224 kornia bicubic resize "
                        "(no crop), all 257 tokens of the last block, plus the tokens of the grey "
                        "unconditional image. Feed them to 'DynamiCrafter Context Resampler'.",
            inputs=[
                ClipVision.Input("clip_vision", tooltip="OpenCLIP ViT-H-14 vision tower (from the DynamiCrafter "
                                                           "loader or CLIPVisionLoader)"),
                io.Image.Input("image", tooltip="the start image (the official code conditions CLIP on the first "
                                                "image only, also for interpolation)"),
            ],
            outputs=[ClipTokens.Output(display_name="clip_tokens")])

    @classmethod
    def execute(cls, clip_vision, image) -> io.NodeOutput:
        return io.NodeOutput(encode_clip_vision(clip_vision, image))


NODES = [DynamiCrafterCLIPVisionEncode]
