"""LoRA fine-tuning end to end: training/ trains adapters on a frozen tiny UNet, exports the
lora_unet_* file, and ComfyUI's core LoraLoaderModelOnly applies it to our MODEL in the real
executor with the output of the library's merged weights; strength 0 is the base model."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SMOKE = os.path.join(ROOT, "training", "configs", "tiny_smoke.yaml")
TINY = yaml.safe_load(open(SMOKE))["model"]["tiny_overrides"]
LORA = "{rank: 4, alpha: 8, targets: [spatial_attn, temporal_attn, image_kv]}"


def _env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.pop("DCTRAIN_FAULT", None)
    return e


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base checkpoint, LoRA file, run dir): a stage-3 tiny base and 3 LoRA steps on it."""
    from training import synthetic
    from training.config import load_config
    from training.modeling import export_safetensors
    from training.modeling import build_model

    out = tmp_path_factory.mktemp("lora")
    csv = synthetic.generate_dataset(str(out / "data"), 4, height=32, width=32, frames=8, seed=2)
    base = str(out / "dc_lora_base.safetensors")
    export_safetensors(build_model(load_config(SMOKE, [f"data.csv={csv}", "run.stage=3"])), base, "fp32")
    run = out / "run"
    p = subprocess.run([sys.executable, "-m", "training.train", SMOKE, f"data.csv={csv}", f"run.run_dir={run}",
                        "run.stage=3", "model.tiny=false", f"model.init={base}", f"run.lora={LORA}",
                        "run.max_steps=3", "run.save_every=3", "optim.lr=1e-2"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["export"].endswith("lora.safetensors")
    return base, str(run / "lora.safetensors"), run


def test_lora_run_trains_only_adapters_and_exports_lora_unet_keys(trained):
    from safetensors import safe_open

    from training import checkpoint as ck
    base, lora, run = trained
    state = ck.load_latest(str(run))
    assert state["trainable"] and all(".lora_A." in k or ".lora_B." in k for k in state["trainable"])
    with safe_open(lora, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        ups = [f.get_tensor(k) for k in keys if k.endswith(".lora_up.weight")]
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any("attn2_to_k_ip" in k for k in keys) and not any("ff_net" in k for k in keys)
    assert alphas == {8.0} and json.loads(meta["lora_spec"])["rank"] == 4
    assert max(float(u.abs().max()) for u in ups) > 0      # B started at zero and was trained
    # the base model's tensors are untouched by a LoRA run: the export holds only the adapters
    assert not any(".lora_" in k for k in keys if not k.startswith("lora_unet_"))


def test_library_load_lora_merges_and_strength_zero_is_the_base(trained):
    import dynamicrafter
    from dynamicrafter.checkpoints.lora import LoraError
    base, lora, _ = trained
    plain = dynamicrafter.load_model(base)
    merged = dynamicrafter.load_lora(dynamicrafter.load_model(base), lora, 0.7)
    zero = dynamicrafter.load_lora(dynamicrafter.load_model(base), lora, 0.0)
    a, b, z = (dict(m.unet.named_parameters()) for m in (plain, merged, zero))
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(k.endswith(".weight") and ("attn" in k) for k in changed)
    assert all(torch.equal(a[k], z[k]) for k in a)
    other = dynamicrafter.load_model(base)
    with pytest.raises(LoraError, match="not found"):
        dynamicrafter.load_lora(other, lora + ".missing")


def _lora_prompt(comfy, ckpt, lora_name=None, strength=1.0, prefix="lora"):
    from test_comfy_nodes import tiny_prompt
    prompt = tiny_prompt(comfy, "DynamiCrafter with KSampler.json", ckpt=ckpt, frames=4, steps=3)
    loader = next(k for k, v in prompt.items() if v["class_type"] == "DynamiCrafterLoader")
    sampler = next(k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced")
    if lora_name is not None:
        for node in prompt.values():
            for name, value in node["inputs"].items():
                if value == [loader, 0]:
                    node["inputs"][name] = ["900", 0]
        prompt["900"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": [loader, 0], "lora_name": lora_name, "strength_model": strength}}
    prompt["901"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": prefix}}
    return prompt


def _run_latent(comfy, prompt, prefix):
    from safetensors.torch import load_file
    comfy.run(prompt)
    files = sorted(glob.glob(str(comfy.output_dir / "**" / f"{prefix}*.latent"), recursive=True))
    assert files, f"SaveLatent wrote nothing for {prefix}"
    return load_file(files[-1])["latent_tensor"]


def test_core_lora_loader_applies_it_like_merged_weights(comfy, comfy_base, trained):
    import dynamicrafter
    base, lora, _ = trained
    ckpts = comfy_base / "models" / "checkpoints"
    loras = comfy_base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for src, dst in ((base, ckpts / "dc_lora_base.safetensors"), (lora, loras / "dc_tiny_lora.safetensors")):
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        os.symlink(src, dst)
    merged = dynamicrafter.load_lora(dynamicrafter.load_model(base), lora, 0.8)
    dynamicrafter.save_checkpoint(merged, ckpts / "dc_lora_merged.safetensors")

    plain = _run_latent(comfy, _lora_prompt(comfy, "dc_lora_base.safetensors", prefix="l_plain"), "l_plain")
    patched = _run_latent(comfy, _lora_prompt(comfy, "dc_lora_base.safetensors", "dc_tiny_lora.safetensors", 0.8,
                                              prefix="l_patched"), "l_patched")
    ref = _run_latent(comfy, _lora_prompt(comfy, "dc_lora_merged.safetensors", prefix="l_merged"), "l_merged")
    zero = _run_latent(comfy, _lora_prompt(comfy, "dc_lora_base.safetensors", "dc_tiny_lora.safetensors", 0.0,
                                           prefix="l_zero"), "l_zero")
    assert float((patched - plain).abs().max()) > 1e-3, "the LoRA changed nothing: were its keys matched?"
    assert torch.allclose(patched, ref, atol=1e-5, rtol=1e-5), float((patched - ref).abs().max())
    assert torch.equal(zero, plain)
