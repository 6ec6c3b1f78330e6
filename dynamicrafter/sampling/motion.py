"""Directing the motion (design §14): what moves, where the sampler starts, how much it moves, and
prompts that change along a long shot. No new weights: each control is a change of the DDIM
loop's start or of its latent between steps.

1. Start step. `sample_ddim(..., start=k)` begins at step k of the n-step schedule from a latent
   already at that step's noise level (x = alpha_k z + sigma_k eps, `NoiseSchedule.levels`). `start_step`
   maps a strength s in [0, 1] to k = n - round(s n): s = 1 is k = 0 (today's sampler), s = 0 is
   k = n (no step: the latent itself).
2. Video to video (`init_latent`): a clip's latents noised to step k with the sampler's own x_T as
   the noise, so s = 1 is x_T exactly (zero terminal SNR: alpha_0 = 0) and no extra draw happens.
3. Motion amount (`analytic_init`, CIL, Zhao et al. 2024): start at step k = n - round(m n) from
   the Gaussian closest (KL) to the true marginal of x at that level, mean alpha_k E[x0] and variance
   alpha_k^2 Var[x0] + sigma_k^2, with E[x0] the image latent on every frame.
4. Motion brush (`MaskPin`): after every step, outside the mask x is the image latent noised to the
   level that step reached (`long_shots`' pinning), with a soft edge; after the last step it is
   the image latent itself. After decoding, `paste_back` holds the pixels too: frames =
   m video + (1 - m) image, m the same soft mask resized to pixels (the VAE decoder's frame-wide
   GroupNorms would otherwise carry the motion of the free part into the held pixels).
5. Prompt schedule (`PromptSchedule`): "0: a boat | 24: a storm"; each context window's text is
   the prompts' embeddings interpolated at the window's centre frame.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import LATENT_SCALE, TEXT_CONTEXT_LEN
from .schedule import NoiseSchedule, ddim_timesteps, randn
from ..settings import Motion, Schedule, apply_legacy


# ---------------------------------------------------------------------------- 1. start step
def check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def start_step(steps: int, amount: float, spacing: str = "uniform_trailing", name: str = "strength") -> int:
    """The step the sampler starts at for a strength / motion amount in [0, 1]: n - round(amount * n),
    n the steps the spacing makes of `steps` ('uniform' can make one more)."""
    n = len(ddim_timesteps(steps, spacing))
    return n - int(round(check_fraction(name, amount) * n))


def level(dc, steps: int, spacing: str, k: int) -> tuple[float, float]:
    """(alpha, sigma) of x before step k of the n-step DDIM (k = n: after the last step), data
    scale included: a clean latent z sits there as alpha z + sigma eps."""
    lv = NoiseSchedule.of(dc).levels(steps, spacing)
    return lv.alpha[k], lv.sigma[k]


# ---------------------------------------------------------------------------- 2. video to video
def init_latent(dc, z: torch.Tensor, x_T: torch.Tensor, steps: int, spacing: str, k: int) -> torch.Tensor:
    """The latent to start step k from: z (b, 4, T, h, w) noised to step k's level with x_T as the
    noise. k = 0 returns x_T itself (bit-for-bit), k = steps returns z."""
    if z.shape != x_T.shape:
        raise ValueError(f"the init video's latents {tuple(z.shape)} differ from the video to sample "
                         f"{tuple(x_T.shape)}: give the clip the same frames and size")
    if k == 0:
        return x_T
    if k == len(ddim_timesteps(steps, spacing)):
        return z.clone()
    return NoiseSchedule.of(dc).noise_to_step(z, x_T, steps, spacing, k)


# ---------------------------------------------------------------------------- 3. motion amount
def analytic_init(dc, z_image: torch.Tensor, x_T: torch.Tensor, steps: int, spacing: str, k: int,
                  spread: float = 0.0) -> torch.Tensor:
    """CIL's Analytic-Init at step k: alpha_k E[x0] + sqrt(alpha_k^2 spread + sigma_k^2) x_T with
    E[x0] the image latent z_image (b, 4, h, w) on every frame and `spread` the per-element
    variance of the frames around it (0: the frames are taken to average to the image).
    k = 0 returns x_T itself (bit-for-bit); k = steps (no step left) the mean, the still image."""
    if k == 0:
        return x_T
    if spread < 0:
        raise ValueError(f"spread (a variance) must be >= 0, got {spread}")
    mean = z_image[:, :, None].expand(-1, -1, x_T.shape[2], -1, -1)
    if k == len(ddim_timesteps(steps, spacing)):
        return mean.clone()
    alpha, sigma = level(dc, steps, spacing, k)
    return alpha * mean + math.sqrt(alpha ** 2 * spread + sigma ** 2) * x_T


# ---------------------------------------------------------------------------- 4. motion brush
def fit_mask(mask: torch.Tensor, frames: int, height: int, width: int, feather: float = 1.0) -> torch.Tensor:
    """A motion mask (H, W) or (T, H, W) in [0, 1] (1 = free to move) at latent size: (1, 1, frames,
    height, width). Area-averaged to the latent grid (a pixel edge becomes a fractional latent
    edge), frames taken nearest in time, then blurred by a Gaussian of `feather` latent pixels
    (0 = no blur) for a soft edge."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or 0 in mask.shape:
        raise ValueError(f"motion_mask must be an (H, W) or (T, H, W) tensor, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = mask.float()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError("motion_mask values must be in [0, 1] (1 = free to move, 0 = hold the image)")
    if feather < 0:
        raise ValueError(f"feather must be >= 0 latent pixels, got {feather}")
    m = mask if mask.ndim == 3 else mask[None]
    m = F.interpolate(m[:, None], size=(height, width), mode="area")[:, 0]          # (T', h, w)
    if m.shape[0] != frames:
        idx = torch.div(torch.arange(frames) * m.shape[0], frames, rounding_mode="floor")
        m = m[idx]
    if feather > 0:
        import kornia
        r = max(1, int(math.ceil(2 * feather)))
        m = kornia.filters.gaussian_blur2d(m[:, None], (2 * r + 1, 2 * r + 1), (feather, feather),
                                           border_type="replicate")[:, 0]
    return m.clamp(0, 1)[None, None]


@dataclass
class MaskPin:
    """A `sample_ddim` callback: after step i, x = m x + (1 - m) (alpha z + sigma eps) with the level
    the step reached and fresh eps from `generator`; after the last step, x = m x + (1 - m) z.
    `z` (b, 4, T or 1, h, w): the latent to hold (the image latent on every frame);
    `mask` (1, 1, T, h, w) from `fit_mask`."""
    dc: object
    z: torch.Tensor
    mask: torch.Tensor
    steps: int
    spacing: str
    generator: Optional[torch.Generator] = None
    callback: Optional[Callable] = None

    def __post_init__(self):
        self.levels = NoiseSchedule.of(self.dc).levels(self.steps, self.spacing)

    def held(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The held latent at the level before step k (k = steps: clean), shaped like x."""
        z = self.z.expand(-1, -1, x.shape[2], -1, -1).to(x)
        if k >= len(self.levels):
            return z
        eps = randn(x.shape, self.generator, x.device, x.dtype)
        return self.levels.alpha[k] * z + self.levels.sigma[k] * eps

    def apply(self, x: torch.Tensor, k: int) -> torch.Tensor:
        m = self.mask.to(x)
        return m * x + (1 - m) * self.held(x, k)

    def __call__(self, i, total, x, x0):
        x.copy_(self.apply(x, i + 1))
        if self.callback is not None:
            self.callback(i, total, x, x0)


def pixel_mask(mask: torch.Tensor, frames: int, height: int, width: int, feather: float = 1.0) -> torch.Tensor:
    """The soft mask the sampler holds the latent with (`fit_mask` at height/8 x width/8), resized
    bilinearly to height x width pixels: (1, 1, frames, height, width)."""
    if height % LATENT_SCALE or width % LATENT_SCALE:
        raise ValueError(f"the video is {width}x{height}: the motion brush holds decoded frames, whose sides are "
                         f"multiples of {LATENT_SCALE}")
    m = fit_mask(mask, frames, height // LATENT_SCALE, width // LATENT_SCALE, feather)[0, 0]
    m = F.interpolate(m[:, None], size=(height, width), mode="bilinear", align_corners=False)
    return m[:, 0][None, None]


def paste_back(video: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, feather: float = 1.0) -> torch.Tensor:
    """The motion brush in pixels: m video + (1 - m) image on every frame, m = `pixel_mask` of the
    motion mask (1 = free to move). `video` (b, 3, T, H, W) decoded, `image` (b or 1, 3, H, W) in
    the same value range: the input image the held part keeps."""
    if video.ndim != 5 or image.ndim != 4 or image.shape[1:] != (video.shape[1], *video.shape[-2:]) \
            or image.shape[0] not in (1, video.shape[0]):
        raise ValueError(f"the held image {tuple(image.shape)} does not fit the video {tuple(video.shape)}: give "
                         f"it the video's size, (b, C, H, W) for a video (b, C, T, H, W)")
    _, _, frames, height, width = video.shape
    m = pixel_mask(mask.to(video.device), frames, height, width, feather).to(video.dtype)
    return m * video + (1 - m) * image[:, :, None].to(video)


# ---------------------------------------------------------------------------- 5. prompt schedule
_ENTRY = re.compile(r"^\s*(\d+)\s*:\s*(.*?)\s*$", re.S)


def parse_prompt_schedule(text: str) -> list[tuple[int, str]]:
    """"0: a boat on a calm lake | 24: a storm rises" -> [(0, ...), (24, ...)], frames ascending.
    A schedule without any "frame:" entry is one prompt at frame 0."""
    if not isinstance(text, str):
        raise ValueError(f"prompt schedule must be a str like '0: a boat | 24: a storm', got {type(text).__name__}")
    parts = [p for p in text.split("|")]
    if len(parts) == 1 and not _ENTRY.match(parts[0]):
        return [(0, text.strip())]
    out = []
    for p in parts:
        m = _ENTRY.match(p)
        if m is None:
            raise ValueError(f"prompt schedule entry {p.strip()!r} is not 'frame: prompt' (e.g. '0: a boat | "
                             f"24: a storm')")
        out.append((int(m.group(1)), m.group(2)))
    frames = [f for f, _ in out]
    if len(set(frames)) != len(frames):
        raise ValueError(f"prompt schedule gives frame(s) {sorted({f for f in frames if frames.count(f) > 1})} "
                         f"twice: one prompt per frame")
    return sorted(out)


def schedule_weights(keys: Sequence[int], frame: float) -> list[float]:
    """Linear interpolation weights of the keyed prompts at `frame` (constant before the first key
    and after the last)."""
    w = [0.0] * len(keys)
    if frame <= keys[0]:
        w[0] = 1.0
    elif frame >= keys[-1]:
        w[-1] = 1.0
    else:
        j = max(i for i, k in enumerate(keys) if k <= frame)
        f = (frame - keys[j]) / (keys[j + 1] - keys[j])
        w[j], w[j + 1] = 1.0 - f, f
    return w


@dataclass
class PromptSchedule:
    """Keyed text embeddings (K, L, C) at frames `keys`; `window_contexts` is the `sample_ddim`
    hook giving each window its text: the embeddings interpolated at the window's centre frame."""
    keys: list
    texts: torch.Tensor

    def text_at(self, frame: float) -> torch.Tensor:
        w = torch.tensor(schedule_weights(self.keys, frame), dtype=self.texts.dtype, device=self.texts.device)
        return (w[:, None, None] * self.texts).sum(0, keepdim=True)

    def window_contexts(self, idx: Sequence[int], contexts: list) -> list:
        """contexts[0] = cond [text | image]: its text replaced by the schedule's at the window's centre."""
        centre = (idx[0] + idx[-1]) / 2 if idx[-1] >= idx[0] else idx[0]
        cond = contexts[0]
        text = self.text_at(centre).to(cond).expand(cond.shape[0], -1, -1)
        return [torch.cat([text, cond[:, TEXT_CONTEXT_LEN:]], dim=1)] + list(contexts[1:])


def prompt_schedule(encode_text: Callable[[list], torch.Tensor], text: str) -> PromptSchedule:
    """A PromptSchedule from its text, each prompt encoded by `encode_text(list of str) -> (K, L, C)`."""
    entries = parse_prompt_schedule(text)
    return PromptSchedule([f for f, _ in entries], encode_text([p for _, p in entries]))


# ---------------------------------------------------------------------------- all together
# direct()'s loose keywords of earlier releases
DIRECT_KEYWORDS = {"steps": ("schedule", "steps"), "spacing": ("schedule", "spacing"),
                   "strength": ("motion", "strength"), "motion": ("motion", "amount"), "mask": ("motion", "mask"),
                   "mask_feather": ("motion", "feather")}


def direct(dc, x_T: torch.Tensor, schedule: Schedule, motion: Optional[Motion] = None, *,
           image_latent: Optional[torch.Tensor] = None, video_latent: Optional[torch.Tensor] = None,
           generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None, **legacy):
    """(x to start from, start step, callback) for `sample_ddim` (`schedule`: its steps and spacing) from
    the motion controls (`settings.Motion`): `video_latent` (b, 4, T, h, w) with `motion.strength`
    (video to video), or `motion.amount` < 1 from `image_latent` (b, 4, h, w) (CIL analytic init);
    `motion.mask` (H, W) / (T, H, W), 1 = free to move, holds `image_latent` elsewhere. With none of
    them: (x_T, 0, callback), today's sampler. Earlier releases' calls (steps, spacing, then
    strength=, motion=, mask=, mask_feather=) still work, with a DeprecationWarning."""
    if not isinstance(schedule, Schedule):      # direct(dc, x_T, steps, spacing, ...)
        legacy = {"steps": schedule, "spacing": motion, **legacy}
        schedule, motion = Schedule(), None
    if isinstance(motion, (int, float)):        # motion= was the motion amount
        legacy, motion = {**legacy, "motion": motion}, None
    values = apply_legacy("direct", {"schedule": schedule, "motion": motion or Motion()}, legacy, DIRECT_KEYWORDS)
    steps, spacing, m = values["schedule"].steps, values["schedule"].spacing, values["motion"]
    strength, motion = check_fraction("strength", m.strength), check_fraction("motion", m.amount)
    mask, mask_feather = m.mask, m.feather
    start = 0
    if strength < 1:
        if video_latent is None:
            raise ValueError(f"strength={strength} starts from a clip: give its latent (init video) or strength 1")
        if motion < 1:
            raise ValueError(f"motion={motion} starts from the image, strength={strength} from a clip: set one of "
                             f"them to 1")
        start = start_step(steps, strength, spacing, "strength")
        x_T = init_latent(dc, video_latent.to(x_T), x_T, steps, spacing, start)
    elif motion < 1:
        if image_latent is None:
            raise ValueError(f"motion={motion} starts from the input image's latent: it needs an image-to-video "
                             f"model and an image")
        start = start_step(steps, motion, spacing, "motion")
        x_T = analytic_init(dc, image_latent.to(x_T), x_T, steps, spacing, start)
    if mask is not None:
        if image_latent is None:
            raise ValueError("a motion mask holds parts of the input image still: it needs an image-to-video "
                             "model and an image")
        fitted = fit_mask(mask, x_T.shape[2], x_T.shape[3], x_T.shape[4], mask_feather).to(x_T.device)
        pin = MaskPin(dc, image_latent[:, :, None].to(x_T), fitted, steps, spacing, generator, callback)
        x_T, callback = pin.apply(x_T, start), pin
    return x_T, start, callback
