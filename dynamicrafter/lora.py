"""LoRA files for the UNet: the key layout, and merging one into a model's weights.

A LoRA file is a .safetensors with, for each adapted linear layer of the UNet at path P
(as in ``unet.named_modules()``, e.g. ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``):

    lora_unet_<P with "." -> "_">.lora_down.weight   (rank, in)
    lora_unet_<P with "." -> "_">.lora_up.weight     (out, rank)
    lora_unet_<P with "." -> "_">.alpha              ()  scale = alpha / rank

This is the layout ComfyUI's core LoRA loaders read for a model whose diffusion model is our
UNet (they derive ``lora_unet_*`` names from its parameter names), and what most SD trainers
write. The layer's weight becomes ``W + strength * alpha / rank * up @ down``.
"""
from __future__ import annotations

from pathlib import Path

import torch

PREFIX = "lora_unet_"


class LoraError(ValueError):
    """The LoRA file does not fit this model; the message says which layers."""


def lora_key(module_path: str) -> str:
    """File key stem of the UNet layer at `module_path` (relative to the UNet)."""
    return PREFIX + module_path.replace(".", "_")


def _targets(unet) -> dict[str, str]:
    """File key stem -> UNet weight name, for every weight of the UNet."""
    return {lora_key(n[: -len(".weight")]): n for n, _ in unet.named_parameters() if n.endswith(".weight")}


def lora_deltas(unet, lora: dict) -> dict[str, torch.Tensor]:
    """UNet weight name -> float32 ``alpha / rank * up @ down`` (strength 1) for a LoRA state dict."""
    stems = sorted({k.rsplit(".lora_down.weight", 1)[0] for k in lora if k.endswith(".lora_down.weight")})
    if not stems:
        raise LoraError("no '<layer>.lora_down.weight' tensors: not a LoRA file in the lora_unet_* layout")
    targets = _targets(unet)
    unknown = [s for s in stems if s not in targets]
    if unknown:
        raise LoraError(f"{len(unknown)} LoRA layers are not in this model's UNet, e.g. {unknown[:3]}: the LoRA "
                        "was trained for another architecture")
    weights = dict(unet.named_parameters())
    out = {}
    for stem in stems:
        down = lora[f"{stem}.lora_down.weight"].float()
        up = lora.get(f"{stem}.lora_up.weight")
        if up is None:
            raise LoraError(f"{stem}: lora_down without lora_up")
        rank = down.shape[0]
        alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else float(rank)
        w = weights[targets[stem]]
        delta = up.float().flatten(1) @ down.flatten(1)
        if delta.numel() != w.numel():
            raise LoraError(f"{stem}: up @ down has shape {tuple(delta.shape)}, the layer {tuple(w.shape)}")
        out[targets[stem]] = delta.reshape(w.shape) * (alpha / rank)
    return out


@torch.no_grad()
def load_lora(dc, path, strength: float = 1.0):
    """Merge the LoRA file at `path` into `dc`'s UNet weights, scaled by `strength`, in place
    (strength 0 leaves the model as it was); returns `dc`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    deltas = lora_deltas(dc.unet, load_file(str(path)))
    weights = dict(dc.unet.named_parameters())
    for name, delta in deltas.items():
        w = weights[name]
        w.copy_((w.float() + strength * delta.to(w.device)).to(w.dtype))
    return dc
