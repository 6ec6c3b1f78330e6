"""Which extra tensors a checkpoint may carry, and which it may not.

A checkpoint key the inferred model has no place for is either on the short list below (known to
be unused by every inference and training path: dropped on purpose) or weights of a feature this
library does not implement. The second kind is refused: loading the rest would compute something
else without a word (as VideoCrafter1's relative-position tables once vanished).
"""
from __future__ import annotations

import re
from typing import Iterable

# (pattern matched against the whole key, why the tensor is never used). Each entry has a test.
KNOWN_UNUSED = (
    (r"model_ema\..*",
     "EMA copy of the UNet: the official inference configs set use_ema: false and run the main weights"),
    (r"(.*\.)?logit_scale",
     "CLIP's contrastive temperature: only the CLIP training loss reads it"),
    (r"(cond_stage_model|embedder)\.model\.attn_mask",
     "OpenCLIP's causal mask buffer (older open_clip saved it): rebuilt where it is used"),
    (r"cond_stage_model\.model\.visual\..*",
     "the OpenCLIP image tower beside the text encoder: the text encoder never calls it"),
    (r"embedder\.model\.transformer\..*",
     "the OpenCLIP text transformer beside the image embedder: the image embedder never calls it"),
    (r"logvar",
     "the per-timestep loss weights of training (learn_logvar)"),
    (r"first_stage_model\.loss\..*",
     "the VAE's training loss (LPIPS, discriminator)"),
)

# Weights of features we do not implement: (pattern searched in the key, the feature, what to do).
UNSUPPORTED_FEATURES = (
    (r"first_stage_model\.decoder\..*(attn_refinement|time_mix|time_stack|mix_factor)",
     "ToonCrafter's dual-reference video decoder", "this library decodes with the plain image VAE only"),
    (r"relative_position_[kv]\.embeddings_table",
     "relative frame positions (VideoCrafter1) outside the temporal attention layers", ""),
    (r"lora|lokr|hada_",
     "LoRA / adapter weights", "merge them into the model first, or apply them with a LoRA loader"),
    (r"adapter", "an adapter network (e.g. T2I-Adapter)", ""),
    (r"control", "a ControlNet", "load it with a ControlNet loader"),
)


def unused_reason(key: str) -> str | None:
    """Why `key` is known to be unused, or None."""
    return next((why for pattern, why in KNOWN_UNUSED if re.fullmatch(pattern, key)), None)


def feature_of(key: str) -> str:
    for pattern, feature, hint in UNSUPPORTED_FEATURES:
        if re.search(pattern, key, flags=re.IGNORECASE):
            return feature + (f"; {hint}" if hint else "")
    prefix = key.split(".")[0] if not key.startswith("model.diffusion_model.") else "model.diffusion_model"
    return f"a part of '{prefix}' this library does not implement"


def refuse_unknown(keys: Iterable[str]) -> list[str]:
    """The keys that are known unused (to drop); raises CheckpointError naming every other key
    with the feature it belongs to."""
    from ..config import CheckpointError

    keys = sorted(keys)
    unknown = [k for k in keys if unused_reason(k) is None]
    if unknown:
        by_feature: dict[str, list[str]] = {}
        for k in unknown:
            by_feature.setdefault(feature_of(k), []).append(k)
        lines = [f"- {feature}: {len(ks)} tensor(s), e.g. {', '.join(repr(k) for k in ks[:3])}"
                 for feature, ks in by_feature.items()]
        raise CheckpointError(
            f"this checkpoint has {len(unknown)} tensor(s) the model inferred from it has no place for, so "
            "loading it would silently compute something else:\n" + "\n".join(lines) +
            "\nUse a checkpoint of a supported model (DynamiCrafter 256/512/1024/interp, VideoCrafter1/2), or "
            "remove these tensors if you know the model works without them.")
    return keys
