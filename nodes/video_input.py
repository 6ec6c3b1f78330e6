"""DynamiCrafter Pick Frame: one frame of an incoming video (an IMAGE batch) to animate from.

After core `LoadVideo` -> `GetVideoComponents` (or any loader that gives frames): the first,
the last, or frame N (negative N counts from the end), as a one-image IMAGE for the start_image
of the conditioning or long-video nodes (`dynamicrafter.sampling.long_shots.frame_index`).
"""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from dynamicrafter.sampling.long_shots import FRAME_CHOICES, frame_index

from .images import check_finite
from .inputs import CATEGORY


def pick_frame(images, which: str, index: int = 0):
    check_finite(images, "images")
    i = frame_index(images.shape[0], which, index)
    return images[i:i + 1]


class DynamiCrafterPickFrame(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterPickFrame",
            display_name="DynamiCrafter Pick Frame (video input)",
            category=CATEGORY,
            description="Start an animation from a video: picks the first, the last or frame N of an IMAGE batch "
                        "(e.g. GetVideoComponents' images) as a single image.",
            inputs=[
                io.Image.Input("images", tooltip="the video's frames, e.g. LoadVideo -> GetVideoComponents"),
                io.Combo.Input("which", options=list(FRAME_CHOICES), default="last",
                               tooltip="first, last, or the frame given by index"),
                io.Int.Input("index", default=0, min=-100000, max=100000,
                             tooltip="frame number for which = index, from 0; negative counts from the end "
                                     "(-1 = last)"),
            ],
            outputs=[io.Image.Output(display_name="image")])

    @classmethod
    def execute(cls, images, which, index) -> io.NodeOutput:
        return io.NodeOutput(pick_frame(images, which, index))


NODES = [DynamiCrafterPickFrame]
