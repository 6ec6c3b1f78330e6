"""DynamiCrafter Variant Defaults: the official settings of the loaded model's variant, as outputs."""
from __future__ import annotations

import json

from .comfy_model import require_dynamicrafter_model


def variant_defaults(model) -> dict:
    inner = require_dynamicrafter_model(model, "Variant Defaults")
    v = inner.variant
    h, w = v.get("resolution", (320, 512))
    return {"width": int(w), "height": int(h), "frames": int(v.get("frames", 16)), "fs": int(v.get("default_fs", 24)),
            "cfg_text": float(v.get("cfg_text", 7.5)), "guidance_rescale": float(v.get("guidance_rescale", 0.0)),
            "spacing": v.get("spacing", "uniform_trailing"), "variant": v}


class DynamiCrafterVariantDefaults:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("INT", "INT", "INT", "INT", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("width", "height", "frames", "fs", "cfg_text", "guidance_rescale", "info")
    OUTPUT_TOOLTIPS = ("trained width", "trained height", "frames per segment", "default fs (fps or frame stride)",
                       "official text guidance", "official guidance rescale", "the detected variant as JSON")
    FUNCTION = "defaults"
    CATEGORY = "DynamiCrafter"
    DESCRIPTION = "Official resolution, frames, fs and guidance for the loaded variant (256/512/1024/interp/VC)."

    def defaults(self, model):
        d = variant_defaults(model)
        info = json.dumps({k: (list(x) if isinstance(x, tuple) else x) for k, x in d["variant"].items()})
        return (d["width"], d["height"], d["frames"], d["fs"], d["cfg_text"], d["guidance_rescale"], info)


NODE_CLASS_MAPPINGS = {"DynamiCrafterVariantDefaults": DynamiCrafterVariantDefaults}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamiCrafterVariantDefaults": "DynamiCrafter Variant Defaults"}
