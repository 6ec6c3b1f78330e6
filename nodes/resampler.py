"""DynamiCrafter Context Resampler: CLIP image tokens -> per-frame image context tokens (16 per frame)."""
from __future__ import annotations

import torch

import comfy.model_management

from .clip_vision import CLIP_TOKENS_TYPE
from .comfy_model import require_dynamicrafter_model

IMAGE_CONTEXT_TYPE = "DYNAMICRAFTER_IMAGE_CONTEXT"


@torch.no_grad()
def resample_context(model, clip_tokens: dict) -> dict:
    inner = require_dynamicrafter_model(model, "Context Resampler")
    res = inner.image_proj_model
    if res is None:
        raise ValueError("this model has no context resampler (a text-to-video VideoCrafter model?); "
                         "image context is only used by DynamiCrafter image-to-video models")
    if not isinstance(clip_tokens, dict) or "cond" not in clip_tokens:
        raise ValueError("clip_tokens must come from 'DynamiCrafter CLIP Vision Encode'")
    want = res.cfg.embedding_dim
    got = clip_tokens["cond"].shape[-1]
    if got != want:
        raise ValueError(f"the CLIP vision tokens are {got}-dimensional but this model's resampler expects "
                         f"{want} (DynamiCrafter uses OpenCLIP ViT-H-14, width 1280): load the matching CLIP "
                         f"vision model")
    comfy.model_management.load_models_gpu([model])
    device = model.load_device        # partially loaded layers cast their weights onto it
    dtype = inner.manual_cast_dtype or res.proj_in.bias.dtype
    out = {}
    for key in ("cond", "uncond"):
        out[key] = res(clip_tokens[key].to(device, dtype)).float().to(comfy.model_management.intermediate_device())
    return out


class DynamiCrafterContextResampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the DynamiCrafter model (its resampler weights are used)"}),
            "clip_tokens": (CLIP_TOKENS_TYPE, {"tooltip": "from 'DynamiCrafter CLIP Vision Encode'"}),
        }}

    RETURN_TYPES = (IMAGE_CONTEXT_TYPE,)
    RETURN_NAMES = ("image_context",)
    FUNCTION = "resample"
    CATEGORY = "DynamiCrafter"
    DESCRIPTION = "Resampler (perceiver) turning 257 CLIP tokens into 16 context tokens per frame."

    def resample(self, model, clip_tokens):
        return (resample_context(model, clip_tokens),)


NODE_CLASS_MAPPINGS = {"DynamiCrafterContextResampler": DynamiCrafterContextResampler}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamiCrafterContextResampler": "DynamiCrafter Context Resampler"}
