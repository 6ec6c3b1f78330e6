"""DynamiCrafter Checkpoint Loader: one DynamiCrafter/VideoCrafter file -> MODEL, CLIP, CLIP_VISION, VAE."""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management
import folder_paths
from comfy_api.v0_0_2 import io

import dynamicrafter

from dynamicrafter.config import DTYPES as DTYPE_NAMES

from .comfy_model import make_comfy_clip, make_comfy_clip_vision, make_comfy_vae, make_model_patcher
from .inputs import CATEGORY

VARIANTS = ["auto", "256", "512", "1024", "512_interp", "vc2", "vc1", "vc1_1024"]
DTYPES = ["auto", *DTYPE_NAMES]
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
        return DTYPE_NAMES[choice]
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
    # Text/vision encoders and VAE run in fp32 on CPU (no fast half precision there), else in the chosen dtype.
    te_dtype = torch.float32 if comfy.model_management.get_torch_device().type == "cpu" else dtype
    clip = make_comfy_clip(dc.text_encoder, te_dtype) if dc.text_encoder is not None else None
    clip_vision = make_comfy_clip_vision(dc.image_encoder, te_dtype) if dc.image_encoder is not None else None
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


class DynamiCrafterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterLoader",
            display_name="DynamiCrafter Checkpoint Loader",
            category=CATEGORY,
            description="Loads a DynamiCrafter image-to-video (256/512/1024/512-interp) or VideoCrafter "
                        "text-to-video checkpoint; the variant is read from the weights.",
            inputs=[
                io.Combo.Input("ckpt_name", options=list_model_files(),
                               tooltip="DynamiCrafter (256/512/1024/interp) or VideoCrafter file from "
                                       "models/checkpoints (full) or models/diffusion_models (pruned "
                                       "UNet+resampler)"),
                io.Combo.Input("dtype", options=DTYPES, default="auto",
                               tooltip="weight dtype; auto = fp32 on CPU, bf16/fp16 on GPU"),
                io.Combo.Input("variant", options=VARIANTS, default="auto",
                               tooltip="auto detects eps/v, zero-SNR, rescale and fs meaning from the weights; "
                                       "pick one to override"),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="the diffusion UNet + context resampler as a ComfyUI model"),
                io.Clip.Output(display_name="clip", tooltip="OpenCLIP-H text encoder (None in pruned files: "
                                                            "use CLIPLoader, type stable_diffusion)"),
                io.ClipVision.Output(display_name="clip_vision", tooltip="OpenCLIP-H vision tower (None in "
                                                                         "pruned files: use CLIPVisionLoader)"),
                io.Vae.Output(display_name="vae", tooltip="KL-f8 VAE (None in pruned files: use VAELoader "
                                                          "with the SD VAE)"),
            ])

    @classmethod
    def execute(cls, ckpt_name, dtype="auto", variant="auto") -> io.NodeOutput:
        path = resolve_model_file(ckpt_name)
        return io.NodeOutput(*load_dynamicrafter(path, pick_dtype(dtype), variant))


NODES = [DynamiCrafterLoader]
