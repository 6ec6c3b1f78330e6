"""Reading and writing checkpoints in the official key layout, safely.

- `.safetensors`: fp32/fp16/bf16, full or pruned (UNet + resampler only).
- `.ckpt`/`.pt`/`.pth`/`.bin`: Lightning dicts (`state_dict`), bare state dicts, DeepSpeed
  `module` dicts, in torch's zip format. Read only by torch's weights-only unpickler after the
  file's sizes are checked; objects it names that are not tensors or plain containers (Lightning
  callbacks, OmegaConf hyper-parameters, anything) become inert stand-ins: see torch_files.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import CheckpointError, ModelConfig, infer_config
from .mapped import MappedPages
from .metadata import KEY as CONFIG_METADATA_KEY, check_against_weights, stored_config
from ..sampling.schedule import schedule_buffers, variant_schedule
from .torch_files import check_tensor_bytes, load_torch_file
from .unused_keys import refuse_unknown

UNET_PREFIX = "model.diffusion_model."
OLD_KEY_RENAMES = {"framestride_embed": "fps_embedding"}   # the 256 checkpoint's old name
DEEPSPEED_PREFIX = "_forward_module."


def read_state_dict(path) -> tuple[dict, dict]:
    """Tensors of a checkpoint file (official keys, old names fixed) and its metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    metadata: dict = {}
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
        else:
            sd = _unwrap(load_torch_file(path))
            check_tensor_bytes(sd, path.name)
    except CheckpointError:
        raise
    except Exception as e:   # truncated zip, bad header, not a pickle ...
        raise CheckpointError(f"could not read {path.name}: the file is truncated or not a model checkpoint "
                              f"({type(e).__name__}: {e}). Re-download or re-export it.") from e
    return normalise_keys(sd), metadata


def _unwrap(obj) -> dict:
    if isinstance(obj, Mapping):
        if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            return dict(obj["state_dict"])
        if "module" in obj and isinstance(obj["module"], Mapping):    # DeepSpeed
            return {k.removeprefix(DEEPSPEED_PREFIX): v for k, v in obj["module"].items()}
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError("this file holds no state dict (no 'state_dict', 'module' or tensors at the top level)")


def normalise_keys(sd: Mapping[str, torch.Tensor]) -> dict:
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        for old, new in OLD_KEY_RENAMES.items():
            k = k.replace(f"{UNET_PREFIX}{old}.", f"{UNET_PREFIX}{new}.")
        out[k] = v
    return out


def describe_foreign_checkpoint(sd: Mapping) -> Optional[str]:
    """Why this is not a DynamiCrafter/VideoCrafter checkpoint, or None if it is one."""
    keys = list(sd)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("model.diffusion_model", "diffusion_model.")) for k in keys):
            return None
        hint = ""
        if any(k.startswith(("text_model.", "vision_model.", "visual.", "transformer.resblocks")) for k in keys):
            hint = " It looks like a CLIP model: load it with a CLIP loader."
        elif any(k.startswith(("encoder.", "decoder.")) for k in keys):
            hint = " It looks like a VAE: load it with a VAE loader."
        return f"no DynamiCrafter UNet ('{UNET_PREFIX}*') in this file.{hint}"
    if not any("temopral_conv" in k or "init_attn" in k or "fps_embedding" in k for k in keys):
        if any(".time_stack." in k or "time_mixer" in k for k in keys):
            return "this is a Stable Video Diffusion checkpoint, not DynamiCrafter: use ComfyUI's SVD nodes."
        return ("this is an image (Stable Diffusion-style) checkpoint: its UNet has no temporal layers. "
                "Load a DynamiCrafter or VideoCrafter video checkpoint instead.")
    return None


def load_model(path, device="cpu", dtype: torch.dtype = torch.float32, variant_overrides: Optional[Mapping] = None,
               heads: Optional[Mapping] = None, weight_dtype: Optional[torch.dtype] = None, operations=None,
               config=None):
    """Load any supported DynamiCrafter / VideoCrafter / ToonCrafter checkpoint file.

    `dtype` is the compute dtype. `weight_dtype` (e.g. torch.float8_e4m3fn) stores the UNet's and
    resampler's layer matrices in that dtype instead; each layer casts them to `dtype` when called.
    `operations`: the layer namespace to build the UNet and resampler from (see `ops.py`).
    `config`: the official inference YAML of the checkpoint, for the head widths shapes cannot tell."""
    if config is not None:
        from .official_config import read_inference_config
        heads = {**read_inference_config(config), **(heads or {})}
    sd, metadata = read_state_dict(path)
    return model_from_state_dict(sd, device, dtype, variant_overrides, heads, metadata, weight_dtype, operations)


def model_from_state_dict(sd: dict, device="cpu", dtype=torch.float32, variant_overrides=None, heads=None,
                          metadata: Optional[Mapping] = None, weight_dtype: Optional[torch.dtype] = None,
                          operations=None):
    from ..models import ops
    from ..model import DynamiCrafter

    low = weight_dtype is not None and weight_dtype != dtype
    if low and operations is None:
        operations = ops.cast     # stored in weight_dtype, computed in dtype

    sd = {("model." + k if k.startswith("diffusion_model.") else k): v for k, v in sd.items()}
    problem = describe_foreign_checkpoint(sd)
    if problem:
        raise CheckpointError(problem)
    stored = stored_config(metadata)     # schema-checked; CheckpointError names a bad key
    if stored and not heads:
        heads = dict(unet_head_channels=stored.unet.num_head_channels,
                     text_heads=stored.text.text_heads if stored.text else None,
                     vision_heads=stored.vision.vision_heads if stored.vision else None,
                     resampler_dim_head=stored.resampler.dim_head if stored.resampler else None)
        if stored.camera:
            c = stored.camera
            heads.update(camera_heads=c.heads, camera_epipolar=dict(
                origin_h=c.origin_h, origin_w=c.origin_w, mask_resolutions=c.mask_resolutions,
                perturb_zero_translation=c.perturb_zero_translation))
        variant_overrides = {**_variant_fields(stored), **(variant_overrides or {})}
    cfg = infer_config(sd, variant_overrides, heads)
    if stored:
        check_against_weights(stored, cfg, sd)
    if stored and stored.vae and cfg.vae:     # what shapes cannot tell: the VAE's GroupNorm groups
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, norm_groups=stored.vae.norm_groups))
    with torch.device("meta"):
        model = DynamiCrafter(cfg, operations)
    expected = model.state_dict()
    schedule = {k for k, _ in model.named_buffers()}
    # schedule buffers: the file's values unless the variant was overridden to a different schedule
    own_schedule = variant_overrides and any(
        k in variant_overrides for k in ("parameterization", "zero_snr", "dynamic_rescale_base", "use_scale"))
    computed = variant_schedule(cfg.variant)
    for k in schedule:
        if own_schedule or k not in sd:
            sd[k] = computed[k]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or mismatched:
        raise CheckpointError(
            "the checkpoint does not match the DynamiCrafter layout inferred from it: "
            f"{len(missing)} missing, {len(mismatched)} mis-shaped tensors "
            f"(e.g. {(missing + mismatched)[:3]}). Is the file complete?")
    if own_schedule:   # the file's schedule buffers the overridden schedule lacks (e.g. scale_arr)
        every_schedule_buffer = set(schedule_buffers(False, "eps", 0.7))
        unexpected = [k for k in unexpected if k not in every_schedule_buffer]
    for k in refuse_unknown(unexpected):   # known unused (EMA copies, logit_scale, ...); others refused
        sd.pop(k)
    for k in set(sd) - set(expected):
        sd.pop(k)
    pages = MappedPages()    # a converted tensor's file pages go back as soon as it is converted
    for k, v in sd.items():
        target = torch.float32 if k in schedule or not v.is_floating_point() else dtype
        if low and ops.is_stored_low(k, v):
            target = weight_dtype
        sd[k] = v.to(device=device, dtype=target)
        if sd[k].untyped_storage().data_ptr() != v.untyped_storage().data_ptr():
            pages.release(v)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _variant_fields(cfg: ModelConfig) -> dict:
    v = cfg.variant
    return {k: getattr(v, k) for k in ("name", "default_fs", "fs_meaning", "spacing", "guidance_rescale",
                                       "cfg_text", "cfg_img", "resolution", "fs_range")}


def save_checkpoint(model, path, dtype: Optional[torch.dtype] = None, parts: Optional[tuple] = None,
                    metadata: Optional[dict] = None) -> Path:
    """Write the model as one .safetensors file in the official layout (atomically).
    `parts` limits it to key prefixes (e.g. ('model.diffusion_model.', 'image_proj_model.'));
    `metadata`: extra string entries for the file's header (e.g. which weights these are)."""
    path = Path(path)
    sd = {}
    schedule = {k for k, _ in model.named_buffers()}
    for k, v in model.state_dict().items():
        if parts and not (k.startswith(parts) or k in schedule):
            continue
        if dtype is not None and v.is_floating_point() and k not in schedule:
            v = v.to(dtype)
        sd[k] = v.detach().contiguous().cpu()
    meta = {**(metadata or {}), CONFIG_METADATA_KEY: json.dumps(model.cfg.to_dict()), "format": "pt"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
