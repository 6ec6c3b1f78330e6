"""LoRA fine-tuning: low-rank adapters (peft) on chosen layer groups of a frozen UNet.

``run.lora: {rank: 16, alpha: 16, targets: [spatial_attn, image_kv]}`` wraps every linear
layer of the chosen groups in a peft ``lora.Linear`` (``W x + alpha / rank * B A x``, B starting
at zero, so training starts from the base model exactly); everything else, the Resampler
included, stays frozen. The export is one .safetensors in the ``lora_unet_*`` layout of
``dynamicrafter.checkpoints.lora``: ComfyUI's core LoraLoaderModelOnly applies it to our MODEL, and
``dynamicrafter.load_lora`` merges it into a library model.

Layer groups (linear layers of the UNet's transformers):
  spatial_attn   self- and text cross-attention of the spatial transformers (q, k, v, out)
  image_kv       the image context projections to_k_ip / to_v_ip
  spatial_ff     the spatial transformers' feed-forward layers
  temporal_attn  self-attention of the temporal transformers (q, k, v, out)
  temporal_ff    the temporal transformers' feed-forward layers
"""
from __future__ import annotations

import dataclasses
import json
import re

import torch

from dynamicrafter.checkpoints.lora import lora_key
from dynamicrafter.models.unet import is_temporal_parameter

GROUPS = ("spatial_attn", "image_kv", "spatial_ff", "temporal_attn", "temporal_ff")
_ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_IMAGE_KV = re.compile(r"\.attn2\.(to_k_ip|to_v_ip)$")
_FF = re.compile(r"\.ff\.net\.(0\.proj|2)$")
UNET = "model.diffusion_model."


def group_of(name: str, unet) -> str | None:
    """Which group the UNet linear layer at `name` belongs to (None: not adaptable)."""
    temporal = is_temporal_parameter(name + ".weight", unet)
    side = "temporal" if temporal else "spatial"
    if _IMAGE_KV.search(name):
        return None if temporal else "image_kv"
    if _ATTN.search(name):
        return f"{side}_attn"
    if _FF.search(name):
        return f"{side}_ff"
    return None


def target_modules(unet, targets) -> list[str]:
    wanted = set(targets)
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and group_of(n, unet) in wanted]


def add_lora(dc, spec: dict) -> list[str]:
    """Wrap the target layers of dc.unet in peft LoRA layers; returns the names (in
    dc.named_parameters()) of the adapter weights, the only ones to train."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_modules(dc.unet, spec["targets"])
    if not names:
        raise ValueError(f"run.lora.targets {spec['targets']} select no layer of this UNet")
    rank = int(spec["rank"])
    config = LoraConfig(r=rank, lora_alpha=float(spec.get("alpha", rank)), target_modules=names,
                        lora_dropout=float(spec.get("dropout", 0.0)), bias="none")
    inject_adapter_in_model(config, dc.unet)
    return [n for n, _ in dc.named_parameters() if n.startswith(UNET) and ".lora_" in n]


def lora_layers(unet):
    """(path of the adapted layer, peft LoRA layer) for every adapted layer."""
    from peft.tuners.lora import LoraLayer
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]


def lora_state_dict(unet, dtype=torch.float32) -> dict:
    """The adapters in the lora_unet_* layout (what ComfyUI and dynamicrafter.load_lora read)."""
    out = {}
    for name, layer in lora_layers(unet):
        stem = lora_key(name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        out[f"{stem}.lora_down.weight"] = a.detach().to("cpu", dtype).contiguous()
        out[f"{stem}.lora_up.weight"] = b.detach().to("cpu", dtype).contiguous()
        # alpha stored so that alpha / rank is peft's scaling for this layer
        out[f"{stem}.alpha"] = torch.tensor(float(layer.scaling["default"]) * a.shape[0], dtype=dtype)
    if not out:
        raise ValueError("the model has no LoRA layers to export")
    return out


def export_lora(dc, path: str, spec: dict, dtype: str = "fp32", weights: str = "") -> str:
    """Write the LoRA file atomically, with the run's LoRA settings as metadata."""
    import os

    from safetensors.torch import save_file

    from dynamicrafter.config import DTYPES
    sd = lora_state_dict(dc.unet, DTYPES[dtype])
    meta = {"format": "pt", "lora_spec": json.dumps(spec), "training_weights": weights,
            "base_unet": json.dumps(dataclasses.asdict(dc.unet.cfg))}
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)
    os.chmod(path, 0o644)     # readable by a ComfyUI running as another user, whatever the umask
    return path
