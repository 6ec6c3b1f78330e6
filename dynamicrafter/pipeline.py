"""Image-to-video end to end (design §1, §10): conditioning from an image and a prompt,
DDIM sampling, decoding. `animate()` is the headless entry point; the ComfyUI nodes call the
same pieces (`image_conditioning`, `concat_latent`, `sample_ddim`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .contract import SIZE, check_animate, check_image, check_image_conditioning, check_int, check_prompts
from .motion import check_fraction, direct, prompt_schedule
from .sampling import image_only_context
from .schedule import ddim_timesteps
from .solvers import sample
from .tooncrafter import decode_keyframe_clip, has_reference_decoder


LATENT_CHANNELS, LATENT_SCALE = 4, 8     # the KL-f8 VAE: 4 latent channels at 1/8 of the pixel size


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
            loop: bool = False, frames: Optional[int] = None, height: Optional[int] = None,
            width: Optional[int] = None, fs: Optional[int] = None, steps: int = 50, cfg_text: Optional[float] = None,
            cfg_img: Optional[float] = None, eta: float = 1.0, guidance_rescale: Optional[float] = None,
            spacing: Optional[str] = None, seed: int = 123, negative_prompt: str = "",
            callback: Optional[Callable] = None, solver: str = "ddim", window: Optional[int] = None,
            window_overlap: int = 4, window_schedule: str = "uniform", motion_mask: Optional[torch.Tensor] = None,
            mask_feather: float = 1.0, init_video: Optional[torch.Tensor] = None, strength: float = 1.0,
            motion: float = 1.0, prompt_schedule: Optional[str] = None) -> torch.Tensor:
    """Animate `image` ((1, 3, H, W) in [-1, 1], any size: fitted to the model's resolution)
    as the prompt says. Returns the video (1, 3, T, H, W) in [-1, 1]. Defaults per variant
    (fs, spacing, guidance scales and rescale, resolution) come from `dc.variant`. With a text-to-video
    model, pass image=None. `solver`: "ddim" (official) or a faster one (`dynamicrafter.solvers`).
    `window` (e.g. 16): sample in context windows of that many frames (`dynamicrafter.windows`), for
    videos longer than the model's frames (up to 1024); "looped" schedule for loop=True.
    Directing the motion (`dynamicrafter.motion`, design §14): `motion_mask` (H, W) or (T, H, W) in
    [0, 1], 1 = free to move, 0 = hold the image (soft edge of `mask_feather` latent pixels);
    `init_video` (1, 3, T, H, W) in [-1, 1] with `strength` in [0, 1] (1 = from pure noise, 0 = the
    clip back); `motion` in [0, 1] (1 = today's sampler; lower starts later from the image: less
    motion, closer to the image); `prompt_schedule` "0: a boat | 24: a storm" (per context window).
    Arguments outside the contract (dynamicrafter.contract) raise ValueError."""
    check_animate(dc, image, prompt, end_image=end_image, loop=loop, frames=frames, height=height, width=width, fs=fs,
                  steps=steps, cfg_text=cfg_text, cfg_img=cfg_img, eta=eta, guidance_rescale=guidance_rescale,
                  spacing=spacing, seed=seed, negative_prompt=negative_prompt, callback=callback, window=window,
                  window_overlap=window_overlap, window_schedule=window_schedule)
    strength, motion = check_fraction("strength", strength), check_fraction("motion", motion)
    if init_video is not None:
        check_init_video(init_video)
        frames = init_video.shape[2] if frames is None else frames
    elif strength < 1:
        raise ValueError(f"strength={strength} starts from a clip: give init_video (or strength=1)")
    if motion < 1 and (image is None or strength < 1):
        raise ValueError(f"motion={motion} starts from the input image's latent: it needs an image and no "
                         f"init_video (strength 1)")
    v = dc.variant
    frames = v["frames"] if frames is None else frames
    height = v["resolution"][0] if height is None else height
    width = v["resolution"][1] if width is None else width
    fs = v["default_fs"] if fs is None else int(fs)
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        if v["image_cross_attention"]:
            image = fit_image(image.float(), height, width).to(dc.device)
            end = fit_image(end_image.float(), height, width).to(dc.device) if end_image is not None else None
            if has_reference_decoder(dc) and end is None:
                raise ValueError("ToonCrafter in-betweens two keyframes: give it an end image (--end-image)")
            c = image_conditioning(dc, image, [prompt], frames, end, loop, [negative_prompt], generator=generator)
        else:
            c = text_conditioning(dc, [prompt], [negative_prompt])
        x_T = torch.randn(video_latent_shape(1, frames, height, width), generator=generator).to(dc.device)
        spacing = spacing or v["spacing"]
        x_T, start, callback, schedule = direct_motion(
            dc, x_T, c, steps, spacing, generator, callback, motion_mask, mask_feather, init_video, strength, motion,
            prompt_schedule)
        if start == len(ddim_timesteps(steps, spacing)):       # strength 0: the clip's own latents
            return dc.decode(x_T)
        latents = sample(dc, x_T, c.cond, c.uncond, solver=solver, concat=c.concat, fs=fs, steps=steps,
                         cfg_text=v["cfg_text"] if cfg_text is None else cfg_text,
                         cfg_img=v.get("cfg_img") if cfg_img is None else cfg_img, eta=eta,
                         guidance_rescale=v["guidance_rescale"] if guidance_rescale is None else guidance_rescale,
                         spacing=spacing, generator=generator, callback=callback, window=window,
                         window_overlap=window_overlap, window_schedule=window_schedule, start=start,
                         window_contexts=schedule)
        if image is not None and has_reference_decoder(dc):
            return decode_keyframe_clip(dc, latents, dc.encode_references(image, end))
        return dc.decode(latents)


def check_init_video(clip) -> None:
    if not isinstance(clip, torch.Tensor) or clip.ndim != 5 or clip.shape[:2] != (1, 3) or clip.shape[2] < 2:
        raise ValueError(f"init_video must be a clip (1, 3, T, H, W) in [-1, 1] with T >= 2, got "
                         f"{tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__}")
    if not torch.isfinite(clip).all():
        raise ValueError("init_video holds NaN or infinite values")


def direct_motion(dc, x_T, c: Conditioning, steps, spacing, generator, callback, motion_mask, mask_feather,
                  init_video, strength, motion, schedule_text):
    """(x to start from, start step, callback, window_contexts) for `animate`'s motion controls
    (`dynamicrafter.motion.direct`); with none of them: (x_T, 0, callback, None), today's sampler."""
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
    schedule = None
    if schedule_text is not None:
        schedule = prompt_schedule(dc.encode_text, schedule_text).window_contexts
    return x_T, start, callback, schedule
