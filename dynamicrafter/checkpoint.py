"""Reading and writing checkpoints in the official key layout, safely.

- `.safetensors`: fp32/fp16/bf16, full or pruned (UNet + resampler only).
- `.ckpt`/`.pt`/`.pth`: Lightning dicts (`state_dict`), bare state dicts, DeepSpeed `module`
  dicts. Read with torch's weights-only unpickler; objects a checkpoint names that are not
  tensors or plain containers (Lightning callbacks, OmegaConf hyper-parameters, anything) are
  materialised as inert placeholders: loading never runs code from the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import CheckpointError, ModelConfig, infer_config
from .schedule import variant_schedule

UNET_PREFIX = "model.diffusion_model."
OLD_KEY_RENAMES = {"framestride_embed": "fps_embedding"}   # the 256 checkpoint's old name
DEEPSPEED_PREFIX = "_forward_module."
CONFIG_METADATA_KEY = "dynamicrafter_config"


class _Inert:
    """Stands in for any non-tensor object a pickled checkpoint mentions; calling or building
    it only records the arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):   # for objects rebuilt through SETITEMS
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("list", []).extend(values)


def _inert_class(full_name: str):
    module, _, name = full_name.rpartition(".")
    return type(name, (_Inert,), {"__module__": module, "__qualname__": name})


def _weights_only_allowlist() -> dict:
    """What torch's weights-only unpickler accepts: tensors, storages, dtypes, plain containers."""
    from torch import _weights_only_unpickler
    return dict(_weights_only_unpickler._get_allowed_globals())


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only torch's weights-only allowlist; any other global becomes an inert class."""

    def find_class(self, module, name):
        return _weights_only_allowlist().get(f"{module}.{name}") or _inert_class(f"{module}.{name}")


class _restricted_pickle:   # a pickle "module" for torch.load(pickle_module=...)
    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda f, **kw: _RestrictedUnpickler(f, **kw).load())
    __name__ = "restricted_pickle"


def _torch_load_safely(path: Path) -> dict:
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:   # Lightning extras (callbacks, hparams objects): keep them inert
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle, mmap=mmap)


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
            obj = _torch_load_safely(path)
            sd = _unwrap(obj)
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
               heads: Optional[Mapping] = None, config=None):
    """Load any supported DynamiCrafter / VideoCrafter / ToonCrafter checkpoint file. `config`: the
    official inference YAML of the checkpoint, for the head widths shapes cannot tell."""
    if config is not None:
        from .official_config import read_inference_config
        heads = {**read_inference_config(config), **(heads or {})}
    sd, metadata = read_state_dict(path)
    return model_from_state_dict(sd, device, dtype, variant_overrides, heads, metadata)


def model_from_state_dict(sd: dict, device="cpu", dtype=torch.float32, variant_overrides=None, heads=None,
                          metadata: Optional[Mapping] = None):
    from .model import DynamiCrafter

    sd = {("model." + k if k.startswith("diffusion_model.") else k): v for k, v in sd.items()}
    problem = describe_foreign_checkpoint(sd)
    if problem:
        raise CheckpointError(problem)
    stored = None
    if metadata and CONFIG_METADATA_KEY in metadata:
        stored = ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    if stored and not heads:
        heads = dict(unet_head_channels=stored.unet.num_head_channels,
                     text_heads=stored.text.text_heads if stored.text else None,
                     vision_heads=stored.vision.vision_heads if stored.vision else None,
                     resampler_dim_head=stored.resampler.dim_head if stored.resampler else None)
        variant_overrides = {**_variant_fields(stored), **(variant_overrides or {})}
    cfg = infer_config(sd, variant_overrides, heads)
    if stored and stored.vae and cfg.vae:     # what shapes cannot tell: the VAE's GroupNorm groups
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, norm_groups=stored.vae.norm_groups))
    with torch.device("meta"):
        model = DynamiCrafter(cfg)
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
    for k in unexpected:   # e.g. EMA copies, model_ema.*, extra logit_scale; never used
        sd.pop(k)
    for k, v in sd.items():
        target = torch.float32 if k in schedule or not v.is_floating_point() else dtype
        sd[k] = v.to(device=device, dtype=target)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _variant_fields(cfg: ModelConfig) -> dict:
    v = cfg.variant
    return {k: getattr(v, k) for k in ("name", "default_fs", "fs_meaning", "spacing", "guidance_rescale",
                                       "cfg_text", "resolution", "fs_range")}


def save_checkpoint(model, path, dtype: Optional[torch.dtype] = None, parts: Optional[tuple] = None) -> Path:
    """Write the model as one .safetensors file in the official layout (atomically).
    `parts` limits it to key prefixes (e.g. ('model.diffusion_model.', 'image_proj_model.'))."""
    path = Path(path)
    sd = {}
    schedule = {k for k, _ in model.named_buffers()}
    for k, v in model.state_dict().items():
        if parts and not (k.startswith(parts) or k in schedule):
            continue
        if dtype is not None and v.is_floating_point() and k not in schedule:
            v = v.to(dtype)
        sd[k] = v.detach().contiguous().cpu()
    meta = {CONFIG_METADATA_KEY: json.dumps(model.cfg.to_dict()), "format": "pt"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
