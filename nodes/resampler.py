"""DynamiCrafter Context Resampler: CLIP image tokens -> per-frame image context tokens (16 per frame)."""
from __future__ import annotations

import torch

import comfy.model_management
from comfy_api.v0_0_2 import io

from .clip_vision import ClipTokens
from .comfy_model import require_dynamicrafter_model
from .inputs import CATEGORY

ImageContext = io.Custom("DYNAMICRAFTER_IMAGE_CONTEXT")


@torch.no_grad()
def resample_context(model, clip_tokens: dict) -> dict:
    inner = require_dynamicrafter_model(model)
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
    out = {"variant": inner.variant}     # what the conditioning node's 0 (= the model's) size, frames, fs read
    for key in ("cond", "uncond"):
        out[key] = res(clip_tokens[key].to(device, dtype)).float().to(comfy.model_management.intermediate_device())
    return out


class DynamiCrafterContextResampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterContextResampler",
            display_name="DynamiCrafter Context Resampler",
            category=CATEGORY,
            description="The model's resampler (a perceiver) turning the 257 CLIP image tokens into 16 context "
                        "tokens per frame, read by every spatial cross-attention beside the text.",
            inputs=[
                io.Model.Input("model", tooltip="the DynamiCrafter model (its resampler weights are used)"),
                ClipTokens.Input("clip_tokens", tooltip="from 'DynamiCrafter CLIP Vision Encode'"),
            ],
            outputs=[ImageContext.Output(display_name="image_context")])

    @classmethod
    def execute(cls, model, clip_tokens) -> io.NodeOutput:
        return io.NodeOutput(resample_context(model, clip_tokens))


NODES = [DynamiCrafterContextResampler]
