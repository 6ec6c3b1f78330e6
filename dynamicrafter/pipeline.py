"""Image-to-video end to end (design §1, §10): conditioning from an image and a prompt,
DDIM sampling, decoding. `animate()` is the headless entry point; the ComfyUI nodes call the
same pieces (`image_conditioning`, `concat_latent`, `sample_ddim`)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import LATENT_CHANNELS, LATENT_SCALE
from .contract import SIZE, check_animate, check_image, check_image_conditioning, check_int, check_prompts
from .sampling.motion import check_fraction, direct, paste_back, prompt_schedule
from .sampling.ddim import image_only_context, sample_ddim
from .sampling.schedule import ddim_timesteps, randn
from .settings import Camera, Guidance, Schedule, Windows, variant_settings
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
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = int(round((nh - height) / 2.0)), int(round((nw - width) / 2.0))
    return x[..., top:top + height, left:left + width]


def fit_image(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A checked (n, 3, H, W) image batch in [-1, 1] covered and centre-cropped (`cover_crop`)."""
    check_image(images, "images")
    height, width = check_int("height", height, 1, SIZE[1]), check_int("width", width, 1, SIZE[1])
    return cover_crop(images, height, width)


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


@dataclass
class Conditioning:
    cond: torch.Tensor          # [prompt text | image tokens]
    uncond: torch.Tensor        # [negative text | tokens of a zero image]
    concat: torch.Tensor        # (b, 4, T, h, w)

    @property
    def uncond_img(self) -> torch.Tensor:
        """[negative text | real image tokens], the dual-CFG third branch."""
        return image_only_context(self.cond, self.uncond)


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


def animate(dc, image: Optional[torch.Tensor], prompt: str, *, end_image: Optional[torch.Tensor] = None,
            loop: bool = False, frames: Optional[int] = None, size: Optional[tuple] = None, fs: Optional[int] = None,
            guidance: Optional[Guidance] = None, schedule: Optional[Schedule] = None,
            windows: Optional[Windows] = None, seed: int = 123, negative_prompt: str = "",
            callback: Optional[Callable] = None, camera=None, motion_mask: Optional[torch.Tensor] = None,
            mask_feather: float = 1.0, init_video: Optional[torch.Tensor] = None, strength: float = 1.0,
            motion: float = 1.0, prompt_schedule: Optional[str] = None, **legacy) -> torch.Tensor:
    """Animate `image` ((1, 3, H, W) in [-1, 1], any size: fitted to the model's resolution)
    as the prompt says. Returns the video (1, 3, T, H, W) in [-1, 1]. Defaults per variant
    (fs, spacing, guidance scales and rescale, resolution) come from `dc.variant`: `guidance`
    defaults to the variant's, `schedule` to 50 steps of its spacing at eta 1 with DDIM (or a faster
    solver, `dynamicrafter.sampling.solvers`). `size` = (height, width). With a text-to-video model, pass
    image=None. `windows` (e.g. Windows(16)): sample in context windows of that many frames
    (`dynamicrafter.sampling.windows`), for videos longer than the model's frames (up to 1024); "looped"
    schedule for loop=True. Loose keywords of earlier releases (height=, width=, steps=, cfg_text=,
    window=, ...) still work with a DeprecationWarning. `camera` (CamI2V models): a
    `settings.Camera`, or just its trajectory (a preset name of dynamicrafter.camera.PRESET_NAMES, a
    pose file or (N, 4, 4) world-to-camera matrices).
    Directing the motion (`dynamicrafter.sampling.motion`, design §14): `motion_mask` (H, W) or (T, H, W) in
    [0, 1], 1 = free to move, 0 = hold the image (soft edge of `mask_feather` latent pixels; the held
    latent is the image's, and after decoding the held pixels are the image's too);
    `init_video` (1, 3, T, H, W) in [-1, 1] with `strength` in [0, 1] (1 = from pure noise, 0 = the
    clip back); `motion` in [0, 1] (1 = today's sampler; lower starts later from the image: less
    motion, closer to the image); `prompt_schedule` "0: a boat | 24: a storm" (per context window).
    Arguments outside the contract (dynamicrafter.contract) raise ValueError."""
    v = dc.variant
    height, width = size if size is not None else (legacy.pop("height", None), legacy.pop("width", None))
    if height is not None and size is None or width is not None and size is None:
        warnings.warn("animate(): height= and width= are deprecated and go in the next release: pass "
                      "size=(height, width)", DeprecationWarning, stacklevel=2)
    guidance, schedule, windows = variant_settings("animate", v, guidance, schedule, windows, legacy)
    check_animate(dc, image, prompt, end_image, loop, frames, (height, width), fs, seed, negative_prompt, callback,
                  (guidance, schedule, windows))
    strength, motion = check_fraction("strength", strength), check_fraction("motion", motion)
    if init_video is not None:
        check_init_video(init_video)
        frames = init_video.shape[2] if frames is None else frames
    elif strength < 1:
        raise ValueError(f"strength={strength} starts from a clip: give init_video (or strength=1)")
    if motion < 1 and (image is None or strength < 1):
        raise ValueError(f"motion={motion} starts from the input image's latent: it needs an image and no "
                         f"init_video (strength 1)")
    frames = v["frames"] if frames is None else frames
    height = v["resolution"][0] if height is None else height
    width = v["resolution"][1] if width is None else width
    fs = v["default_fs"] if fs is None else int(fs)
    generator = torch.Generator().manual_seed(seed)
    image_hw = tuple(image.shape[-2:]) if image is not None else (height, width)
    with torch.inference_mode():
        if v["image_cross_attention"]:
            image = fit_image(image.float(), height, width).to(dc.device)
            end = fit_image(end_image.float(), height, width).to(dc.device) if end_image is not None else None
            if has_reference_decoder(dc) and end is None:
                raise ValueError("ToonCrafter in-betweens two keyframes: give it an end image (--end-image)")
            c = image_conditioning(dc, image, [prompt], frames, end, loop, [negative_prompt], generator=generator)
        else:
            c = text_conditioning(dc, [prompt], [negative_prompt])
        cam = None
        if camera is not None:      # drawn after the VAE noise, before x_T (the official order)
            move = camera if isinstance(camera, Camera) else Camera(camera)
            cam = camera_condition(dc, move.trajectory, image_hw, frames, height, width, move.extract_ratio,
                                   move.trace_scale, schedule.solver, windows.size, generator)
        x_T = randn(video_latent_shape(1, frames, height, width), generator, dc.device)
        x_T, start, callback, per_window = direct_motion(
            dc, x_T, c, schedule.steps, schedule.spacing, generator, callback, motion_mask, mask_feather, init_video,
            strength, motion, prompt_schedule)
        if start == len(ddim_timesteps(schedule.steps, schedule.spacing)):     # strength 0: the clip's own latents
            return hold_pixels(dc.decode(x_T), image, motion_mask, mask_feather)
        if cam is not None:
            latents = sample_ddim(dc, x_T, c.cond, c.uncond, concat=c.concat, fs=fs, guidance=guidance,
                                  schedule=schedule, generator=generator, callback=callback, start=start,
                                  window_contexts=per_window, camera=cam, cfg_camera=move.cfg)
        else:
            latents = sample(dc, x_T, c.cond, c.uncond, concat=c.concat, fs=fs, guidance=guidance, schedule=schedule,
                             windows=windows, generator=generator, callback=callback, start=start,
                             window_contexts=per_window)
        if image is not None and has_reference_decoder(dc):
            video = decode_keyframe_clip(dc, latents, dc.encode_references(image, end))
        else:
            video = dc.decode(latents)
        return hold_pixels(video, image, motion_mask, mask_feather)


def hold_pixels(video: torch.Tensor, image: Optional[torch.Tensor], motion_mask, mask_feather: float) -> torch.Tensor:
    """The decoded video with the motion brush's held part pasted back from the (fitted) input image
    (`motion.paste_back`); unchanged without a mask."""
    if motion_mask is None:
        return video
    return paste_back(video, image, motion_mask, mask_feather)


def camera_condition(dc, camera, image_hw, frames: int, height: int, width: int, extract_ratio: float,
                     trace_scale: float, solver: str = "ddim", window=None, generator=None):
    """The CamI2V camera condition of a trajectory (preset, pose file or matrices) for a video of
    height x width made from an image of size image_hw (the intrinsics follow the official demo)."""
    from . import camera as geometry
    if dc.cfg.camera is None:
        raise ValueError("this model has no camera control (not a CamI2V checkpoint): leave camera unset")
    if solver != "ddim" or window is not None:
        raise ValueError("a camera move samples with the DDIM solver in one pass: use solver='ddim' and no window")
    if not isinstance(trace_scale, (int, float)) or not 0 <= trace_scale <= 100:
        raise ValueError(f"trace_scale must be a number in [0, 100], got {trace_scale!r}")
    RT = geometry.trajectory(camera, frames, extract_ratio)
    K = geometry.intrinsics(height, width, geometry.resized_size(image_hw, height, width), frames)
    return dc.encode_camera(RT, K, (height, width), trace_scale, generator=generator)


def check_init_video(clip) -> None:
    if not isinstance(clip, torch.Tensor) or clip.ndim != 5 or clip.shape[:2] != (1, 3) or clip.shape[2] < 2:
        raise ValueError(f"init_video must be a clip (1, 3, T, H, W) in [-1, 1] with T >= 2, got "
                         f"{tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__}")
    if not torch.isfinite(clip).all():
        raise ValueError("init_video holds NaN or infinite values")


def direct_motion(dc, x_T, c: Conditioning, steps, spacing, generator, callback, motion_mask, mask_feather,
                  init_video, strength, motion, schedule_text):
    """(x to start from, start step, callback, window_contexts) for `animate`'s motion controls
    (`dynamicrafter.sampling.motion.direct`); with none of them: (x_T, 0, callback, None), today's sampler."""
    b, _, frames, h, w = x_T.shape
    z = None
    if init_video is not None and strength < 1:
        if init_video.shape[2] != frames:
            raise ValueError(f"init_video has {init_video.shape[2]} frames but frames={frames}: give as many")
        pixels = fit_image(init_video[0].transpose(0, 1).float(), h * LATENT_SCALE, w * LATENT_SCALE).to(dc.device)
        z = dc.encode_first_stage(pixels, sample=False)              # the posterior mean: no random draw
        z = z.reshape(frames, *z.shape[1:]).transpose(0, 1)[None]
    image_latent = None if c.concat is None else c.concat[:, :, 0]
    x_T, start, callback = direct(dc, x_T, steps, spacing, image_latent=image_latent, video_latent=z,
                                  strength=strength if z is not None else 1.0, motion=motion, mask=motion_mask,
                                  mask_feather=mask_feather, generator=generator, callback=callback)
    per_window = None
    if schedule_text is not None:
        per_window = prompt_schedule(dc.encode_text, schedule_text).window_contexts
    return x_T, start, callback, per_window
