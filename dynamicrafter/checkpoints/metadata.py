"""The `dynamicrafter_config` metadata our `.safetensors` files carry, read with a schema.

The metadata is text the file chooses, so it is parsed strictly: a JSON object of at most
MAX_METADATA_BYTES with no duplicate keys and shallow nesting; only the known
sections and fields, each of its type and in its range. Anything else is a CheckpointError that
names the key. The parsed config is then held against the weights: every size the tensor shapes
determine must agree, and the head widths and group counts it supplies must divide the widths
they split (otherwise a model would be built with zero heads or uneven groups).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import fields
from typing import Any, Mapping, Optional

from ..config import (CameraConfig, CheckpointError, ClipConfig, ModelConfig, ResamplerConfig, UNetConfig, VAEConfig,
                     Variant)

KEY = "dynamicrafter_config"
MAX_METADATA_BYTES = 64 * 1024
# a file's default size and length are used by animate() and Variant Defaults without a user's say:
# bounded like user input (the official models default to at most 1024x576, 16 frames)
MAX_DEFAULT_SIDE = 2048
MAX_DEFAULT_FRAMES = 256
MAX_DEPTH = 4      # {section: {field: [int, ...]}}

WIDTH, COUNT, SMALL = (1, 65536), (0, 1024), (1, 64)
_INT, _FLOAT, _BOOL, _INTS, _STR = "integer", "number", "boolean", "list of integers", "string"

# field -> (kind, range or choices[, list length range]); ranges are inclusive
SCHEMA: dict[str, dict[str, tuple]] = {
    "unet": {"in_channels": (_INT, SMALL), "out_channels": (_INT, SMALL), "model_channels": (_INT, WIDTH),
             "channel_mult": (_INTS, SMALL, (1, 8)), "num_res_blocks": (_INT, (1, 16)),
             "attention_levels": (_INTS, (0, 7), (0, 8)), "num_head_channels": (_INT, WIDTH),
             "transformer_depth": (_INT, SMALL), "context_dim": (_INT, WIDTH), "use_linear": (_BOOL,),
             "temporal_conv": (_BOOL,), "temporal_attention": (_BOOL,), "addition_attention": (_BOOL,),
             "init_attn_heads": (_INT, (1, 1024)), "image_cross_attention": (_BOOL,), "image_gate": (_BOOL,),
             "fs_condition": (_BOOL,), "default_fs": (_INT, (1, 1000)), "relative_position": (_BOOL,),
             "temporal_length": (_INT, (1, 1024)), "camera_modules": (_BOOL,), "camera_registers": (_INT, COUNT)},
    "vae": {"ch": (_INT, WIDTH), "ch_mult": (_INTS, SMALL, (1, 8)), "num_res_blocks": (_INT, (1, 16)),
            "z_channels": (_INT, SMALL), "embed_dim": (_INT, SMALL), "in_channels": (_INT, SMALL),
            "out_ch": (_INT, SMALL), "norm_groups": (_INT, (1, 1024)), "decoder": (_STR, ("image", "dualref")),
            "ref_attn_levels": (_INTS, (0, 7), (0, 8)), "ref_attn_inner": (_INT, WIDTH)},
    "clip": {"embed_dim": (_INT, WIDTH), "text_width": (_INT, WIDTH), "text_layers": (_INT, COUNT),
             "text_heads": (_INT, (1, 1024)), "vocab_size": (_INT, (1, 1 << 20)), "context_length": (_INT, (1, 4096)),
             "vision_width": (_INT, WIDTH), "vision_layers": (_INT, COUNT), "vision_heads": (_INT, (1, 1024)),
             "patch_size": (_INT, (1, 1024)), "image_size": (_INT, (1, 8192)), "mlp_ratio": (_FLOAT, (0.0, 64.0))},
    "resampler": {"dim": (_INT, WIDTH), "depth": (_INT, SMALL), "dim_head": (_INT, WIDTH), "heads": (_INT, (1, 1024)),
                  "num_queries": (_INT, (1, 1024)), "embedding_dim": (_INT, WIDTH), "output_dim": (_INT, WIDTH),
                  "ff_mult": (_INT, SMALL), "video_length": (_INT, (1, 1024))},
    "camera": {"channels": (_INTS, WIDTH, (1, 8)), "num_res_blocks": (_INT, (1, 16)), "cin": (_INT, WIDTH),
               "downscale": (_INT, SMALL), "heads": (_INT, (1, 1024)), "max_frames": (_INT, (1, 1024)),
               "registers": (_INT, COUNT), "origin_h": (_INT, (8, 8192)), "origin_w": (_INT, (8, 8192)),
               "mask_resolutions": (_INTS, SMALL, (0, 8)), "perturb_zero_translation": (_BOOL,)},
    "variant": {"family": (_STR, ("dynamicrafter", "videocrafter", "cami2v")), "name": (_STR, r"[A-Za-z0-9_.-]{1,64}"),
                "parameterization": (_STR, ("eps", "v")), "zero_snr": (_BOOL,),
                "dynamic_rescale_base": (_FLOAT, (0.0, 1.0), "nullable"), "use_scale": (_BOOL,),
                "scale_b": (_FLOAT, (0.0, 1.0)), "fix_scale_bug": (_BOOL,),
                "default_fs": (_INT, (1, 1000)), "fs_meaning": (_STR, ("fps", "frame_stride")),
                "spacing": (_STR, ("uniform", "uniform_trailing", "quad")), "guidance_rescale": (_FLOAT, (0.0, 1.0)),
                "cfg_text": (_FLOAT, (0.0, 100.0)),
                "cfg_img": (_FLOAT, (0.0, 100.0), "nullable"), "resolution": (_INTS, (8, MAX_DEFAULT_SIDE), (2, 2)),
                "frames": (_INT, (1, MAX_DEFAULT_FRAMES)), "fs_range": (_INTS, (1, 1000), (2, 2))},
}
SECTIONS = {"unet": ("unet", UNetConfig), "vae": ("vae", VAEConfig), "text": ("clip", ClipConfig),
            "vision": ("clip", ClipConfig), "resampler": ("resampler", ResamplerConfig),
            "variant": ("variant", Variant), "camera": ("camera", CameraConfig)}
OPTIONAL_SECTIONS = ("vae", "text", "vision", "resampler", "camera")   # null: the file has no such part
SCALE_FACTOR_RANGE = (1e-4, 100.0)

# what the weights' shapes tell, per section: these stored values must agree with them
SHAPE_FIELDS = {
    "unet": ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks", "attention_levels",
             "transformer_depth", "context_dim", "use_linear", "temporal_conv", "temporal_attention",
             "addition_attention", "image_cross_attention", "image_gate", "fs_condition", "relative_position"),
    "vae": ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "in_channels", "out_ch", "decoder",
            "ref_attn_levels"),
    "text": ("text_width", "text_layers", "vocab_size", "context_length"),
    "vision": ("vision_width", "vision_layers", "patch_size", "image_size"),
    "resampler": ("dim", "depth", "heads", "embedding_dim", "output_dim", "ff_mult", "video_length"),
    "camera": ("channels", "num_res_blocks", "cin", "max_frames", "registers"),
}


class MetadataError(CheckpointError):
    """A stored config that fails the schema; `key` and `why` say where and how, for callers that
    check a config before writing it (the message itself speaks of a file that was read)."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{KEY} metadata: {key} {why}; the file's metadata is corrupt or crafted "
                         f"(re-save the model with dynamicrafter.save_checkpoint)")
        self.key, self.why = key, why


def _fail(key: str, why: str):
    raise MetadataError(key, why)


def parse_config_metadata(text: Any) -> ModelConfig:
    """The ModelConfig stored in a file's metadata, or CheckpointError naming the bad key."""
    if not isinstance(text, str):
        _fail("(the whole value)", f"must be a JSON string, got {type(text).__name__}")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        _fail("(the whole value)", f"is {len(text)} characters; at most {MAX_METADATA_BYTES} bytes are read")
    if text.count("[") + text.count("{") > 0 and _max_depth(text) > MAX_DEPTH:
        _fail("(the whole value)", f"nests deeper than {MAX_DEPTH} levels")

    def unique(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen[k] = v
        return seen

    try:
        d = json.loads(text, object_pairs_hook=unique)   # NaN/Infinity parse; the field checks name them
    except (ValueError, RecursionError) as e:
        _fail("(the whole value)", f"is not valid JSON ({e})")
    if not isinstance(d, dict):
        _fail("(the whole value)", f"must be a JSON object, got {type(d).__name__}")
    unknown = set(d) - set(SECTIONS) - {"scale_factor"}
    if unknown:
        _fail(sorted(unknown)[0], f"is not a known section (known: {sorted(SECTIONS)} and scale_factor)")
    if not isinstance(d.get("unet"), dict):
        _fail("unet", "is required and must be an object")
    built = {}
    for section, (schema_name, cls) in SECTIONS.items():
        value = d.get(section)
        if value is None and (section in OPTIONAL_SECTIONS or section == "variant"):
            built[section] = None if section != "variant" else Variant()
            continue
        if not isinstance(value, dict):
            _fail(section, f"must be an object{' or null' if section in OPTIONAL_SECTIONS else ''}, "
                           f"got {type(value).__name__}")
        built[section] = cls(**_parse_section(section, SCHEMA[schema_name], value, cls))
    scale = d.get("scale_factor", ModelConfig.scale_factor)
    _check_value("scale_factor", scale, (_FLOAT, SCALE_FACTOR_RANGE))
    variant = built["variant"]
    if variant.fs_range[0] > variant.fs_range[1]:
        _fail("variant.fs_range", f"must be [low, high] with low <= high, got {list(variant.fs_range)}")
    if variant.cfg_img == 0.0:      # one meaning only: the nodes' cfg_img widget reads 0 as single CFG
        _fail("variant.cfg_img", "is 0; write null for single CFG (an image scale of 0 is not a default "
                                 "the nodes could show)")
    return ModelConfig(scale_factor=float(scale), **built)


def _max_depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped = not escaped and ch == "\\"
            if ch == '"' and not escaped:
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _parse_section(section: str, schema: Mapping[str, tuple], value: Mapping, cls) -> dict:
    names = {f.name for f in fields(cls)}
    out = {}
    for k, v in value.items():
        if k not in schema or k not in names:
            _fail(f"{section}.{k}", f"is not a known field of {section} (known: {sorted(schema)})")
        out[k] = _check_value(f"{section}.{k}", v, schema[k])
    return out


def _check_value(key: str, v: Any, spec: tuple):
    kind = spec[0]
    if kind == _BOOL:
        if not isinstance(v, bool):
            _fail(key, f"must be true or false, got {v!r:.40}")
        return v
    if kind == _STR:
        choices = spec[1]
        ok = isinstance(v, str) and (v in choices if isinstance(choices, tuple) else re.fullmatch(choices, v))
        if not ok:
            _fail(key, f"must be one of {list(choices) if isinstance(choices, tuple) else 'names like 512_interp'}, "
                       f"got {v!r:.40}")
        return v
    if kind == _FLOAT:
        if v is None and "nullable" in spec:
            return None
        lo, hi = spec[1]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            _fail(key, f"must be a finite number in [{lo}, {hi}], got {v!r:.40}")
        return float(v)
    lo, hi = spec[1]
    if kind == _INT:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            _fail(key, f"must be an integer in {lo}..{hi}, got {v!r:.40}")
        return v
    n_lo, n_hi = spec[2]
    if not isinstance(v, list) or not n_lo <= len(v) <= n_hi:
        _fail(key, f"must be a list of {n_lo}..{n_hi} integers, got {v!r:.40}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
            _fail(key, f"must hold integers in {lo}..{hi}, got {v!r:.60}")
    return tuple(v)


def check_against_weights(stored: ModelConfig, cfg: ModelConfig, sd: Mapping) -> None:
    """The stored config must describe these weights: sizes as the shapes say, and head widths /
    group counts that divide the widths they split."""
    for section, names in SHAPE_FIELDS.items():
        mine, theirs = getattr(stored, section), getattr(cfg, section)
        if mine is None or theirs is None:
            continue
        for name in names:
            a, b = getattr(mine, name), getattr(theirs, name)
            if a != b:
                _fail(f"{section}.{name}", f"is {a!r} but the weights' shapes give {b!r}")
    u = stored.unet
    for level in u.attention_levels:
        width = u.model_channels * u.channel_mult[level] if level < len(u.channel_mult) else 0
        if not width or width % u.num_head_channels:
            _fail("unet.num_head_channels", f"({u.num_head_channels}) must divide the width {width} of "
                                            f"attention level {level}")
    if stored.text and cfg.text and stored.text.text_width % stored.text.text_heads:
        _fail("text.text_heads", f"({stored.text.text_heads}) must divide text_width {stored.text.text_width}")
    if stored.vision and cfg.vision and stored.vision.vision_width % stored.vision.vision_heads:
        _fail("vision.vision_heads",
              f"({stored.vision.vision_heads}) must divide vision_width {stored.vision.vision_width}")
    q = sd.get("image_proj_model.layers.0.0.to_q.weight")
    r = stored.resampler
    if r and q is not None and r.heads * r.dim_head != q.shape[0]:
        _fail("resampler.dim_head", f"({r.dim_head}) times heads ({r.heads}) must be the attention width "
                                    f"{q.shape[0]} of the weights")
    v = stored.vae
    if v and cfg.vae:
        for m in v.ch_mult:
            if (v.ch * m) % v.norm_groups:
                _fail("vae.norm_groups", f"({v.norm_groups}) must divide every VAE width (ch {v.ch} x {m})")


def stored_config(metadata: Optional[Mapping]) -> Optional[ModelConfig]:
    if not metadata or KEY not in metadata:
        return None
    return parse_config_metadata(metadata[KEY])
