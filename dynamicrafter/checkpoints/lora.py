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

import math
from math import prod
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


# adapter kinds other trainers write that this merge does not implement: refused by name, never dropped
UNSUPPORTED = {".dora_scale": "DoRA (its magnitude vector dora_scale)", ".hada_": "LoHa (hada_* tensors)",
               ".lokr_": "LoKr (lokr_* tensors)", ".lora_mid.": "LoCon with a mid tensor (lora_mid)",
               ".diff": "a full weight difference (diff)", ".lora_down.bias": "LoRA biases",
               ".lora_up.bias": "LoRA biases"}
PARTS = (".lora_down.weight", ".lora_up.weight", ".alpha")


def check_lora(unet, shapes: dict) -> list[str]:
    """The adapted layers' key stems, after checking a LoRA's tensor shapes ({key: shape}, read
    from the file's header before any tensor) against `unet`: every lora_unet_* key a LoRA part
    this merge implements, down (rank, in) and up (out, rank) of the layer's size."""
    for k in shapes:
        for mark, kind in UNSUPPORTED.items():
            if k.startswith(PREFIX) and mark in k:
                raise LoraError(f"{k}: {kind} is not supported; only plain LoRA (lora_down, lora_up, alpha) merges")
    odd = [k for k in shapes if k.startswith(PREFIX) and not k.endswith(PARTS)]
    if odd:
        raise LoraError(f"{len(odd)} tensors of unknown kind, e.g. {odd[:3]}: only plain LoRA (lora_down, lora_up, "
                        "alpha) merges")
    stems = sorted({k.rsplit(".lora_down.weight", 1)[0] for k in shapes if k.endswith(".lora_down.weight")})
    if not stems:
        raise LoraError("no '<layer>.lora_down.weight' tensors: not a LoRA file in the lora_unet_* layout")
    targets = _targets(unet)
    unknown = [s for s in stems if s not in targets]
    if unknown:
        raise LoraError(f"{len(unknown)} LoRA layers are not in this model's UNet, e.g. {unknown[:3]}: the LoRA "
                        "was trained for another architecture")
    weights = dict(unet.named_parameters())
    for stem in stems:
        down, up = tuple(shapes[f"{stem}.lora_down.weight"]), shapes.get(f"{stem}.lora_up.weight")
        if up is None:
            raise LoraError(f"{stem}: lora_down without lora_up")
        up, w = tuple(up), tuple(weights[targets[stem]].shape)
        fan_in = prod(w[1:])
        if (len(down) < 2 or len(up) < 2 or up[0] != w[0] or prod(down[1:]) != fan_in or prod(up[1:]) != down[0]
                or down[0] <= 0):
            raise LoraError(f"{stem}: lora_down {down} and lora_up {up} do not fit the layer's weight {w}")
        alpha = shapes.get(f"{stem}.alpha")
        if alpha is not None and prod(alpha) != 1:
            raise LoraError(f"{stem}.alpha has shape {tuple(alpha)}, not a single number")
    orphans = [k for k in shapes if k.startswith(PREFIX) and k.rsplit(".", 2)[0] not in stems
               and k.rsplit(".", 1)[0] not in stems]
    if orphans:
        raise LoraError(f"{orphans[0]}: no lora_down.weight for this layer")
    return stems


def lora_deltas(unet, lora: dict) -> dict[str, torch.Tensor]:
    """UNet weight name -> float32 ``alpha / rank * up @ down`` (strength 1) for a LoRA state dict."""
    stems = check_lora(unet, {k: tuple(v.shape) for k, v in lora.items()})
    targets = _targets(unet)
    weights = dict(unet.named_parameters())
    out = {}
    for stem in stems:
        down = lora[f"{stem}.lora_down.weight"].float()
        up = lora[f"{stem}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else float(rank)
        if not math.isfinite(alpha):
            raise LoraError(f"{stem}.alpha is {alpha}; a LoRA scale must be a finite number")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LoraError(f"{stem}: lora_down or lora_up holds NaN or infinite values")
        w = weights[targets[stem]]
        out[targets[stem]] = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * (alpha / rank)
    return out


@torch.no_grad()
def load_lora(dc, path, strength: float = 1.0):
    """Merge the LoRA file at `path` into `dc`'s UNet weights, scaled by `strength`, in place
    (strength 0 leaves the model as it was); returns `dc`. Shapes are checked from the file's
    header before any tensor is read."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    if not math.isfinite(float(strength)):
        raise LoraError(f"LoRA strength is {strength}; it must be a finite number")
    try:
        with safe_open(str(path), framework="pt") as f:
            check_lora(dc.unet, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            lora = {k: f.get_tensor(k) for k in f.keys()}
    except LoraError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad header, a truncated file
        raise LoraError(f"could not read the LoRA {path.name}: not a .safetensors file or truncated "
                        f"({type(e).__name__}: {str(e)[:120]})") from None
    deltas = lora_deltas(dc.unet, lora)
    weights = dict(dc.unet.named_parameters())
    for name, delta in deltas.items():
        w = weights[name]
        w.copy_((w.float() + strength * delta.to(w.device)).to(w.dtype))
    return dc
