"""DynamiCrafter Checkpoint Loader: one DynamiCrafter/VideoCrafter file -> MODEL, CLIP, CLIP_VISION, VAE."""
from __future__ import annotations

import logging
import os

import torch

import comfy.model_management
import folder_paths
from comfy_api.v0_0_2 import io

import dynamicrafter
from dynamicrafter.checkpoints.loader import model_from_state_dict
from dynamicrafter.config import WEIGHT_DTYPES
from dynamicrafter.checkpoints.mapped import MappedPages
from dynamicrafter.models.tooncrafter import has_reference_decoder

from .comfy_model import (comfy_operations, make_comfy_clip, make_comfy_clip_vision, make_comfy_vae,
                          make_model_patcher, previews_by_own_vae, unet_dtypes)
from .inputs import CATEGORY, ClipVision
from .tooncrafter_vae import make_dualref_vae

VARIANTS = ["auto", "256", "512", "1024", "512_interp", "vc2", "vc1", "vc1_1024"]
DTYPES = ["auto", *WEIGHT_DTYPES]
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


def variant_overrides(choice: str):
    if choice == "auto":
        return None
    from dataclasses import asdict

    from dynamicrafter.config import PRESETS
    return asdict(PRESETS[choice])   # every field of the preset, eps/v and schedule included


def inference_config_beside(path: str) -> dict | None:
    """Head widths from the checkpoint's official inference YAML saved beside it as `<name>.yaml`
    (ComfyUI's convention for a checkpoint's config): what shapes cannot tell for custom checkpoints
    (e.g. a text tower with other head widths); None when there is none."""
    from dynamicrafter.checkpoints.official_config import read_inference_config
    yaml_path = os.path.splitext(path)[0] + ".yaml"
    return read_inference_config(yaml_path) if os.path.isfile(yaml_path) else None


def load_dynamicrafter(path: str, dtype: str = "auto", variant: str = "auto"):
    """(MODEL, CLIP, CLIP_VISION, VAE) from a file; parts missing from the file come back None.
    A `<name>.yaml` beside the file (the official inference config) supplies head widths.
    `dtype`: one of DTYPES, the UNet's weight dtype ("auto": ComfyUI's choice for the device and
    its --*-unet flags); the compute dtype is ComfyUI's manual cast for it (fp8 weights compute
    in fp16/bf16 on GPU, everything in fp32 on CPU)."""
    name = os.path.basename(path)
    try:
        sd, metadata = dynamicrafter.read_state_dict(path)
        unet = [v for k, v in sd.items() if k.startswith(("model.diffusion_model.", "diffusion_model."))]
        file_dtype = next((v.dtype for v in unet if v.is_floating_point()), None)
        weight_dtype, manual_cast = unet_dtypes(dtype, sum(v.numel() for v in unet), file_dtype)
        compute = manual_cast or weight_dtype
        dc = model_from_state_dict(sd, "cpu", compute, variant_overrides(variant), inference_config_beside(path),
                                   metadata, weight_dtype=weight_dtype,
                                   operations=comfy_operations(weight_dtype, manual_cast))
    except (dynamicrafter.CheckpointError, ValueError) as e:
        raise ValueError(f"{name}: {e}") from e
    except Exception as e:   # truncated/corrupt files surface as reader errors
        raise ValueError(f"{name} could not be read as a DynamiCrafter checkpoint "
                         f"({type(e).__name__}: {e}); is the file complete and a .ckpt/.safetensors?") from e
    dc.eval()
    del sd, unet
    # Text/vision encoders and VAE run in fp32 on CPU (no fast half precision there), else in the chosen dtype.
    # ComfyUI's CLIP, CLIP vision and KL VAE copy the weights into their own models: each of ours is
    # dropped (and its file pages given back) as soon as it is handed over, so no part exists twice
    # for longer than its own copy takes; only UNet + resampler + schedule stay inside the MODEL.
    te_dtype = torch.float32 if comfy.model_management.get_torch_device().type == "cpu" else compute
    pages = MappedPages()
    clip = clip_vision = vae = None
    if dc.text_encoder is not None:
        clip = make_comfy_clip(dc.text_encoder, te_dtype, pages)
        pages.release_module(dc.cond_stage_model)
        dc.cond_stage_model = None
    if dc.image_encoder is not None:
        clip_vision = make_comfy_clip_vision(dc.image_encoder, te_dtype, pages)
        pages.release_module(dc.embedder)
        dc.embedder = None
    if dc.vae is not None and has_reference_decoder(dc):     # ToonCrafter: the dual-reference video VAE
        vae = make_dualref_vae(dc.vae, dc.cfg.variant.frames, te_dtype)      # wraps ours, no copy
    elif dc.vae is not None:
        vae = make_comfy_vae(dc.vae, te_dtype)
        if not previews_by_own_vae(dc):
            pages.release_module(dc.first_stage_model)
    if not previews_by_own_vae(dc):     # a VAE of its own latent space stays: the step previews decode with it
        dc.first_stage_model = None
    model = make_model_patcher(dc, manual_cast)
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
                               tooltip="UNet weight dtype; auto = ComfyUI's choice (fp32 on CPU, bf16/fp16 on "
                                       "GPU, or the --*-unet flag); fp8 halves the UNet's memory and computes "
                                       "in fp16/bf16"),
                io.Combo.Input("variant", options=VARIANTS, default="auto",
                               tooltip="auto detects eps/v, zero-SNR, rescale and fs meaning from the weights; "
                                       "pick one to override"),
            ],
            outputs=[
                io.Model.Output(display_name="model",
                                tooltip="the diffusion UNet + context resampler as a ComfyUI model"),
                io.Clip.Output(display_name="clip", tooltip="OpenCLIP-H text encoder (None in pruned files: "
                                                            "use CLIPLoader, type stable_diffusion)"),
                ClipVision.Output(display_name="clip_vision", tooltip="OpenCLIP-H vision tower (None in "
                                                                         "pruned files: use CLIPVisionLoader)"),
                io.Vae.Output(display_name="vae", tooltip="KL-f8 VAE (None in pruned files: use VAELoader "
                                                          "with the SD VAE)"),
            ])

    @classmethod
    def validate_inputs(cls, ckpt_name):    # at queue time: V3 combos get no 'value not in list' check
        if ckpt_name is None or ckpt_name in list_model_files():
            return True
        return (f"DynamiCrafter Checkpoint Loader: model file '{ckpt_name}' not found in models/checkpoints or "
                f"models/diffusion_models: download it (the template's Note has the link), put it there and press "
                f"R to refresh the list")

    @classmethod
    def execute(cls, ckpt_name, dtype="auto", variant="auto") -> io.NodeOutput:
        path = resolve_model_file(ckpt_name)
        return io.NodeOutput(*load_dynamicrafter(path, dtype, variant))


NODES = [DynamiCrafterLoader]
