"""DynamiCrafter Compile UNet: regional torch.compile of the UNet's repeated blocks for every
sampler that runs this MODEL (core KSampler / SamplerCustomAdvanced and the pack's own).
Core 'TorchCompileModel' works on our MODEL too (it compiles the whole UNet: slow first use)."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from dynamicrafter.models.speed import compile_regions

from .comfy_model import COMPILED_REGIONS, require_dynamicrafter_model
from .inputs import CATEGORY

BACKENDS = ["inductor", "eager"]
MODES = ["default", "max-autotune-no-cudagraphs"]


class DynamiCrafterCompileUNet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterCompileUNet",
            display_name="DynamiCrafter Compile UNet",
            category=CATEGORY,
            description="torch.compile each repeated block (ResBlock, spatial and temporal transformer) of the "
                        "UNet once: the first sampling compiles one graph per block shape (far shorter than "
                        "compiling the whole UNet, and cached on disk for the next run), later ones run faster. "
                        "Same math up to float rounding.",
            inputs=[io.Model.Input("model"),
                    io.Combo.Input("backend", options=BACKENDS, default="inductor",
                                   tooltip="inductor: fused kernels (the speed-up); eager: only checks tracing"),
                    io.Combo.Input("mode", options=MODES, default="default",
                                   tooltip="max-autotune-no-cudagraphs: longer first compile, tries faster kernels")],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, backend, mode) -> io.NodeOutput:
        inner = require_dynamicrafter_model(model)
        m = model.clone()
        # fullgraph off: ComfyUI's weight-casting / low-VRAM layers may add breaks of their own
        regions = compile_regions(inner.diffusion_model, mode=None if mode == "default" else mode, backend=backend,
                                  fullgraph=False, dynamic=False)
        m.model_options.setdefault("transformer_options", {})[COMPILED_REGIONS] = regions
        return io.NodeOutput(m)


NODES = [DynamiCrafterCompileUNet]
