"""DynamiCrafter Text-to-Video Latent: empty video latent + fs for text-only VideoCrafter models."""
from __future__ import annotations

import node_helpers
from comfy_api.v0_0_2 import io

from dynamicrafter.contract import check_int, check_size

from .conditioning import check_batch_and_fs, empty_video_latent
from .inputs import CATEGORY, MAX_VIDEO_FRAMES, fs_input, prompt_inputs, size_inputs, video_inputs


class DynamiCrafterTextToVideoLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterTextToVideoLatent",
            display_name="VideoCrafter Text to Video (DynamiCrafter)",
            category=CATEGORY,
            description="Text to video with a VideoCrafter model: adds the fps conditioning to the prompts and "
                        "makes an empty (b, 4, T, h, w) video latent.",
            inputs=[
                *prompt_inputs(),
                *size_inputs(),
                *video_inputs("frames of the video (trained on 16; more: sample in context windows of 16)"),
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
        return io.NodeOutput(pos, neg, {"samples": empty_video_latent(batch_size, frames, height, width)})


NODES = [DynamiCrafterTextToVideoLatent]
