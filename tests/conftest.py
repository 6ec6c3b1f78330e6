"""Shared pytest fixtures.  Sections are owned by different parts of the project; keep each
section's fixtures together and re-read this file before editing it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# The ComfyUI runtime helper is product code (scripts/demo.sh runs through it); tests import it too.
for _dir in (TESTS_DIR, TESTS_DIR.parent / "scripts"):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))


# =============================================================================================
# ComfyUI runtime fixtures (node pack / workflow / server / browser tests)
# =============================================================================================
import comfy_runtime  # noqa: E402


def _reference_or_skip() -> Path:
    ref = comfy_runtime.reference_dir()
    if not (ref / "tiny_v" / "model.safetensors").is_file():
        pytest.skip(f"reference folder not found at {ref} (set DYNAMICRAFTER_REFERENCE or put "
                    f"shared/reference beside the repo); ComfyUI integration tests need its tiny checkpoint")
    return ref


def _comfy_or_skip() -> None:
    reason = comfy_runtime.comfy_missing_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def comfy_reference() -> Path:
    """The shared reference folder (skips when absent)."""
    return _reference_or_skip()


@pytest.fixture(scope="session")
def tiny_ckpt(comfy_reference) -> Path:
    """The tiny v-prediction DynamiCrafter checkpoint in the official key layout."""
    return comfy_reference / "tiny_v" / "model.safetensors"


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, comfy_reference) -> Path:
    """A ComfyUI base directory with the pack linked in and the tiny checkpoint(s) installed."""
    _comfy_or_skip()
    base = tmp_path_factory.mktemp("comfy_base")
    models = {"checkpoints": {"dc_tiny_v.safetensors": comfy_reference / "tiny_v" / "model.safetensors"}}
    vc2 = comfy_reference / "tiny_vc2" / "model.safetensors"
    if vc2.is_file():
        models["checkpoints"]["vc2_tiny.safetensors"] = vc2
    vc1 = comfy_reference / "tiny_vc1" / "model.safetensors"
    if vc1.is_file():
        models["checkpoints"]["vc1_tiny.safetensors"] = vc1
    toon = comfy_reference / "tiny_toon"
    if (toon / "model.safetensors").is_file():
        models["checkpoints"]["toon_tiny.safetensors"] = toon / "model.safetensors"
        # its official inference YAML beside it (text tower head widths), with the custom OpenCLIP
        # architecture that YAML names
        models["checkpoints"]["toon_tiny.yaml"] = toon / "config.yaml"
        models["checkpoints"]["toon_tiny_arch.json"] = toon / "hyperparameters.json"
    cami2v = comfy_reference / "tiny_cami2v"
    if (cami2v / "model.safetensors").is_file():     # CamI2V, with its YAML (heads, epipolar settings)
        models["checkpoints"]["cami2v_tiny.safetensors"] = cami2v / "model.safetensors"
        models["checkpoints"]["cami2v_tiny.yaml"] = cami2v / "config.yaml"
        models["checkpoints"]["cami2v_tiny_arch.json"] = cami2v / "hyperparameters.json"
    inputs = {f"toon_{f.name}": f for f in sorted((toon / "inputs").glob("*.png"))}
    for sub in ("single", "interp"):
        folder = comfy_reference / "tiny_v" / "inputs" / sub
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                    inputs[f"{sub}_{f.name}"] = f
    return comfy_runtime.make_base_dir(base, models=models, inputs=inputs)


@pytest.fixture(scope="session")
def comfy(comfy_base):
    """ComfyUI's real executor, in this process, with the pack loaded (one per session)."""
    rt = comfy_runtime.InProcessComfy.get()
    if rt is None:
        rt = comfy_runtime.InProcessComfy(comfy_base)
    yield rt


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    """ComfyUI's HTTP server as a subprocess (shared by the server and browser tests)."""
    srv = comfy_runtime.ComfyServer(comfy_base, log_path=comfy_base / "server.log")
    srv.start(timeout=float(os.environ.get("DC_COMFY_START_TIMEOUT", "180")))
    yield srv
    srv.stop()


# ===================================== end of ComfyUI runtime fixtures ==========================


# =============================================================================================
# Model library fixtures (parity with the official reference tensors, checkpoints)
# =============================================================================================
import torch  # noqa: E402


def _reference_file(*parts) -> Path:
    path = comfy_runtime.reference_dir().joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not found: the parity tests need the shared reference tensors "
                    f"(../shared/reference beside the repo, or DYNAMICRAFTER_REFERENCE)")
    return path


def load_reference(name: str):
    """(model, reference tensors, manifest) of ../shared/reference/<name> (skips when absent)."""
    import json

    from safetensors.torch import load_file

    import dynamicrafter
    model = dynamicrafter.load_model(_reference_file(name, "model.safetensors"))
    tensors = load_file(_reference_file(name, "reference.safetensors"))
    manifest = json.loads(_reference_file(name, "manifest.json").read_text())
    return model, tensors, manifest


@pytest.fixture(scope="session")
def ref_v():
    """The tiny v-prediction DynamiCrafter and what the official code computed with it."""
    return load_reference("tiny_v")


@pytest.fixture(scope="module")
def tiny_random():
    """A tiny random DynamiCrafter (default config, 4 frames, weights nudged off their zero
    inits so every branch matters) and random inputs: (dc, x_T, concat, cond, uncond)."""
    import dynamicrafter
    torch.manual_seed(0)
    dc = dynamicrafter.DynamiCrafter(dynamicrafter.tiny_config(frames=4)).eval()
    with torch.no_grad():
        for p in dc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    cond, uncond = [torch.randn(1, 77 + 64, 64, generator=g) for _ in range(2)]
    concat = torch.randn(1, 4, 4, 8, 8, generator=g)
    return dc, torch.randn(1, 4, 4, 8, 8, generator=g), concat, cond, uncond


@pytest.fixture(scope="session")
def tiny_v_state_dict():
    import dynamicrafter
    sd, _ = dynamicrafter.read_state_dict(_reference_file("tiny_v", "model.safetensors"))
    return sd


def module_outputs(modules: dict, call):
    """(call(), {name: a copy of what module `modules[name]` returned}), read with forward hooks
    so the model itself carries no test seams (a module run twice records its last output)."""
    record, handles = {}, []
    for name, module in modules.items():
        if module is not None:
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: record.__setitem__(name, o.detach().clone())))
    try:
        out = call()
    finally:
        for h in handles:
            h.remove()
    return out, record


def unet_block_outputs(unet, *args, **kwargs):
    """(output, {block name: its output}) of one UNet call, named like the reference's
    `unet.debug.*` tensors (embeddings, every input/output block, init_attn, middle block)."""
    modules = {"time_embed": unet.time_embed, "fps_embedding": getattr(unet, "fps_embedding", None),
               "init_attn": getattr(unet, "init_attn", None), "middle_block": unet.middle_block}
    modules.update({f"input_blocks.{i:02d}": b for i, b in enumerate(unet.input_blocks)})
    modules.update({f"output_blocks.{i:02d}": b for i, b in enumerate(unet.output_blocks)})
    return module_outputs(modules, lambda: unet(*args, **kwargs))


def assert_conditioning_is_official(c, ref, k: str, dual_cfg: bool):
    """Our `image_conditioning` output c against a reference case's (key prefix k) conditioning."""
    assert_close_to_ref(c.cond, ref[k + "cond.c_crossattn"], name="cond")
    assert_close_to_ref(c.uncond, ref[k + "uncond.c_crossattn"], name="uncond")
    assert_close_to_ref(c.concat, ref[k + "cond.c_concat"], name="concat")
    if dual_cfg:
        assert_close_to_ref(c.uncond_img, ref[k + "uncond_img_nonetext.c_crossattn"], name="uncond_img")


def assert_close_to_ref(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4, name: str = ""):
    """design §13: max|ours - ref| <= rel * max(1, max|ref|)."""
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours.detach().float().cpu() - ref.float()).abs().max().item()
    tol = rel * max(1.0, ref.float().abs().max().item())
    assert diff <= tol, f"{name}: max|diff| {diff:.3e} > tolerance {tol:.3e}"

# ===================================== end of model library fixtures =============================
