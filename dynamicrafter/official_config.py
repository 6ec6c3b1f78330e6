"""The official inference YAML (`configs/inference_*.yaml`) of a checkpoint, for what tensor
shapes cannot tell: attention head widths (UNet, resampler, OpenCLIP towers; a custom OpenCLIP
architecture the YAML names is looked up in open_clip, then next to the YAML). Sampling defaults
stay those of the official inference scripts (the variant), not the YAML's `default_fs`.

    dc = load_model("model.ckpt", config="inference_512_v1.0.yaml")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .config import CheckpointError


def _params(node, *path) -> Mapping:
    for key in path:
        node = (node or {}).get(key) or {}
    return node.get("params") or {} if isinstance(node, Mapping) else {}


def _arch_beside(arch: str, folder: Path):
    """A custom OpenCLIP architecture defined next to the YAML: `<arch>.json` (open_clip's model
    config format) or a JSON file with {"open_clip_arch": {<arch>: config}}."""
    own = folder / f"{arch}.json"
    candidates = [own] if own.is_file() else sorted(folder.glob("*.json"))
    for path in candidates:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if path == own and isinstance(doc, Mapping):
            return doc
        if isinstance(doc, Mapping) and isinstance(doc.get("open_clip_arch"), Mapping) and arch in doc["open_clip_arch"]:
            return doc["open_clip_arch"][arch]
    return None


def _clip_heads(arch, folder: Path) -> dict:
    """Head counts of a named OpenCLIP architecture: open_clip's registry (released and
    `open_clip.add_model_config` ones), else a definition beside the YAML, else nothing."""
    if not arch:
        return {}
    import open_clip
    cfg = open_clip.get_model_config(str(arch)) or _arch_beside(str(arch), folder)
    if not cfg:
        return {}
    vision = cfg.get("vision_cfg", {})
    out = {"text_heads": cfg.get("text_cfg", {}).get("heads")}
    if vision.get("width") and vision.get("head_width"):
        out["vision_heads"] = vision["width"] // vision["head_width"]
    return out


def read_inference_config(path) -> dict:
    """The `heads` argument of `infer_config` from an official inference YAML."""
    import yaml
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"could not read the config {path}: {e}") from e
    model = _params(doc, "model") if isinstance(doc, Mapping) else {}
    if not model.get("unet_config"):
        raise CheckpointError(f"{path.name} is not an official inference config (no model.params.unet_config)")
    unet = _params(model, "unet_config")
    heads = {}
    if unet.get("num_head_channels", -1) not in (-1, None):
        heads["unet_head_channels"] = int(unet["num_head_channels"])
    elif unet.get("num_heads", -1) not in (-1, None):
        heads["unet_head_channels"] = int(unet["model_channels"]) // int(unet["num_heads"])
    resampler = _params(model, "image_proj_stage_config")
    if resampler.get("dim_head"):
        heads["resampler_dim_head"] = int(resampler["dim_head"])
    pose = _params(model, "pose_encoder_config")
    if pose.get("temporal_attention_nhead"):     # CamI2V
        heads["camera_heads"] = int(pose["temporal_attention_nhead"])
    epipolar = model.get("epipolar_config")
    if isinstance(epipolar, Mapping):
        heads["camera_epipolar"] = camera_epipolar(epipolar, path.name)
    heads.update(_clip_heads(_params(model, "img_cond_stage_config").get("arch"), path.parent))
    heads.update(_clip_heads(_params(model, "cond_stage_config").get("arch"), path.parent))
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
