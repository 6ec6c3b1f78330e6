"""DynamiCrafter Checkpoint Loader: one DynamiCrafter/VideoCrafter file -> MODEL, CLIP, CLIP_VISION, VAE."""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management
import folder_paths

import dynamicrafter

from dynamicrafter.tooncrafter import has_reference_decoder

from .comfy_model import comfy_dtype, make_comfy_clip, make_comfy_clip_vision, make_comfy_vae, make_model_patcher
from .tooncrafter_vae import make_dualref_vae

VARIANTS = ["auto", "256", "512", "1024", "512_interp", "vc2", "vc1"]
DTYPES = ["auto", "fp32", "fp16", "bf16"]
FOLDERS = ("checkpoints", "diffusion_models")


def list_model_files() -> list[str]:
    names = []
    for folder in FOLDERS:
        for n in folder_paths.get_filename_list(folder):
            if n not in names:
                names.append(n)
    return sorted(names)


def resolve_model_file(name: str) -> str:
    for folder in FOLDERS:
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    raise ValueError(f"model file '{name}' not found in models/checkpoints or models/diffusion_models")


def pick_dtype(choice: str) -> torch.dtype:
    if choice != "auto":
        return comfy_dtype(choice)
    device = comfy.model_management.get_torch_device()
    if device.type == "cpu":
        return torch.float32   # CPUs here have no fast fp16/bf16 matmul
    return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16


def variant_overrides(choice: str):
    if choice == "auto":
        return None
    from dataclasses import asdict

    from dynamicrafter.config import PRESETS
    return asdict(PRESETS[choice])   # every field of the preset, eps/v and schedule included


def load_dynamicrafter(path: str, dtype: torch.dtype, variant: str = "auto"):
    """(MODEL, CLIP, CLIP_VISION, VAE) from a file; parts missing from the file come back None."""
    try:
        dc = dynamicrafter.load_model(path, device="cpu", dtype=dtype, variant_overrides=variant_overrides(variant))
    except (dynamicrafter.CheckpointError, ValueError) as e:
        raise ValueError(f"{os.path.basename(path)}: {e}") from e
    except Exception as e:   # truncated/corrupt files surface as reader errors
        raise ValueError(f"{os.path.basename(path)} could not be read as a DynamiCrafter checkpoint "
                         f"({type(e).__name__}: {e}); is the file complete and a .ckpt/.safetensors?") from e
    dc.eval()
    cfg = dc.cfg
    # Text/vision encoders and VAE run in fp32 on CPU (no fast half precision there), else in the chosen dtype.
    te_dtype = torch.float32 if comfy.model_management.get_torch_device().type == "cpu" else dtype
    clip = make_comfy_clip(dc.text_encoder, cfg.text.text_heads, te_dtype) if dc.text_encoder is not None else None
    clip_vision = (make_comfy_clip_vision(dc.image_encoder, cfg.vision.vision_heads, te_dtype)
                   if dc.image_encoder is not None else None)
    if dc.vae is not None and has_reference_decoder(dc):     # ToonCrafter: the dual-reference video VAE
        vae = make_dualref_vae(dc.vae, dc.cfg.variant.frames, te_dtype)
    else:
        vae = make_comfy_vae(dc.vae, te_dtype) if dc.vae is not None else None
    # ComfyUI now owns these parts; keep only UNet + resampler + schedule inside the MODEL.
    dc.cond_stage_model = None
    dc.embedder = None
    dc.first_stage_model = None
    model = make_model_patcher(dc)
    missing = [n for n, v in (("CLIP", clip), ("CLIP_VISION", clip_vision), ("VAE", vae)) if v is None]
    if missing:
        logging.info("DynamiCrafter: %s has no %s; use ComfyUI's loaders for them", os.path.basename(path),
                     ", ".join(missing))
    return model, clip, clip_vision, vae


class DynamiCrafterLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (list_model_files(), {"tooltip": "DynamiCrafter (256/512/1024/interp) or VideoCrafter "
                                                          "file from models/checkpoints (full) or "
                                                          "models/diffusion_models (pruned UNet+resampler)"}),
            "dtype": (DTYPES, {"default": "auto", "tooltip": "weight dtype; auto = fp32 on CPU, "
                                                             "bf16/fp16 on GPU"}),
            "variant": (VARIANTS, {"default": "auto", "tooltip": "auto detects eps/v, zero-SNR, rescale and "
                                                                 "fs meaning from the weights; pick one to "
                                                                 "override"}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "CLIP_VISION", "VAE")
    RETURN_NAMES = ("model", "clip", "clip_vision", "vae")
    OUTPUT_TOOLTIPS = ("the diffusion UNet + context resampler as a ComfyUI model",
                       "OpenCLIP-H text encoder (None in pruned files: use CLIPLoader, type stable_diffusion)",
                       "OpenCLIP-H vision tower (None in pruned files: use CLIPVisionLoader)",
                       "KL-f8 VAE (None in pruned files: use VAELoader with the SD VAE)")
    FUNCTION = "load"
    CATEGORY = "DynamiCrafter"
    DESCRIPTION = "Loads a DynamiCrafter/VideoCrafter checkpoint; the variant is read from the weights."

    def load(self, ckpt_name, dtype="auto", variant="auto"):
        path = resolve_model_file(ckpt_name)
        return load_dynamicrafter(path, pick_dtype(dtype), variant)


NODE_CLASS_MAPPINGS = {"DynamiCrafterLoader": DynamiCrafterLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamiCrafterLoader": "DynamiCrafter Checkpoint Loader"}
