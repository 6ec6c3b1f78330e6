"""DynamiCrafter Variant Defaults: the official settings of the loaded model's variant, as outputs."""
from __future__ import annotations

import json

from comfy_api.v0_0_2 import io

from .comfy_model import require_dynamicrafter_model
from .inputs import CATEGORY, trained_settings


def variant_defaults(model) -> dict:
    inner = require_dynamicrafter_model(model)
    v = inner.variant
    return {**trained_settings(v), "cfg_text": float(v.get("cfg_text", 7.5)), "cfg_img": float(v.get("cfg_img") or 0.0),
            "guidance_rescale": float(v.get("guidance_rescale", 0.0)),
            "spacing": v.get("spacing", "uniform_trailing"), "variant": v}


class DynamiCrafterVariantDefaults(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterVariantDefaults",
            display_name="DynamiCrafter Variant Defaults",
            category=CATEGORY,
            description="The official resolution, frames, fs and guidance of the loaded model's variant "
                        "(256/512/1024/interp, VideoCrafter), as outputs to wire into the other nodes.",
            inputs=[io.Model.Input("model")],
            outputs=[
                io.Int.Output(display_name="width", tooltip="trained width"),
                io.Int.Output(display_name="height", tooltip="trained height"),
                io.Int.Output(display_name="frames", tooltip="frames per segment"),
                io.Int.Output(display_name="fs", tooltip="default fs (fps or frame stride)"),
                io.Float.Output(display_name="cfg_text", tooltip="official text guidance"),
                io.Float.Output(display_name="guidance_rescale", tooltip="official guidance rescale"),
                io.String.Output(display_name="info", tooltip="the detected variant as JSON"),
                io.Float.Output(display_name="cfg_img", tooltip="its image guidance for dual CFG (0: single CFG, "
                                                                "the official default; 1: text-only guidance)"),
            ])

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        d = variant_defaults(model)
        info = json.dumps({k: (list(x) if isinstance(x, tuple) else x) for k, x in d["variant"].items()})
        return io.NodeOutput(d["width"], d["height"], d["frames"], d["fs"], d["cfg_text"], d["guidance_rescale"],
                             info, d["cfg_img"])      # cfg_img last: saved graphs keep their links


NODES = [DynamiCrafterVariantDefaults]
