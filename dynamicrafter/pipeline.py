"""Image-to-video end to end (design §1, §10): conditioning from an image and a prompt,
DDIM sampling, decoding. `animate()` is the headless entry point; the ComfyUI nodes call the
same pieces (`image_conditioning`, `concat_latent`, `sample_ddim`)."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import LATENT_CHANNELS, LATENT_SCALE
from .contract import (FRAMINGS, SIZE, check_animate, check_choice, check_image, check_image_conditioning,
                       check_int, check_prompts)
from .sampling.motion import PromptSchedule, check_fraction, direct, paste_back, prompt_schedule
from .sampling.ddim import Conditioning, sample_ddim
from .sampling.schedule import ddim_timesteps, randn
from .settings import Camera, Guidance, Motion, Schedule, Shot, Windows, shot_and_motion, variant_settings
from .sampling.solvers import sample
from .models.tooncrafter import decode_keyframe_clip, has_reference_decoder


def video_latent_shape(batch: int, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """(b, 4, T, H/8, W/8): the latent the UNet denoises for `batch` videos of frames x height x width."""
    return batch, LATENT_CHANNELS, frames, height // LATENT_SCALE, width // LATENT_SCALE


def cover_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, C, H, W) -> (n, C, height, width), any value range: resize (antialiased bilinear) so
    the picture covers height x width, then crop the centre with torchvision's CenterCrop rounding
    (offset round(margin / 2), so a 3-row margin starts at row 2).  Equals the official
    Resize(shorter side) + CenterCrop when the aspect ratio is at least the target's, and crops
    instead of padding with black when it is not.  The one resize rule of the library, the nodes
    and the trainer, so training, inference and graphs see the same pixels."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    (nh, nw), (top, left) = cover_crop_box(h, w, height, width)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return x[..., top:top + height, left:left + width]


def cover_crop_box(h: int, w: int, height: int, width: int) -> tuple:
    """((resized h, resized w), (top, left)) of `cover_crop` for an h x w picture: what a camera's
    intrinsics must follow (dynamicrafter.camera.pixel_intrinsics)."""
    if (h, w) == (height, width):
        return (h, w), (0, 0)
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    return (nh, nw), (int(round((nh - height) / 2.0)), int(round((nw - width) / 2.0)))


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def letterbox(x: torch.Tensor, height: int, width: int, fill: float) -> torch.Tensor:
    """(n, C, H, W) -> (n, C, height, width): resized (as `cover_crop` resizes) so the whole picture
    fits inside, centred (`cover_crop`'s rounding) on a border of value `fill` (e.g. the value
    range's middle, a neutral grey). A picture of the target's aspect ratio is only resized, exactly
    as `cover_crop` resizes it."""
    h, w = x.shape[-2:]
    scale = min(height / h, width / w)
    nh, nw = max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))
    if (nh, nw) == (height, width):
        return cover_crop(x, height, width)
    top, left = int(round((height - nh) / 2.0)), int(round((width - nw) / 2.0))
    out = torch.full((*x.shape[:-2], height, width), float(fill), dtype=x.dtype, device=x.device)
    out[..., top:top + nh, left:left + nw] = _resize(x, nh, nw)
    return out


def frame_image(x: torch.Tensor, height: int, width: int, framing: str = "crop", fill: float = 0.0) -> torch.Tensor:
    """(n, C, H, W) fitted to height x width as `framing` says (contract.FRAMINGS): "crop" covers and
    crops the centre (`cover_crop`, the official rule), "pad" keeps the whole picture on a `fill`
    border (`letterbox`), "stretch" resizes to the size whatever the aspect ratio."""
    check_choice("framing", framing, FRAMINGS)
    if framing == "pad":
        return letterbox(x, height, width, fill)
    if framing == "stretch":
        return _resize(x, height, width)
    return cover_crop(x, height, width)


def fit_image(images: torch.Tensor, height: int, width: int, framing: str = "crop") -> torch.Tensor:
    """A checked (n, 3, H, W) image batch in [-1, 1] fitted to height x width (`frame_image`; "pad"
    borders are mid-grey, 0)."""
    check_image(images, "images")
    height, width = check_int("height", height, 1, SIZE[1]), check_int("width", width, 1, SIZE[1])
    return frame_image(images, height, width, framing, fill=0.0)


def concat_latent(z_start: torch.Tensor, frames: int, z_end: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The image latent as the UNet's extra input channels, (b, 4, T, h, w): the start latent on
    every frame, or (interpolation / loop, when z_end is given) start on frame 0, end on frame
    T-1 and zeros between."""
    if frames < 2:
        raise ValueError(f"frames must be at least 2, got {frames}")
    if z_end is None:
        return z_start[:, :, None].repeat(1, 1, frames, 1, 1)
    if z_end.shape != z_start.shape:
        raise ValueError(f"the end image's latent {tuple(z_end.shape)} differs from the start image's "
                         f"{tuple(z_start.shape)}: give both images the same size")
    out = torch.zeros(*z_start.shape[:2], frames, *z_start.shape[2:], dtype=z_start.dtype, device=z_start.device)
    out[:, :, 0], out[:, :, -1] = z_start, z_end
    return out


def image_context_pair(dc, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resampler tokens of the images and of an all-zero (mid-grey) image of the same size."""
    ctx = dc.image_context(dc.encode_clip_image(images))
    zero = dc.image_context(dc.encode_clip_image(torch.zeros_like(images)))
    return ctx, zero


def image_conditioning(dc, images: torch.Tensor, prompts: list[str], frames: int,
                       end_images: Optional[torch.Tensor] = None, loop: bool = False,
                       negative_prompts: Optional[list[str]] = None, vae_noise: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None) -> Conditioning:
    """Everything the UNet is conditioned on, from start image(s) in [-1, 1] (b, 3, H, W).
    `vae_noise` (T, 4, h, w) are the per-frame posterior draws (row 0 for the start image,
    row T-1 for the end image), as the official pipeline draws them."""
    prompts, negative_prompts = check_image_conditioning(images, prompts, frames, end_images, loop,
                                                         negative_prompts, vae_noise)
    b = images.shape[0]
    text = dc.encode_text(prompts)
    negative = dc.encode_text(negative_prompts)
    ctx, zero_ctx = image_context_pair(dc, images)
    noise = (lambda i: None) if vae_noise is None else (lambda i: vae_noise[i:i + 1].expand(b, -1, -1, -1))
    z = dc.encode_first_stage(images, noise=noise(0), generator=generator)
    z_end = None
    if end_images is not None or loop:
        z_end = dc.encode_first_stage(end_images if end_images is not None else images,
                                      noise=noise(frames - 1), generator=generator)
    return Conditioning(cond=torch.cat([text, ctx], dim=1), uncond=torch.cat([negative, zero_ctx], dim=1),
                        concat=concat_latent(z, frames, z_end))


def text_conditioning(dc, prompts: list[str], negative_prompts: Optional[list[str]] = None) -> Conditioning:
    """For text-to-video (VideoCrafter) models: text only, no image latent."""
    prompts = check_prompts(prompts, "prompts")
    negative = check_prompts("" if negative_prompts is None else negative_prompts, "negative_prompts", len(prompts))
    text = dc.encode_text(prompts)
    negative = dc.encode_text(negative)
    return Conditioning(cond=text, uncond=negative, concat=None)


def animate(dc, image: Optional[torch.Tensor], prompt: str, *, negative_prompt: str = "",
            shot: Optional[Shot] = None, guidance: Optional[Guidance] = None, schedule: Optional[Schedule] = None,
            windows: Optional[Windows] = None, motion: Optional[Motion] = None, callback: Optional[Callable] = None,
            **legacy) -> torch.Tensor:
    """Animate `image` ((1, 3, H, W) in [-1, 1], any size: fitted to the model's resolution)
    as the prompt says. Returns the video (1, 3, T, H, W) in [-1, 1]. `shot` (`settings.Shot`): frames,
    size (height, width), fs (None: the variant's), seed, loop, end_image (interpolation). Defaults
    per variant (fs, spacing, guidance scales and rescale, resolution) come from `dc.variant`: `guidance`
    defaults to the variant's, `schedule` to 50 steps of its spacing at eta 1 with DDIM (or a faster
    solver, `dynamicrafter.sampling.solvers`). With a text-to-video model, pass
    image=None. `windows` (e.g. Windows(16)): sample in context windows of that many frames
    (`dynamicrafter.sampling.windows`), for videos longer than the model's frames (up to 1024); "looped"
    schedule for loop=True. `motion` (`settings.Motion`, `dynamicrafter.sampling.motion`, design §14):
    motion brush, video to video, motion amount, prompt schedule, and (CamI2V models) the camera: a
    `settings.Camera`, or just its trajectory (a preset name of dynamicrafter.camera.PRESET_NAMES, a
    pose file or (N, 4, 4) world-to-camera matrices). With a motion brush (motion.mask) the held latent is
    the image's, and after decoding the held pixels are the image's too (`hold_pixels`). Loose keywords
    of earlier releases (frames=, size=, height=, width=, seed=, end_image=, steps=, cfg_text=, window=,
    camera=, motion_mask=, strength=, motion=0.5, ...) still work with a DeprecationWarning.
    `shot.framing` (contract.FRAMINGS): how the image(s) fit the video size, "crop" (the official cover
    crop), "pad" (the whole image on a grey border) or "stretch".
    Arguments outside the contract (dynamicrafter.contract) raise ValueError."""
    # 1. the settings: values, the loose keywords of earlier releases applied
    v = dc.variant
    shot, motion, legacy = shot_and_motion("animate", shot, motion, legacy)
    guidance, schedule, windows = variant_settings("animate", v, guidance, schedule, windows, legacy)
    check_animate(dc, image, prompt, negative_prompt, shot, (guidance, schedule, windows), callback)
    if schedule.start or guidance.camera != 1.0:
        raise ValueError("animate sets the start step from motion.strength / motion.amount and the camera CFG from "
                         "Camera.cfg: leave schedule.start at 0 and guidance.camera at 1")
    end_image, frames, init_video = shot.end_image, shot.frames, motion.init_video
    strength, amount = check_fraction("strength", motion.strength), check_fraction("motion", motion.amount)
    framing = check_choice("framing", shot.framing, FRAMINGS)
    if init_video is not None:
        check_init_video(init_video)
        frames = init_video.shape[2] if frames is None else frames
    elif strength < 1:
        raise ValueError(f"strength={strength} starts from a clip: give init_video (or strength=1)")
    if amount < 1 and (image is None or strength < 1):
        raise ValueError(f"motion={amount} starts from the input image's latent: it needs an image and no "
                         f"init_video (strength 1)")
    frames = v["frames"] if frames is None else frames
    height, width = shot.size if shot.size is not None else (None, None)
    height = v["resolution"][0] if height is None else height
    width = v["resolution"][1] if width is None else width
    fs = v["default_fs"] if shot.fs is None else int(shot.fs)
    generator = torch.Generator().manual_seed(shot.seed)
    image_hw = tuple(image.shape[-2:]) if image is not None else (height, width)
    # 2. conditioning, camera, x_T and where the motion controls start the sampler
    with torch.inference_mode():
        if v["image_cross_attention"]:
            image = fit_image(image.float(), height, width, framing).to(dc.device)
            end = None if end_image is None else fit_image(end_image.float(), height, width, framing).to(dc.device)
            if has_reference_decoder(dc) and end is None:
                raise ValueError("ToonCrafter in-betweens two keyframes: give it an end image (--end-image)")
            c = image_conditioning(dc, image, [prompt], frames, end, shot.loop, [negative_prompt], generator=generator)
        else:
            c = text_conditioning(dc, [prompt], [negative_prompt])
        cam = None
        if motion.camera is not None:      # drawn after the VAE noise, before x_T (the official order)
            move = motion.camera if isinstance(motion.camera, Camera) else Camera(motion.camera)
            if schedule.solver != "ddim" or windows.size is not None:
                raise ValueError("a camera move samples with the DDIM solver in one pass: use solver='ddim' and "
                                 "no window")
            cam = camera_condition(dc, move, image_hw, frames, (height, width), generator)
            guidance = dataclasses.replace(guidance, camera=move.cfg)
        x_T = randn(video_latent_shape(1, frames, height, width), generator, dc.device)
        x_T, start, callback, per_window = direct_motion(dc, x_T, c, schedule, motion, generator, callback)
        if start == len(ddim_timesteps(schedule.steps, schedule.spacing)):     # strength 0: the clip's own latents
            return hold_pixels(dc.decode(x_T), image, motion.mask, motion.feather)
        # 3. sample and decode
        c = dataclasses.replace(c, fs=fs, camera=cam, window_contexts=per_window)
        schedule = dataclasses.replace(schedule, start=start)
        if cam is not None:
            latents = sample_ddim(dc, x_T, c, guidance=guidance, schedule=schedule, generator=generator,
                                  callback=callback)
        else:
            latents = sample(dc, x_T, c, guidance=guidance, schedule=schedule, windows=windows, generator=generator,
                             callback=callback)
        if image is not None and has_reference_decoder(dc):
            video = decode_keyframe_clip(dc, latents, dc.encode_references(image, end))
        else:
            video = dc.decode(latents)
        return hold_pixels(video, image, motion.mask, motion.feather)


def hold_pixels(video: torch.Tensor, image: Optional[torch.Tensor], motion_mask, mask_feather: float) -> torch.Tensor:
    """The decoded video with the motion brush's held part pasted back from the (fitted) input image
    (`motion.paste_back`); unchanged without a mask."""
    if motion_mask is None:
        return video
    return paste_back(video, image, motion_mask, mask_feather)


def camera_condition(dc, move: Camera, image_hw, frames: int, size: tuple, generator=None):
    """The CamI2V camera condition of a move (its trajectory: a preset, pose file or matrices, resampled
    with its extract_ratio and trace_scale) for a video of `frames` at size (height, width) made from
    an image of size image_hw (the intrinsics follow the official demo)."""
    from . import camera as geometry
    if dc.cfg.camera is None:
        raise ValueError("this model has no camera control (not a CamI2V checkpoint): leave camera unset")
    trace_scale, (height, width) = move.trace_scale, size
    if not isinstance(trace_scale, (int, float)) or not 0 <= trace_scale <= 100:
        raise ValueError(f"trace_scale must be a number in [0, 100], got {trace_scale!r}")
    RT = geometry.trajectory(move.trajectory, frames, move.extract_ratio)
    K = geometry.intrinsics(height, width, geometry.resized_size(image_hw, height, width), frames)
    return dc.encode_camera(RT, K, (height, width), trace_scale, generator=generator)


def check_init_video(clip) -> None:
    if not isinstance(clip, torch.Tensor) or clip.ndim != 5 or clip.shape[:2] != (1, 3) or clip.shape[2] < 2:
        raise ValueError(f"init_video must be a clip (1, 3, T, H, W) in [-1, 1] with T >= 2, got "
                         f"{tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__}")
    if not torch.isfinite(clip).all():
        raise ValueError("init_video holds NaN or infinite values")


def direct_motion(dc, x_T, c: Conditioning, schedule: Schedule, motion: Motion, generator, callback):
    """(x to start from, start step, callback, window_contexts) for `animate`'s motion controls
    (`dynamicrafter.sampling.motion.direct`); with none of them: (x_T, 0, callback, None), today's sampler."""
    b, _, frames, h, w = x_T.shape
    z, init_video = None, motion.init_video
    if init_video is not None and motion.strength < 1:
        if init_video.shape[2] != frames:
            raise ValueError(f"init_video has {init_video.shape[2]} frames but frames={frames}: give as many")
        pixels = fit_image(init_video[0].transpose(0, 1).float(), h * LATENT_SCALE, w * LATENT_SCALE).to(dc.device)
        z = dc.encode_first_stage(pixels, sample=False)              # the posterior mean: no random draw
        z = z.reshape(frames, *z.shape[1:]).transpose(0, 1)[None]
    image_latent = None if c.concat is None else c.concat[:, :, 0]
    if z is None:
        motion = dataclasses.replace(motion, strength=1.0)
    x_T, start, callback = direct(dc, x_T, schedule, motion, image_latent=image_latent, video_latent=z,
                                  generator=generator, callback=callback)
    per_window = None
    if motion.prompt_schedule is not None:
        per_window = motion.prompt_schedule.window_contexts if isinstance(motion.prompt_schedule, PromptSchedule) \
            else prompt_schedule(dc.encode_text, motion.prompt_schedule).window_contexts
    return x_T, start, callback, per_window
