"""The DynamiCrafter node pack: one module per feature, merged here.  Imported only relatively,
through the repository's root ``__init__.py`` (ComfyUI's own top-level module is ``nodes``)."""
from . import (clip_vision, conditioning, decode, defaults, keyframes, loader, long_video, resampler, sampler,
               text_to_video)

_MODULES = (loader, clip_vision, resampler, conditioning, sampler, decode, defaults, long_video, text_to_video,
            keyframes)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _m in _MODULES:
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
