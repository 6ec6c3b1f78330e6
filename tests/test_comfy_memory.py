"""Our MODEL under ComfyUI's own memory machinery, in the real executor (tiny checkpoint, CPU):
layers from comfy.ops, partial loading (what --lowvram / --novram do on a small GPU), fp8
weights computed in the compute dtype, and the memory estimate ComfyUI plans with."""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from safetensors.torch import load_file

import comfy_runtime

REPO = comfy_runtime.REPO_ROOT
sys.path.insert(0, str(REPO / "scripts"))
from comfy_workflow import load_workflow  # noqa: E402
from run_workflow import prepare_prompt  # noqa: E402

W, H, T, STEPS = 64, 64, 4, 2
# Same weights, same fp32 compute, different code paths (a cast copy vs the loaded tensor): float32
# rounding differences of 1e-7 grow through 2 guided steps of this random model to 4.9e-5 (measured)
# on latents of magnitude ~6. fp8 rounding itself moves these latents by 3.1 (measured), so the
# bound tells fp8 storage apart from any real mistake by more than 4 orders of magnitude.
LATENT_ATOL = 2e-4


def latent_prompt(comfy, dtype: str, prefix: str, ckpt: str) -> dict:
    """The image-to-video workflow, its sampler's LATENT also saved (SaveLatent) for comparison."""
    wf = load_workflow(REPO / "workflows" / "DynamiCrafter image to video.json")
    prompt = prepare_prompt(wf, comfy.node_classes, ckpt, ["single_image.png"], W, H, T, STEPS)
    for node in prompt.values():
        if node["class_type"] == "DynamiCrafterLoader":
            node["inputs"]["dtype"] = dtype
        if node["class_type"] == "DynamiCrafterDDIMSampler":
            node["inputs"]["eta"] = 0.0
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "DynamiCrafterDDIMSampler")
    prompt["9001"] = {"class_type": "SaveLatent",
                      "inputs": {"samples": [sampler, 0], "filename_prefix": f"latents/{prefix}"}}
    return prompt


def run_latent(comfy, dtype: str, prefix: str, ckpt: str = "dc_tiny_v.safetensors") -> torch.Tensor:
    comfy.executor.reset()     # no cached node outputs: every node runs again
    comfy.run(latent_prompt(comfy, dtype, prefix, ckpt))
    files = sorted(comfy.output_dir.glob(f"latents/{prefix}*.latent"))
    assert files, f"SaveLatent wrote nothing for {prefix}"
    return load_file(str(files[-1]))["latent_tensor"]


@contextlib.contextmanager
def partial_loading(budget_bytes: float, record: list):
    """Load every model with `budget_bytes` of "VRAM" for its weights, as ComfyUI's load_models_gpu
    does under --lowvram (budget = free memory) or --novram (0.1 byte). On a CPU machine ComfyUI
    never loads partially by itself, so the budget is handed to ComfyUI's own LoadedModel.model_load."""
    import comfy.model_management as mm
    original = mm.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        out = original(self, budget_bytes, force_patch_weights=force_patch_weights)
        inner = self.model.model
        casting = [n for n, m in inner.named_modules() if getattr(m, "comfy_cast_weights", False)]
        record.append((type(inner).__name__, bool(getattr(inner, "model_lowvram", False)), len(casting)))
        return out

    mm.LoadedModel.model_load = model_load
    try:
        mm.unload_all_models()
        yield
    finally:
        mm.LoadedModel.model_load = original
        mm.unload_all_models()


@pytest.fixture(scope="module")
def rounded_ckpt(comfy, comfy_base, tiny_ckpt):
    """The tiny checkpoint with the matrices an fp8 load stores in fp8 rounded to fp8 and back:
    fp8 weights computed in fp32 must give exactly what these fp32 weights give."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dynamicrafter.models.ops import is_stored_low
    with safe_open(str(tiny_ckpt), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd = {k: v.to(torch.float8_e4m3fn).to(v.dtype) if is_stored_low(k, v) else v for k, v in sd.items()}
    name = "dc_tiny_v_fp8_rounded.safetensors"
    save_file(sd, str(comfy_base / "models" / "checkpoints" / name), metadata=meta)
    return name


def test_unet_layers_come_from_comfy_ops(comfy):
    """Every parameter of the UNet and resampler sits in a comfy.ops layer (so ComfyUI can stream it
    and cast it), except two that ComfyUI never moves by itself and our code casts at use: the
    256 model's image gate `alpha` and the resampler's learned queries."""
    from nodes_pack_access import pack
    model = pack("loader").DynamiCrafterLoader.execute("dc_tiny_v.safetensors", "fp32", "auto")[0]
    inner = model.model
    loose = []
    for name, module in inner.named_modules():
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if own and not hasattr(module, "comfy_cast_weights"):
            loose += [f"{name}.{p}" for p in own]
    assert all(n.endswith((".alpha", "image_proj_model.latents")) for n in loose), loose
    assert "image_proj_model.latents" in loose


def test_fp8_weights_and_partial_loading_in_the_executor(comfy, rounded_ckpt):
    """The image-to-video workflow with fp8_e4m3fn weights (stored fp8, cast per layer to the fp32
    compute dtype of a CPU), loaded fully and then partially (a --lowvram budget of a third of the
    UNet: the rest is streamed and cast layer by layer), gives exactly the latents of fp32 weights
    holding the same (fp8-rounded) values."""
    from nodes_pack_access import pack
    model = pack("loader").DynamiCrafterLoader.execute("dc_tiny_v.safetensors", "fp8_e4m3fn", "auto")[0]
    unet = model.model.diffusion_model
    assert unet.input_blocks[1][0].in_layers[2].weight.dtype == torch.float8_e4m3fn
    assert unet.input_blocks[1][0].in_layers[2].bias.dtype == torch.float32
    assert model.model.manual_cast_dtype == torch.float32      # CPU: computed in fp32
    budget = model.model_size() / 3
    del model, unet

    reference = run_latent(comfy, "fp32", "mem_rounded", rounded_ckpt)
    full = run_latent(comfy, "fp8_e4m3fn", "mem_fp8")
    torch.testing.assert_close(full, reference, rtol=0, atol=LATENT_ATOL)
    record = []
    with partial_loading(budget, record):
        partial = run_latent(comfy, "fp8_e4m3fn", "mem_fp8_lowvram")
    ours = [r for r in record if r[0] == "DynamiCrafterBaseModel"]
    assert ours and all(lowvram and casting > 0 for _, lowvram, casting in ours), record
    torch.testing.assert_close(partial, reference, rtol=0, atol=LATENT_ATOL)


def test_decode_node_tiles_in_the_executor(comfy, tiny_ckpt):
    """LoadImage -> ImageScale 320x320 -> VAEEncode (our loader's VAE) -> our decode node with
    tiling off and on (40x40 latent: 32-pixel tiles), in the executor: tiling really happens
    (the frames differ: this tiny VAE has random weights, so whole-frame and tiled decoding differ
    by mean 0.055 on [0, 1], measured, and by up to 0.89 where its saturated output flips), and the
    node's tiled frames equal the library's tiled decode of the same latent (ComfyUI's VAE per tile)."""
    import numpy as np
    from PIL import Image

    import dynamicrafter
    from dynamicrafter.models.tiling import tiled_decode
    from nodes_pack_access import load_input_image, pack
    comfy.executor.reset()
    prompt = {
        "1": {"class_type": "DynamiCrafterLoader", "inputs": {"ckpt_name": "dc_tiny_v.safetensors", "dtype": "fp32",
                                                              "variant": "auto"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "single_image.png"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear", "width": 320,
                                                     "height": 320, "crop": "center"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 3]}},
    }
    for i, mode in enumerate(("off", "on")):
        prompt[f"{10 + i}"] = {"class_type": "DynamiCrafterVideoDecode",
                               "inputs": {"vae": ["1", 3], "latent": ["4", 0], "frames_per_batch": 1,
                                          "trim": "keep all frames", "tiling": mode}}
        prompt[f"{20 + i}"] = {"class_type": "SaveImage", "inputs": {"images": [f"{10 + i}", 0],
                                                                     "filename_prefix": f"tiling_{mode}"}}
    comfy.run(prompt)
    pngs = {m: sorted(comfy.output_dir.glob(f"tiling_{m}*.png"))[-1] for m in ("off", "on")}
    off, on = (np.asarray(Image.open(pngs[m]), dtype=np.float32) / 255 for m in ("off", "on"))
    assert off.shape == on.shape == (320, 320, 3)
    assert 0.01 < np.abs(on - off).mean() < 0.08

    vae = pack("loader").DynamiCrafterLoader.execute("dc_tiny_v.safetensors", "fp32", "auto")[3]
    image = load_input_image(comfy.input_dir / "single_image.png")
    image = image[:, :320, :320] if image.shape[1] >= 320 and image.shape[2] >= 320 else \
        torch.nn.functional.interpolate(image.movedim(-1, 1), size=(320, 320)).movedim(1, -1)
    z = vae.encode(image)
    node = pack("decode").decode_video(vae, {"samples": z}, 1, "keep all frames", "on")
    dc = dynamicrafter.load_model(str(tiny_ckpt))
    with torch.no_grad():   # ComfyUI's VAE clamps each tile to [0, 1] before the blend: so does this
        lib = tiled_decode(lambda t: ((dc.vae.decode(t) + 1) / 2).clamp(0, 1), z, 32, 8).movedim(1, -1)
    torch.testing.assert_close(node, lib, rtol=0, atol=2e-4)


def test_memory_estimate_matches_a_counted_forward(comfy, monkeypatch):
    """The estimate ComfyUI plans sampling with on a GPU (memory_required, flash-attention branch)
    against the live activation bytes of a full-width (model_channels 320) UNet forward of 3
    guidance branches x 16 frames at sizes the factor was not derived from. The count runs on meta
    tensors, which `benchmarks/memory_estimate.py --check` and the first assertion here show to be
    the CPU run's count byte for byte. Margin: the estimate covers the count and exceeds it by at
    most 1.6x from 192x192 up."""
    import comfy.model_management as mm
    from nodes_pack_access import pack
    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory_estimate import measure, random_unet

    assert measure(random_unet(64, "meta"), 3, 4, 8, 16) == measure(random_unet(64, "cpu"), 3, 4, 8, 16)
    model = pack("loader").DynamiCrafterLoader.execute("dc_tiny_v.safetensors", "fp32", "auto")[0].model
    monkeypatch.setattr(mm, "xformers_enabled", lambda: False)
    monkeypatch.setattr(mm, "pytorch_attention_flash_attention", lambda: True)
    full_width = random_unet(320, "meta")
    for shape in ((3, 4, 16, 24, 24), (3, 4, 16, 48, 48), (3, 4, 24, 40, 64)):
        counted = measure(full_width, shape[0], *shape[2:])
        estimate = model.memory_required(list(shape))
        assert counted <= estimate <= 1.6 * counted, (shape, counted / 2**20, estimate / 2**20)
