"""DynamiCrafter Variant Defaults: the official settings of the loaded model's variant, as outputs."""
from __future__ import annotations

import json

from comfy_api.v0_0_2 import io

from dynamicrafter.settings import Guidance

from .comfy_model import require_dynamicrafter_model
from .inputs import CATEGORY, trained_settings


def guidance_outputs(variant: dict) -> dict:
    """The model's own guidance as widget values: cfg_text, cfg_img (0 = single CFG, the sampler nodes'
    'off'), guidance_rescale, and the cfg_cond2_negative that makes core DualCFGGuider (negative +
    cfg2 (middle - negative) + cfg1 (positive - middle)) the same guidance: cfg2 = cfg1 is single CFG,
    cfg2 = 1 text-only guidance (cfg_img 1)."""
    own = Guidance.of_model(variant)
    return {"cfg_text": own.cfg_text, "cfg_img": float(own.cfg_img or 0.0), "guidance_rescale": own.rescale,
            "cfg_cond2_negative": own.cfg_text if own.cfg_img is None else float(own.cfg_img)}


def variant_defaults(model) -> dict:
    v = require_dynamicrafter_model(model).variant
    return {**trained_settings(v), **guidance_outputs(v), "spacing": v.get("spacing", "uniform_trailing"),
            "variant": v}


class DynamiCrafterVariantDefaults(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterVariantDefaults",
            display_name="DynamiCrafter Variant Defaults",
            category=CATEGORY,
            description="The official resolution, frames, fs and guidance of the loaded model's variant "
                        "(256/512/1024/interp, VideoCrafter), as outputs to wire into the other nodes and into "
                        "core samplers (KSampler cfg <- cfg_text; DualCFGGuider cfg_conds <- cfg_text, "
                        "cfg_cond2_negative <- cfg_cond2_negative).",
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
                io.Float.Output(display_name="cfg_cond2_negative",
                                tooltip="the image scale for core DualCFGGuider (cfg_conds = cfg_text) that gives "
                                        "the model's own guidance: its cfg_img, or cfg_text for a single-CFG model"),
            ])

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        d = variant_defaults(model)
        info = json.dumps({k: (list(x) if isinstance(x, tuple) else x) for k, x in d["variant"].items()})
        return io.NodeOutput(d["width"], d["height"], d["frames"], d["fs"], d["cfg_text"], d["guidance_rescale"],
                             info, d["cfg_img"], d["cfg_cond2_negative"])    # added last: saved links stay


NODES = [DynamiCrafterVariantDefaults]
