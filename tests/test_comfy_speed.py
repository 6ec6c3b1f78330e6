"""ComfyUI's speed switches on our MODEL in the real executor (CPU, tiny model): its attention
(the function its flags choose) runs our UNet's attention on both sampler paths, core
TorchCompileModel and our regional 'Compile UNet' node compile it without recompiling across
steps, the node's fused projections and channels-last switches reach both sampler paths, and
core EasyCache / LazyCache skip UNet calls."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

import comfy_runtime

REPO = comfy_runtime.REPO_ROOT
sys.path.insert(0, str(REPO / "scripts"))
from comfy_workflow import load_workflow  # noqa: E402
from run_workflow import prepare_prompt  # noqa: E402

W, H, T = 64, 64, 2
KSAMPLER = "DynamiCrafter with KSampler.json"
DDIM = "DynamiCrafter image to video.json"


def prompt_with(comfy, workflow: str, prefix: str, steps: int = 3, patch: dict | None = None) -> dict:
    """The workflow at a tiny size, its sampled LATENT saved; `patch` (a node taking `model`) sits
    between the loader and the sampler."""
    wf = load_workflow(REPO / "workflows" / workflow)
    prompt = prepare_prompt(wf, comfy.node_classes, "dc_tiny_v.safetensors", ["single_image.png"], W, H, T, steps)
    loader = next(k for k, v in prompt.items() if v["class_type"] == "DynamiCrafterLoader")
    for node in prompt.values():
        if node["class_type"] == "DynamiCrafterLoader":
            node["inputs"]["dtype"] = "fp32"
        if node["class_type"] == "DynamiCrafterDDIMSampler":
            node["inputs"]["eta"] = 0.0
    sampler = next(k for k, v in prompt.items()
                   if v["class_type"] in ("SamplerCustomAdvanced", "DynamiCrafterDDIMSampler"))
    if patch is not None:
        prompt["9100"] = {"class_type": patch["class_type"], "inputs": {"model": [loader, 0], **patch["inputs"]}}
        consumer = next(k for k, v in prompt.items()
                        if v["class_type"] in ("DualCFGGuider", "DynamiCrafterDDIMSampler"))
        prompt[consumer]["inputs"]["model"] = ["9100", 0]
    prompt["9001"] = {"class_type": "SaveLatent",
                      "inputs": {"samples": [sampler, 0], "filename_prefix": f"speed/{prefix}"}}
    decode = ("DynamiCrafterVideoDecode", "CreateVideo", "SaveVideo")
    for k in [k for k, v in prompt.items() if v["class_type"] in decode]:
        del prompt[k]    # the latent is what is compared
    return prompt


def run_latent(comfy, prompt: dict, prefix: str) -> torch.Tensor:
    comfy.executor.reset()
    comfy.run(prompt)
    files = sorted(comfy.output_dir.glob(f"speed/{prefix}_[0-9]*.latent"))
    assert files, f"SaveLatent wrote nothing for {prefix}"
    return load_file(str(files[-1]))["latent_tensor"]


class UNetCalls:
    """Counts forwards of the library UNet (a global module hook: ComfyUI builds the model)."""

    def __enter__(self):
        from dynamicrafter.models.unet import UNet3D
        self.n = 0

        def hook(module, args, out):
            if isinstance(module, UNet3D):
                self.n += 1
        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("workflow", [KSAMPLER, DDIM])
def test_comfy_attention_function_runs_our_attention(comfy, monkeypatch, workflow):
    """With a flag ComfyUI picks an attention function (here its SDPA one, as --use-pytorch-cross-
    attention or a CUDA device would): our UNet's attention goes through it on the core and the
    pack's sampler path, with the same result as the library's SDPA. Without a flag on the CPU
    ComfyUI only falls back to sub-quadratic attention, and the library keeps its exact SDPA."""
    import comfy.ldm.modules.attention as attn
    from nodes_pack_access import pack
    tag = "k" if workflow == KSAMPLER else "d"
    assert attn.optimized_attention is attn.attention_sub_quad        # CPU, no flag
    assert pack("comfy_model").comfy_attention({}) is None
    ref = run_latent(comfy, prompt_with(comfy, workflow, f"attn_ref_{tag}"), f"attn_ref_{tag}")
    calls = []

    def recorded(q, k, v, heads, **kw):
        calls.append(q.shape)
        return attn.attention_pytorch(q, k, v, heads, **kw)

    monkeypatch.setattr(attn, "optimized_attention", recorded)
    out = run_latent(comfy, prompt_with(comfy, workflow, f"attn_sdpa_{tag}"), f"attn_sdpa_{tag}")
    assert calls, "ComfyUI's attention function was never called"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def compiled_runs(comfy, workflow: str, tag: str, patch: dict) -> tuple[torch.Tensor, int]:
    """A 1-step run with `patch` compiles; then a 3-step run (other seed-independent sigmas, new
    loads of the MODEL) must reuse every graph: error_on_recompile raises on any recompilation.
    Returns (the 3-step latent, graphs compiled)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    try:
        run_latent(comfy, prompt_with(comfy, workflow, f"warm_{tag}", steps=1, patch=patch), f"warm_{tag}")
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = run_latent(comfy, prompt_with(comfy, workflow, f"hot_{tag}", steps=3, patch=patch), f"hot_{tag}")
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        torch._dynamo.reset()
    return out, graphs


def guidance_gain(cfg_conds: float, cfg_cond2_negative: float) -> float:
    """How much DualCFGGuider can amplify an error in its branches: the L1 norm of its weights,
    out = (1 - c2) * uncond + (c2 - c1) * cond2 + c1 * cond1."""
    c1, c2 = cfg_conds, cfg_cond2_negative
    return abs(1 - c2) + abs(c2 - c1) + abs(c1)


def test_core_torch_compile_model_compiles_our_unet_once(comfy):
    """Core 'TorchCompileModel' (inductor, the whole UNet) on the KSampler path: the result stays
    within float32 rounding of eager, and later steps and runs reuse the compiled graphs.

    The bound is 1e-4 (latents of magnitude ~13, 3 steps) per unit of guidance gain: inductor's
    reordered sums differ from eager in the last bits of each branch, and the guider scales those
    differences. Measured on this tiny model (max|out - eager|): 5.8e-5 at cfg 1 / 1 (gain 1),
    2.1e-4 at 3 / 3 (gain 5), 1.2e-4 at 7.5 / 1.5 and 9.1e-4 at 7.5 / 7.5 (gain 14)."""
    ref = run_latent(comfy, prompt_with(comfy, KSAMPLER, "tc_ref"), "tc_ref")
    out, graphs = compiled_runs(comfy, KSAMPLER, "tc", {"class_type": "TorchCompileModel",
                                                        "inputs": {"backend": "inductor"}})
    assert graphs >= 1
    import dynamicrafter
    from conftest import _reference_file
    from nodes_pack_access import pack
    variant = dynamicrafter.load_model(_reference_file("tiny_v", "model.safetensors")).variant
    own = pack("defaults").guidance_outputs(variant)       # what Variant Defaults feeds the guider
    gain = guidance_gain(own["cfg_text"], own["cfg_cond2_negative"])
    assert gain == 14.0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * gain)


@pytest.mark.parametrize("workflow", [KSAMPLER, DDIM])
def test_compile_unet_node_compiles_blocks_on_both_sampler_paths(comfy, workflow):
    """'DynamiCrafter Compile UNet' attaches compiled blocks to the MODEL it outputs (the input
    MODEL stays eager): both samplers run them, later steps and runs reuse the graphs, and
    Dynamo's tracing replays eager exactly (the inductor bound is tested on the blocks in
    test_fast_paths.py)."""
    from torch._dynamo.utils import counters
    tag = "k" if workflow == KSAMPLER else "d"
    ref = run_latent(comfy, prompt_with(comfy, workflow, f"cu_ref_{tag}"), f"cu_ref_{tag}")
    out, graphs = compiled_runs(comfy, workflow, f"cu_{tag}", {"class_type": "DynamiCrafterCompileUNet",
                                                               "inputs": {"backend": "eager", "mode": "default"}})
    assert graphs >= 3, graphs       # one per block class, structure and shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    counters.clear()
    again = run_latent(comfy, prompt_with(comfy, workflow, f"cu_ref2_{tag}"), f"cu_ref2_{tag}")
    assert counters["stats"]["unique_graphs"] == 0     # the plain MODEL never runs compiled code
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


class FastPathFlags:
    """Records, at every forward of the library's attention layers and UNet, whether the fused
    projections and channels-last activations were on (a global module hook)."""

    def __enter__(self):
        from dynamicrafter.models.unet import CrossAttention, UNet3D
        self.fused, self.channels_last = set(), set()

        def hook(module, args):
            if isinstance(module, CrossAttention):
                self.fused.add(module.fused)
            elif isinstance(module, UNet3D):
                self.channels_last.add(module.channels_last)
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("workflow", [KSAMPLER, DDIM])
def test_compile_unet_node_switches_fused_projections_and_channels_last(comfy, workflow):
    """'DynamiCrafter Compile UNet' with backend none, fuse_projections and channels_last: every
    attention layer runs fused and the UNet channels-last on both sampler paths, within the
    library's bounds of eager (1e-5 and 2e-5 of one forward's output magnitude; after 3 steps 1e-4
    of the latent's, measured 5e-5 on the KSampler path); the switches are object patches of the
    output MODEL, so the input MODEL afterwards runs plain again, bit for bit."""
    tag = "k" if workflow == KSAMPLER else "d"
    with FastPathFlags() as plain:
        ref = run_latent(comfy, prompt_with(comfy, workflow, f"fp_ref_{tag}"), f"fp_ref_{tag}")
    assert plain.fused == {False} and plain.channels_last == {False}
    patch = {"class_type": "DynamiCrafterCompileUNet",
             "inputs": {"backend": "none", "mode": "default", "fuse_projections": True, "channels_last": True}}
    with FastPathFlags() as fast:
        out = run_latent(comfy, prompt_with(comfy, workflow, f"fp_{tag}", patch=patch), f"fp_{tag}")
    assert fast.fused == {True} and fast.channels_last == {True}
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel < 1e-4, rel
    with FastPathFlags() as after:
        again = run_latent(comfy, prompt_with(comfy, workflow, f"fp_ref2_{tag}"), f"fp_ref2_{tag}")
    assert after.fused == {False} and after.channels_last == {False}
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


@pytest.mark.parametrize("node,start", [("EasyCache", 0.1), ("LazyCache", 0.5)])
def test_core_step_caches_skip_unet_calls(comfy, node, start):
    """Core EasyCache (wraps the diffusion model: our apply_model runs its wrappers) and LazyCache
    (wraps noise prediction) reuse earlier outputs: fewer UNet forwards than without, a result
    still near the uncached one. LazyCache reuses (denoised - x) of an earlier step, which on the
    zero-terminal-SNR schedule's huge first sigmas is far off (measured: 19x the latent's range
    when starting at 10%): start it later."""
    steps = 6
    with UNetCalls() as plain:
        ref = run_latent(comfy, prompt_with(comfy, KSAMPLER, f"{node}_ref", steps), f"{node}_ref")
    with UNetCalls() as cached:
        out = run_latent(comfy, prompt_with(comfy, KSAMPLER, node, steps, patch={
            "class_type": node, "inputs": {"reuse_threshold": 0.5, "start_percent": start, "end_percent": 0.95,
                                           "verbose": False}}), node)
    assert 0 < cached.n < plain.n, (cached.n, plain.n)
    assert torch.isfinite(out).all()
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 0.5, rel
