"""DynamiCrafter Text-to-Video Latent: empty video latent + fs for text-only VideoCrafter models."""
from __future__ import annotations

import torch

import comfy.model_management
import node_helpers

from dynamicrafter.contract import check_int

from .conditioning import MAX_BATCH, MAX_FRAMES, check_batch_and_fs, check_size


class DynamiCrafterTextToVideoLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64}),
            "height": ("INT", {"default": 320, "min": 64, "max": 2048, "step": 64}),
            "frames": ("INT", {"default": 16, "min": 2, "max": MAX_FRAMES}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH}),
            "fs": ("INT", {"default": 28, "min": 1, "max": 60, "tooltip": "fps conditioning (VideoCrafter2: 28)"}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "make"
    CATEGORY = "DynamiCrafter"
    DESCRIPTION = "Text-to-video (VideoCrafter): adds the fps conditioning and an empty (b, 4, T, h, w) latent."

    def make(self, positive, negative, width, height, frames, batch_size, fs):
        check_size(width, height)
        check_int("frames", frames, 2, MAX_FRAMES)
        check_batch_and_fs(batch_size, fs)
        pos = node_helpers.conditioning_set_values(positive, {"dc_fs": int(fs)})
        neg = node_helpers.conditioning_set_values(negative, {"dc_fs": int(fs)})
        latent = torch.zeros([batch_size, 4, frames, height // 8, width // 8],
                             device=comfy.model_management.intermediate_device())
        return pos, neg, {"samples": latent}


NODE_CLASS_MAPPINGS = {"DynamiCrafterTextToVideoLatent": DynamiCrafterTextToVideoLatent}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamiCrafterTextToVideoLatent": "DynamiCrafter Text-to-Video Latent"}
