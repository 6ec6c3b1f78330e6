"""DynamiCrafter Compile UNet: the UNet's fast paths for every sampler that runs this MODEL (core
KSampler / SamplerCustomAdvanced and the pack's own): regional torch.compile of its repeated
blocks, fused attention projections and channels-last activations (dynamicrafter.models.speed).
Core 'TorchCompileModel' works on our MODEL too (it compiles the whole UNet: slow first use);
fp8 matrix products for fp8 weights are ComfyUI's own switch (--fast fp8_matrix_mult)."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from dynamicrafter.models.speed import compile_regions, fast_path_switches

from .comfy_model import COMPILED_REGIONS, require_dynamicrafter_model
from .inputs import CATEGORY

BACKENDS = ["inductor", "eager", "none"]
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
                        "Optionally fuses the attention projections and runs the activations channels-last. "
                        "Same math up to float rounding. For fp8 weights, ComfyUI's --fast fp8_matrix_mult "
                        "multiplies them in fp8.",
            inputs=[io.Model.Input("model"),
                    io.Combo.Input("backend", options=BACKENDS, default="inductor",
                                   tooltip="inductor: fused kernels (the speed-up); eager: only checks tracing; "
                                           "none: no compilation (only the switches below)"),
                    io.Combo.Input("mode", options=MODES, default="default",
                                   tooltip="max-autotune-no-cudagraphs: longer first compile, tries faster kernels"),
                    io.Boolean.Input("fuse_projections", default=False, optional=True,
                                     tooltip="q/k/v of each self-attention and k/v of each cross-attention as "
                                             "one matrix product (no extra memory; within 1e-5 of unfused)"),
                    io.Boolean.Input("channels_last", default=False, optional=True,
                                     tooltip="activations in channels-last layout: cuDNN's NHWC convolutions and "
                                             "no layout copy before each spatial transformer (GPU; within 2e-5)")],
            outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, model, backend, mode, fuse_projections=False, channels_last=False) -> io.NodeOutput:
        inner = require_dynamicrafter_model(model)
        m = model.clone()
        if backend != "none":
            # fullgraph off: ComfyUI's weight-casting / low-VRAM layers may add breaks of their own
            regions = compile_regions(inner.diffusion_model, mode=None if mode == "default" else mode,
                                      backend=backend, fullgraph=False, dynamic=False)
            m.model_options.setdefault("transformer_options", {})[COMPILED_REGIONS] = regions
        # attributes set while this MODEL is loaded and put back after (the weights are not touched)
        for path, value in fast_path_switches(inner.diffusion_model, fuse_projections, channels_last).items():
            m.add_object_patch(f"diffusion_model.{path}", value)
        return io.NodeOutput(m)


NODES = [DynamiCrafterCompileUNet]
