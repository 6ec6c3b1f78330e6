"""Small image helpers shared by the nodes (ComfyUI IMAGE = (b, H, W, C) floats in [0, 1])."""
from __future__ import annotations

import torch

from dynamicrafter.pipeline import frame_image


def check_finite(image: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(image):
        raise ValueError(f"{name} is not an IMAGE tensor (got {type(image).__name__})")
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be an IMAGE batch (b, H, W, C); got shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        bad = int((~torch.isfinite(image)).sum())
        raise ValueError(f"{name} contains {bad} NaN/inf values; fix or replace the image before animating it")


def rgb(image: torch.Tensor) -> torch.Tensor:
    """Drop alpha / expand grey so the image has 3 channels."""
    if image.shape[-1] == 1:
        return image.repeat(1, 1, 1, 3)
    return image[..., :3]


def images_to_signed(image: torch.Tensor) -> torch.Tensor:
    """IMAGE (b, H, W, C) in [0, 1] -> (b, 3, H, W) in [-1, 1]."""
    return rgb(image).movedim(-1, 1).float() * 2.0 - 1.0


def fit_frames(image: torch.Tensor, width: int, height: int, framing: str = "crop") -> torch.Tensor:
    """IMAGE fitted to width x height by the library's rule for `framing` (`frame_image`: crop, pad
    on a mid-grey border, stretch)."""
    image = rgb(image)
    if image.shape[1:3] == (height, width):
        return image
    return frame_image(image.movedim(-1, 1).float(), height, width, framing, fill=0.5).clamp(0, 1).movedim(1, -1)


def resize_center(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE covered and centre-cropped to width x height by the library's one rule (`cover_crop`)."""
    return fit_frames(image, width, height, "crop")
