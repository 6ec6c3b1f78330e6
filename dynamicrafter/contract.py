"""The input contract of the library's public functions, in one place.

Images are float tensors (n, 3, H, W) in [-1, 1]; frames, steps, fs and sizes lie in the ranges
below; prompts are a str or a list of str matching the batch; guidance scales are finite; a
text-to-video model takes no image and an image-to-video model needs one. Every violation is a
ValueError that names the argument, the value given and what is allowed (with the conversion when
the input is merely in another convention, e.g. 0-255 images). One `check_*` per entry point;
the ComfyUI nodes reuse the small checks for their own widgets.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .sampling.schedule import ddim_timesteps

FRAMES = (2, 64)            # frames of one video (the released models are trained on 16)
LONG_FRAMES = (2, 1024)     # frames of a video sampled in context windows (each window within FRAMES)
WINDOW_SCHEDULES = ("uniform", "looped")
FRAMINGS = ("crop", "pad", "stretch")   # fitting an image to the video size: cover + crop, letterbox, distort
STEPS = (1, 1000)           # DDIM steps (the DDPM schedule has 1000 timesteps)
FS = (1, 1000)              # frame-rate conditioning: fps or frame stride, per model (dc.variant["fs_range"])
SIZE = (64, 4096)           # pixel height / width, multiples of SIZE_STEP
SIZE_STEP = 64              # VAE /8, then three UNet downsamplings /2
GUIDANCE = (0.0, 100.0)     # cfg_text, cfg_img
UNIT = (0.0, 1.0)           # eta, guidance_rescale
SPACINGS = ("uniform", "uniform_trailing", "quad")
RANGE_SLACK = 1e-3          # resizing may overshoot [-1, 1] by rounding


def _show(v: Any) -> str:
    text = repr(v) if not isinstance(v, torch.Tensor) else f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    return text if len(text) <= 80 else text[:77] + "..."


def check_int(name: str, v: Any, lo: int, hi: int, extra: str = "") -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not lo <= int(v) <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}{extra}, got {_show(v)}")
    return int(v)


def check_number(name: str, v: Any, lo: float, hi: float, optional: bool = False) -> Optional[float]:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) \
            or not lo <= float(v) <= hi:
        raise ValueError(f"{name} must be a finite number in [{lo}, {hi}]{' or None' if optional else ''}, "
                         f"got {_show(v)}")
    return float(v)


def check_choice(name: str, v: Any, choices: Sequence) -> Any:
    if v not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {_show(v)}")
    return v


def check_size(height: Any, width: Any) -> tuple[int, int]:
    """Pixel sizes: multiples of 64 within SIZE."""
    for name, v in (("height", height), ("width", width)):
        check_int(name, v, *SIZE, extra=f" and a multiple of {SIZE_STEP}")
        if v % SIZE_STEP:
            near = max(SIZE[0], round(v / SIZE_STEP) * SIZE_STEP)
            raise ValueError(f"{name} must be a multiple of {SIZE_STEP} in {SIZE[0]}..{SIZE[1]} for this UNet, "
                             f"got {v} (nearest: {near})")
    return int(height), int(width)


def check_fs(fs: Any, dc=None) -> int:
    trained = f" (this model was trained on {dc.variant['fs_range'][0]}..{dc.variant['fs_range'][1]})" \
        if dc is not None else ""
    return check_int("fs", fs, *FS, extra=trained)


def check_image(x: Any, name: str = "image", batch: Optional[int] = None, multiple: int = 1) -> torch.Tensor:
    """A float tensor (n, 3, H, W) in [-1, 1], H and W >= 1 (and multiples of `multiple`)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a float tensor (n, 3, H, W) in [-1, 1], got {type(x).__name__}"
                         + (": use dynamicrafter.load_image(path)" if isinstance(x, (str, Path)) else ""))
    if x.ndim == 3 and x.shape[0] == 3:
        raise ValueError(f"{name} must be (n, 3, H, W), got {_show(x)}: add the batch dimension, {name}[None]")
    if x.ndim == 4 and x.shape[1] != 3 and x.shape[-1] in (1, 3, 4):
        raise ValueError(f"{name} must be (n, 3, H, W), got {_show(x)} (channels last?): "
                         f"use {name}[..., :3].permute(0, 3, 1, 2)")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must be (n, 3, H, W) with 3 (RGB) channels, got {_show(x)}")
    n, _, h, w = x.shape
    if n == 0 or h == 0 or w == 0:
        raise ValueError(f"{name} must have at least one image of at least 1x1 pixels, got {_show(x)}")
    if batch is not None and n != batch:
        raise ValueError(f"{name} must hold {batch} image(s), got {n}")
    if multiple > 1 and (h % multiple or w % multiple):
        raise ValueError(f"{name} size {w}x{h} must be a multiple of {multiple} in width and height "
                         f"(e.g. {max(multiple, w // multiple * multiple)}x{max(multiple, h // multiple * multiple)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be float in [-1, 1], got {x.dtype} values: convert 0-255 images with "
                         f"{name}.float() / 127.5 - 1")
    finite = torch.isfinite(x)
    if not finite.all():
        raise ValueError(f"{name} must be finite, got {int((~finite).sum())} NaN/inf values; fix or replace "
                         f"the image")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_SLACK or hi > 1 + RANGE_SLACK:
        hint = (f"it looks like 0-255: use {name} / 127.5 - 1" if lo >= 0 and hi <= 255 else
                f"rescale it, e.g. {name}.clamp(-1, 1)")
        raise ValueError(f"{name} must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]: {hint}")
    return x


def check_prompts(prompts: Any, name: str = "prompts", batch: Optional[int] = None) -> list[str]:
    """A str (one prompt for the whole batch) or a list of str, one per batch item."""
    if isinstance(prompts, str):
        return [prompts] * (batch or 1)
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts) or not prompts:
        raise ValueError(f"{name} must be a str or a non-empty list of str, got {_show(prompts)}")
    if batch is not None and len(prompts) != batch:
        raise ValueError(f"{name} must hold one prompt per image ({batch}), got {len(prompts)}")
    return list(prompts)


def check_family(dc, image: Any, name: str = "image") -> None:
    """An image-to-video model needs an image; a text-to-video model refuses one."""
    if dc.variant["image_cross_attention"]:
        if image is None:
            raise ValueError(f"{name} is required: this is an image-to-video model ({dc.variant['name']}); "
                             f"give it an image, a (1, 3, H, W) tensor in [-1, 1]")
    elif image is not None:
        raise ValueError(f"{name} must be None: this is a text-to-video model ({dc.variant['name']}), "
                         f"which cannot use an image")


def check_guidance(cfg_text, cfg_img, eta, guidance_rescale) -> None:
    check_number("cfg_text", cfg_text, *GUIDANCE)
    check_number("cfg_img", cfg_img, *GUIDANCE, optional=True)
    check_number("eta", eta, *UNIT)
    check_number("guidance_rescale", guidance_rescale, *UNIT)


# ----------------------------------------------------------------------------- entry points

def check_animate(dc, image, prompt, negative_prompt, shot, settings, callback) -> None:
    """animate's inputs: the image and prompts, its Shot (the video's frames / size (height, width: None =
    the variant's) / fs / seed / loop / end_image), its (Guidance, Schedule, Windows) and callback."""
    guidance, schedule, win = settings
    end_image, loop, frames, fs, seed = shot.end_image, shot.loop, shot.frames, shot.fs, shot.seed
    if shot.size is not None and (not isinstance(shot.size, (tuple, list)) or len(shot.size) != 2):
        raise ValueError(f"size must be (height, width), got {_show(shot.size)}")
    height, width = shot.size if shot.size is not None else (None, None)
    window, window_overlap, window_schedule = win.size, win.overlap, win.schedule
    cfg_text, cfg_img, eta, guidance_rescale = guidance.cfg_text, guidance.cfg_img, schedule.eta, guidance.rescale
    steps, spacing = schedule.steps, schedule.spacing
    check_family(dc, image)
    if image is not None:
        check_image(image, "image", batch=1)
    if end_image is not None:
        check_family(dc, end_image, "end_image")
        check_image(end_image, "end_image", batch=1)
        if loop:
            raise ValueError("loop must be False when an end_image is given (interpolation), got loop=True")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {_show(prompt)}")
    if not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a str, got {_show(negative_prompt)}")
    check_windows(window, window_overlap, window_schedule)
    if frames is not None:
        if window is not None and isinstance(frames, numbers.Integral) and frames > window:
            check_int("frames", frames, LONG_FRAMES[0], LONG_FRAMES[1], extra=f" with window={window}")
        else:
            check_int("frames", frames, *FRAMES)
    if height is not None or width is not None:
        check_size(height if height is not None else dc.variant["resolution"][0],
                   width if width is not None else dc.variant["resolution"][1])
    if fs is not None:
        check_fs(fs, dc)
    check_guidance(cfg_text if cfg_text is not None else dc.variant["cfg_text"], cfg_img, eta,
                   guidance_rescale if guidance_rescale is not None else 0.0)
    check_steps(steps, spacing or dc.variant["spacing"])
    check_int("seed", seed, 0, 2 ** 64 - 1)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {_show(callback)}")


def check_image_conditioning(images, prompts, frames, end_images, loop, negative_prompts, vae_noise) -> list:
    """Returns (prompts, negative prompts) as lists matching the batch."""
    check_image(images, "images")
    b = images.shape[0]
    check_int("frames", frames, *LONG_FRAMES)     # more than FRAMES[1]: sampled in context windows
    if end_images is not None:
        check_image(end_images, "end_images", batch=b)
        if end_images.shape != images.shape:
            raise ValueError(f"end_images must be the size of images, {tuple(images.shape[-2:])}, got "
                             f"{tuple(end_images.shape[-2:])}: resize both to the same width and height")
        if loop:
            raise ValueError("loop must be False when end_images are given (interpolation), got loop=True")
    prompts = check_prompts(prompts, "prompts", b)
    negative = [""] * b if negative_prompts is None else check_prompts(negative_prompts, "negative_prompts", b)
    if vae_noise is not None:
        h, w = images.shape[-2] // 8, images.shape[-1] // 8
        if not isinstance(vae_noise, torch.Tensor) or tuple(vae_noise.shape) != (frames, 4, h, w):
            raise ValueError(f"vae_noise must be a tensor of shape {(frames, 4, h, w)}, got {_show(vae_noise)}")
    return [prompts, negative]


def check_windows(window, overlap, schedule) -> None:
    """Context windows (dynamicrafter.sampling.windows): window None (off) or W frames per UNet call,
    overlap 0..W-1 frames shared by neighbouring windows, schedule uniform | looped."""
    if window is None:
        return
    check_int("window", window, 2, FRAMES[1], extra=" (frames per UNet call; None = no windows)")
    check_int("window_overlap", overlap, 0, int(window) - 1, extra=f" (less than window={window})")
    check_choice("window_schedule", schedule, WINDOW_SCHEDULES)


def check_frames(frames: int, window, lo: int = 1) -> None:
    """One UNet call takes up to FRAMES[1] frames; context windows make longer videos valid."""
    if window is not None and window < frames:
        check_int("frames (x_T.shape[2])", frames, lo, LONG_FRAMES[1], extra=f" with window={window}")
    elif isinstance(frames, numbers.Integral) and frames > FRAMES[1]:
        raise ValueError(f"frames (x_T.shape[2]) must be an integer in {lo}..{FRAMES[1]}, got {frames}: one UNet "
                         f"call takes up to {FRAMES[1]} frames; pass window=16 (context windows) to sample up to "
                         f"{LONG_FRAMES[1]}")
    else:
        check_int("frames (x_T.shape[2])", frames, lo, FRAMES[1])


def check_sample_ddim(dc, x_T, c, guidance, schedule, windows, noise) -> None:
    """sample_ddim's inputs: x_T, the Conditioning `c`, its Guidance, Schedule and Windows, the step noise."""
    cond, uncond, uncond_img, concat, fs = c.cond, c.uncond, c.image_only, c.concat, c.fs
    steps, spacing, eta = schedule.steps, schedule.spacing, schedule.eta
    cfg_text, cfg_img, guidance_rescale = guidance.cfg_text, guidance.cfg_img, guidance.rescale
    window, window_overlap, window_schedule = windows.size, windows.overlap, windows.schedule
    if not isinstance(x_T, torch.Tensor) or x_T.ndim != 5 or x_T.shape[1] != 4 or 0 in x_T.shape:
        raise ValueError(f"x_T must be a latent (b, 4, T, h, w), got {_show(x_T)}")
    check_windows(window, window_overlap, window_schedule)
    # a single frame is a still: the trainer samples stage 1 (text-to-image, temporal layers off) so
    check_frames(x_T.shape[2], window)
    if not torch.isfinite(x_T).all():
        raise ValueError("x_T must be finite, got NaN/inf values")
    for name, c in (("cond", cond), ("uncond", uncond), ("uncond_img", uncond_img)):
        if c is None and name != "cond":
            continue
        if not isinstance(c, torch.Tensor) or c.ndim != 3 or c.shape[0] != x_T.shape[0]:
            raise ValueError(f"{name} must be a context (b, L, C) with b = {x_T.shape[0]} like x_T, got {_show(c)}")
        if not torch.isfinite(c).all():
            raise ValueError(f"{name} must be finite, got NaN/inf values")
    if concat is not None and (not isinstance(concat, torch.Tensor) or concat.ndim != 5
                               or concat.shape[0] != x_T.shape[0] or concat.shape[2:] != x_T.shape[2:]):
        raise ValueError(f"concat must be (b, C, T, h, w) matching x_T {tuple(x_T.shape)}, got {_show(concat)}")
    if dc.variant["image_cross_attention"] and concat is None and dc.unet.cfg.in_channels != 4:
        raise ValueError("concat is required: this image-to-video model needs the image latent "
                         "(dynamicrafter.image_conditioning(...).concat)")
    if not dc.variant["image_cross_attention"] and concat is not None:
        raise ValueError("concat must be None: this is a text-to-video model, which cannot use an image latent")
    if fs is not None:
        if isinstance(fs, torch.Tensor):
            if fs.is_floating_point() or fs.numel() not in (1, x_T.shape[0]) or fs.numel() and \
                    not (FS[0] <= int(fs.min()) and int(fs.max()) <= FS[1]):
                raise ValueError(f"fs must be integers in {FS[0]}..{FS[1]}, one or one per batch item, "
                                 f"got {_show(fs)}")
        else:
            check_fs(fs, dc)
    check_guidance(cfg_text, cfg_img, eta, guidance_rescale)
    check_steps(steps, spacing)
    if noise is not None and eta > 0 and len(noise) < steps:
        raise ValueError(f"noise must hold one tensor per step ({steps}), got {len(noise)}")


def check_steps(steps: Any, spacing: Optional[str]) -> int:
    """steps in STEPS and, given a spacing, a count that spacing defines ('uniform_trailing' has
    gaps above schedule.MAX_TRAILING_STEPS): the one steps rule of the library and the nodes."""
    steps = check_int("steps", steps, *STEPS)
    if spacing is not None:
        check_choice("spacing", spacing, SPACINGS)
        ddim_timesteps(steps, spacing)
    return steps


def check_load_image(path: Any) -> Path:
    if not isinstance(path, (str, Path)):
        raise ValueError(f"path must be a str or Path to an image file, got {_show(path)}")
    if not Path(path).is_file():
        raise ValueError(f"path must be an existing image file, got {str(path)!r} (not found)")
    return Path(path)
