"""The official inference YAML (`configs/inference_*.yaml`) of a checkpoint, for what tensor
shapes cannot tell: attention head widths (UNet, resampler, OpenCLIP towers; a custom OpenCLIP
architecture the YAML names is looked up in open_clip, then next to the YAML). Sampling defaults
stay those of the official inference scripts (the variant), not the YAML's `default_fs`.

    dc = load_model("model.ckpt", config="inference_512_v1.0.yaml")
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

from ..config import CheckpointError

MAX_CONFIG_BYTES = 1 << 20          # an official inference YAML is ~5 KB; an OpenCLIP arch JSON ~1 KB
ARCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")      # a name, never a path


def _read_text(path: Path, what: str) -> str:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path.name}: {size} bytes, more than a {what} holds ({MAX_CONFIG_BYTES}); refusing it")
    return path.read_text()


def _int(value, key: str, source: str, lo: int, hi: int) -> int:
    """A config value used as a size: a whole number in [lo, hi], or CheckpointError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CheckpointError(f"{source}: {key} is {value!r:.40}; it must be a whole number from {lo} to {hi}")
    return value


def _params(node, *path) -> Mapping:
    for key in path:
        node = (node.get(key) if isinstance(node, Mapping) else None) or {}
    params = node.get("params") if isinstance(node, Mapping) else None
    return params if isinstance(params, Mapping) else {}


def _arch_beside(arch: str, folder: Path):
    """A custom OpenCLIP architecture defined next to the YAML: `<arch>.json` (open_clip's model
    config format) or a JSON file with {"open_clip_arch": {<arch>: config}}."""
    own = folder / f"{arch}.json"
    candidates = [own] if own.is_file() else sorted(folder.glob("*.json"))
    for path in candidates:
        try:
            doc = json.loads(_read_text(path, "model config"))
        except (OSError, ValueError):
            continue
        if path == own and isinstance(doc, Mapping):
            return doc
        table = doc.get("open_clip_arch") if isinstance(doc, Mapping) else None
        if isinstance(table, Mapping) and arch in table:
            return table[arch]
    return None


def _clip_heads(arch, folder: Path, source: str) -> dict:
    """Head counts of a named OpenCLIP architecture: open_clip's registry (released and
    `open_clip.add_model_config` ones), else a definition beside the YAML, else nothing. The name
    is a name (letters, digits, `_.-`), never a path."""
    if not arch:
        return {}
    if not isinstance(arch, str) or not ARCH_NAME.match(arch):
        raise CheckpointError(f"{source}: arch {arch!r:.80} is not an OpenCLIP architecture name (letters, digits, "
                              "'_', '.', '-'; no paths)")
    import open_clip
    cfg = open_clip.get_model_config(arch) or _arch_beside(arch, folder)
    if not isinstance(cfg, Mapping):
        return {}
    text, vision = cfg.get("text_cfg") or {}, cfg.get("vision_cfg") or {}
    out = {}
    if isinstance(text, Mapping) and text.get("heads") is not None:
        out["text_heads"] = _int(text["heads"], f"{arch} text_cfg.heads", source, 1, 256)
    if isinstance(vision, Mapping) and vision.get("width") is not None and vision.get("head_width") is not None:
        width = _int(vision["width"], f"{arch} vision_cfg.width", source, 1, 16384)
        head = _int(vision["head_width"], f"{arch} vision_cfg.head_width", source, 1, 4096)
        if width % head:
            raise CheckpointError(f"{source}: {arch} vision_cfg.width {width} is not a multiple of head_width {head}")
        out["vision_heads"] = width // head
    return out


def read_inference_config(path) -> dict:
    """The `heads` argument of `infer_config` from an official inference YAML."""
    import yaml
    path = Path(path)
    try:
        doc = yaml.safe_load(_read_text(path, "model config"))
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"could not read the config {path}: {e}") from e
    model = _params(doc, "model") if isinstance(doc, Mapping) else {}
    if not isinstance(model, Mapping) or not isinstance(model.get("unet_config"), Mapping):
        raise CheckpointError(f"{path.name} is not an official inference config (no model.params.unet_config)")
    src = path.name
    unet = _params(model, "unet_config")
    heads = {}
    if unet.get("num_head_channels", -1) not in (-1, None):
        heads["unet_head_channels"] = _int(unet["num_head_channels"], "unet num_head_channels", src, 1, 4096)
    elif unet.get("num_heads", -1) not in (-1, None):
        n = _int(unet["num_heads"], "unet num_heads", src, 1, 1024)
        channels = _int(unet.get("model_channels"), "unet model_channels", src, 1, 16384)
        if channels % n:
            raise CheckpointError(f"{src}: unet model_channels {channels} is not a multiple of num_heads {n}")
        heads["unet_head_channels"] = channels // n
    resampler = _params(model, "image_proj_stage_config")
    if resampler.get("dim_head"):
        heads["resampler_dim_head"] = _int(resampler["dim_head"], "image_proj_stage_config dim_head", src, 1, 4096)
    pose = _params(model, "pose_encoder_config")
    if pose.get("temporal_attention_nhead"):     # CamI2V
        heads["camera_heads"] = _int(pose["temporal_attention_nhead"], "pose_encoder temporal_attention_nhead",
                                     src, 1, 1024)
    epipolar = model.get("epipolar_config")
    if isinstance(epipolar, Mapping):
        heads["camera_epipolar"] = camera_epipolar(epipolar, path.name)
    heads.update(_clip_heads(_params(model, "img_cond_stage_config").get("arch"), path.parent, src))
    heads.update(_clip_heads(_params(model, "cond_stage_config").get("arch"), path.parent, src))
    return {k: v for k, v in heads.items() if v}


def camera_epipolar(epipolar: Mapping, name: str) -> dict:
    """CameraConfig fields from a CamI2V `epipolar_config` section."""
    try:
        out = {"origin_h": int(epipolar.get("origin_h", 256)), "origin_w": int(epipolar.get("origin_w", 256)),
               "mask_resolutions": tuple(int(r) for r in epipolar.get("attention_resolution", (8, 4, 2, 1))),
               "perturb_zero_translation": bool(epipolar.get("add_small_perturbation_on_zero_T", False))}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: bad epipolar_config ({e})") from e
    if epipolar.get("is_3d_full_attn") or epipolar.get("only_on_cond_frame") or any(
            epipolar.get(k) for k in ("epipolar_hybrid_attention", "epipolar_hybrid_attention_v2",
                                      "only_self_pixel_on_current_frame", "current_frame_as_register_token",
                                      "apply_epipolar_soft_mask")):
        raise CheckpointError(f"{name}: this epipolar_config enables options the released CamI2V models do not "
                              "use and this library does not implement")
    if out["origin_h"] <= 0 or any(r <= 0 for r in out["mask_resolutions"]):
        raise CheckpointError(f"{name}: epipolar_config origin_h and attention_resolution must be positive")
    return out
