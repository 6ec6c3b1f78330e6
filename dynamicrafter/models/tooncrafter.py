"""ToonCrafter decoding: the official output re-decodes the two middle frames.

The dual-reference decoder adds the keyframe references to the clip's first and last frames
and mixes frames over time, so frame t depends on the whole clip. After sampling, the official
inference decodes the T latent frames, then decodes them again without frames 1 and T-2, and
takes the two middle frames (T/2-1, T/2) from that second decode.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def has_reference_decoder(dc) -> bool:
    """True for ToonCrafter (the dual-reference video decoder), whatever the variant says."""
    vae = getattr(dc, "first_stage_model", None)
    return vae is not None and getattr(vae.cfg, "decoder", "image") == "dualref"


def with_middle_redecode(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
    """decode(latents (b, 4, T, h, w)) -> video with frames on dim 2, its two middle frames
    (T/2-1, T/2) replaced by a decode of the clip without latent frames 1 and T-2, as the
    official ToonCrafter inference returns it. Clips shorter than 4 frames are decoded once."""
    video = decode(latents)
    t = latents.shape[2]
    if t < 4:
        return video
    keep = [i for i in range(t) if i not in (1, t - 2)]
    middle = decode(latents[:, :, keep])
    mid = t // 2
    video[:, :, mid - 1:mid + 1] = middle[:, :, mid - 2:mid]
    return video


def decode_keyframe_clip(dc, latents: torch.Tensor, references: Optional[list],
                         frames_per_batch: Optional[int] = None) -> torch.Tensor:
    """(b, 4, T, h, w) -> (b, 3, T, H, W) exactly as the official ToonCrafter inference returns it
    (not clamped), with the references of the start/end images."""
    return with_middle_redecode(lambda z: dc.decode(z, frames_per_batch=frames_per_batch, references=references),
                                latents)
