"""DynamiCrafter Text-to-Video Latent: empty video latent + fs for text-only VideoCrafter models."""
from __future__ import annotations

import torch

import comfy.model_management
import node_helpers
from comfy_api.v0_0_2 import io

from dynamicrafter.contract import check_int, check_size

from .conditioning import MAX_BATCH, MAX_VIDEO_FRAMES, check_batch_and_fs
from .inputs import CATEGORY, fs_input, size_inputs


class DynamiCrafterTextToVideoLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterTextToVideoLatent",
            display_name="DynamiCrafter Text-to-Video Latent (VideoCrafter)",
            category=CATEGORY,
            description="Text to video with a VideoCrafter model: adds the fps conditioning to the prompts and "
                        "makes an empty (b, 4, T, h, w) video latent.",
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                *size_inputs(),
                io.Int.Input("frames", default=16, min=2, max=MAX_VIDEO_FRAMES,
                             tooltip="frames of the video (trained on 16; more: sample in context windows of 16)"),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip="videos made at once"),
                fs_input(28, "fps conditioning (VideoCrafter2, VideoCrafter1 1024: 28; VideoCrafter1 512 has no fps "
                             "input and ignores it)"),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent")])

    @classmethod
    def execute(cls, positive, negative, width, height, frames, batch_size, fs) -> io.NodeOutput:
        check_size(height, width)
        check_int("frames", frames, 2, MAX_VIDEO_FRAMES)
        check_batch_and_fs(batch_size, fs)
        pos = node_helpers.conditioning_set_values(positive, {"dc_fs": int(fs)})
        neg = node_helpers.conditioning_set_values(negative, {"dc_fs": int(fs)})
        latent = torch.zeros([batch_size, 4, frames, height // 8, width // 8],
                             device=comfy.model_management.intermediate_device())
        return io.NodeOutput(pos, neg, {"samples": latent})


NODES = [DynamiCrafterTextToVideoLatent]
