"""The DynamiCrafter node pack in ComfyUI's V3 schema: one module per feature, each with a
``NODES`` list, merged here into the extension that ``comfy_entrypoint`` returns.  Imported
only relatively, through the repository's root ``__init__.py`` (ComfyUI's own top-level module
is ``nodes``)."""
from comfy_api.v0_0_2 import ComfyExtension, io

from . import (camera, clip_vision, conditioning, continue_clip, decode, defaults, image_to_video, keyframes, loader,
               long_video, motion, resampler, sampler, speed, text_to_video, video_input)
from .validation import name_run_errors

_MODULES = (loader, image_to_video, clip_vision, resampler, conditioning, sampler, decode, defaults, long_video,
            text_to_video, keyframes, video_input, continue_clip, camera, motion, speed)

# run-time errors name each node by its display name, as its queue-time errors do
NODES: list[type[io.ComfyNode]] = [name_run_errors(node) for m in _MODULES for node in m.NODES]


class DynamiCrafterExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> DynamiCrafterExtension:
    return DynamiCrafterExtension()


__all__ = ["NODES", "comfy_entrypoint"]
