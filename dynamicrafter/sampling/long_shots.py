"""Long shots: picking a frame of a video, chaining segments, continuing a clip.

Three ways past one segment of T frames, each a small function here (the nodes and the
benchmark call them):

1. `chain_segments` - segment k+1 is animated from segment k's last frame; the repeated first
   frame of each later segment is dropped, so N frames take 1 + ceil((N - T) / (T - 1)) segments.
   Positions join, but each segment starts from a still image (the motion restarts at the join).
2. Context windows over the whole video (`sampling.sample_ddim(..., window=W)`).
3. `continue_latents` / `continue_clip` - a new window of T frames whose first O frames are the
   clip's last O frames, kept pinned to the clip during sampling (RePaint-style: after every DDIM
   step those frames are replaced by the clip's latents noised to the level the step reached),
   while the T - O new frames are sampled. The new frames see the clip's motion, not a still, so
   the motion carries on; the output is the clip followed by the T - O new frames.

The pinned latents follow the sampler's own levels (`pinned_levels`): after the step from t to
t_prev, x is sqrt(a_prev) * s * z + sqrt(1 - a_prev) * noise, with s the dynamic x0 rescale
factor of t_prev (DynamiCrafter, design §6, §8; 1 for models without it).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from .schedule import NoiseSchedule, randn
from ..settings import SHOT_KEYWORDS, Guidance, Schedule, Shot, apply_legacy, variant_settings

FRAME_CHOICES = ("first", "last", "index")
LONG_VIDEO_METHODS = ("chained", "windows")
DEFAULT_LONG_VIDEO_METHOD = "windows"    # the winner of benchmarks/bench_long_shots.py (README: Long shots)


# ---------------------------------------------------------------------------- 1. video input
def frame_index(count: int, which: str, index: int = 0) -> int:
    """The frame `which` ("first", "last", or "index": `index`, negative counts from the end as in
    Python) of a video of `count` frames, checked."""
    if which not in FRAME_CHOICES:
        raise ValueError(f"which must be one of {FRAME_CHOICES}, got {which!r}")
    if count < 1:
        raise ValueError("the video has no frames: connect an IMAGE batch with at least one frame "
                         "(e.g. GetVideoComponents' images)")
    if which == "first":
        return 0
    if which == "last":
        return count - 1
    if not -count <= index < count:
        raise ValueError(f"index {index} is outside the video's {count} frames (use 0..{count - 1}, or "
                         f"-1..-{count} to count from the end)")
    return index % count


# ---------------------------------------------------------------------------- 2. chained segments
def segments_needed(total: int, segment: int) -> int:
    """Segments of `segment` frames that chain to at least `total` frames (each later one adds segment - 1)."""
    if segment < 2:
        raise ValueError(f"segment frames must be at least 2, got {segment}")
    return 1 if total <= segment else 1 + math.ceil((total - segment) / (segment - 1))


def chain_segments(animate_from: Callable[[int, torch.Tensor], torch.Tensor], start: torch.Tensor, total: int,
                   segment: int, dim: int = 0) -> torch.Tensor:
    """`total` frames from chained segments: `animate_from(k, image)` returns segment k's frames
    (along `dim`, its first frame re-creating `image`); segment k+1 starts from segment k's last
    frame, whose copy is dropped at the join. `start` is the first image (one frame along `dim`)."""
    current, pieces = start, []
    for k in range(segments_needed(total, segment)):
        frames = animate_from(k, current)
        if frames.shape[dim] != segment:
            raise ValueError(f"segment {k} has {frames.shape[dim]} frames, expected {segment}")
        pieces.append(frames if k == 0 else frames.narrow(dim, 1, segment - 1))
        current = frames.narrow(dim, segment - 1, 1)
    return torch.cat(pieces, dim).narrow(dim, 0, total)


def segment_joins(total: int, segment: int) -> list[int]:
    """Frame steps (t -> t+1, given as t) where a chained segment starts: the first step of every later segment."""
    return [k * (segment - 1) for k in range(1, segments_needed(total, segment)) if k * (segment - 1) < total - 1]


def window_overlap(segment: int) -> int:
    """Frames shared by neighbouring context windows of `segment` frames for a long video: half a window."""
    return segment // 2


# ---------------------------------------------------------------------------- 3. continuing a clip
def pinned_levels(dc, steps: int, spacing: str) -> list[tuple[float, float]]:
    """(signal, noise) coefficients of x after each DDIM step of `sample_ddim`, in callback order:
    a clean latent z sits in x as signal * z + noise * N(0, I) once that step is done (step i ends
    at level i + 1 of `NoiseSchedule.levels`)."""
    lv = NoiseSchedule.of(dc).levels(steps, spacing)
    return list(zip(lv.alpha[1:], lv.sigma[1:]))


def pin_frames(dc, known: torch.Tensor, steps: int, spacing: str, generator: Optional[torch.Generator] = None,
               callback: Optional[Callable] = None) -> Callable:
    """A `sample_ddim` callback that keeps the first O frames of x on `known` ((b, 4, O, h, w)
    clean latents): after each step it writes them in, noised to that step's level with fresh
    noise (drawn for all steps at once from `generator`, `schedule.randn`), then calls `callback`
    (if any) with the pinned x."""
    levels = pinned_levels(dc, steps, spacing)
    draws = torch.stack([randn(known.shape, generator) for _ in levels]).to(known)
    o = known.shape[2]

    def pin(i, total, x, x0):
        signal, noise = levels[i]
        x[:, :, :o] = signal * known + noise * draws[i]
        if callback is not None:
            callback(i, total, x, x0)

    return pin


def check_overlap(overlap: int, frames: int, clip_frames: int) -> None:
    if not 1 <= overlap < frames:
        raise ValueError(f"overlap must be in 1..{frames - 1} (frames - 1) so the window makes new frames, "
                         f"got {overlap}")
    if overlap > clip_frames:
        raise ValueError(f"overlap {overlap} is longer than the clip ({clip_frames} frames): lower it or give "
                         f"a longer clip")


def continue_latents(dc, known: torch.Tensor, x_T: torch.Tensor, cond, *contexts, guidance: Optional[Guidance] = None,
                     schedule: Optional[Schedule] = None, generator=None, callback=None, **legacy) -> torch.Tensor:
    """Sample a window x_T (b, 4, T, h, w) whose first O frames stay pinned to `known` (b, 4, O, h, w),
    the clip's last O latents; returns the window's latents (its first O frames are the clip's,
    re-noised and denoised: use the clip's own frames there). cond (a `sampling.ddim.Conditioning`),
    guidance, schedule: as `sample_ddim`'s (earlier releases' tensor contexts and loose keywords still
    work, with a DeprecationWarning)."""
    from .ddim import sample_ddim, sampler_values
    cond, guidance, schedule, _ = sampler_values("continue_latents", cond, contexts, (guidance, schedule, None),
                                                 legacy)
    if known.ndim != 5 or known.shape[:2] != x_T.shape[:2] or known.shape[3:] != x_T.shape[3:]:
        raise ValueError(f"the clip's latents {tuple(known.shape)} do not fit the window {tuple(x_T.shape)}: "
                         f"same batch, channels and size needed")
    check_overlap(known.shape[2], x_T.shape[2], known.shape[2])
    x_T = x_T.clone()
    pin = pin_frames(dc, known, schedule.steps, schedule.spacing, generator, callback)
    return sample_ddim(dc, x_T, cond, guidance=guidance, schedule=schedule, generator=generator, callback=pin)


def continue_clip(dc, clip: torch.Tensor, prompt, *, shot: Optional[Shot] = None, overlap: int = 4,
                  condition: str = "window_start", guidance: Optional[Guidance] = None,
                  schedule: Optional[Schedule] = None, negative_prompt: str = "", **legacy) -> torch.Tensor:
    """Extend `clip` ((b, 3, N, H, W) in [-1, 1], at the model's size) by frames - overlap new frames
    that carry its motion on (`prompt`: one text, or one per video); returns
    (b, 3, N + frames - overlap, H, W): the clip unchanged, then the new frames. `condition`: the
    image the window is animated from - "window_start" (the first pinned frame, where the model
    expects its image, default) or "clip_end" (the clip's last frame). `shot` (`settings.Shot`):
    the window's frames and fs (None = the variant's) and the seed; its size is the clip's.
    guidance defaults to the variant's, schedule to 50 steps of its spacing at eta 1 (loose keywords
    of earlier releases, frames= fs= seed= among them, still work, with a DeprecationWarning)."""
    from ..pipeline import image_conditioning, video_latent_shape
    if clip.ndim != 5 or clip.shape[1] != 3:
        raise ValueError(f"clip must be a video (b, 3, N, H, W) in [-1, 1], got shape {tuple(clip.shape)}")
    if condition not in ("window_start", "clip_end"):
        raise ValueError(f"condition must be 'window_start' or 'clip_end', got {condition!r}")
    v = dc.variant
    own = {k: legacy.pop(k) for k in ("frames", "fs", "seed") if k in legacy}
    shot = apply_legacy("continue_clip", {"shot": shot or Shot()}, own, SHOT_KEYWORDS)["shot"]
    if shot.size is not None or shot.loop or shot.end_image is not None:
        raise ValueError("continue_clip continues the clip at its own size: give shot=Shot(frames, fs=..., seed=...) "
                         "without size, loop or end_image")
    guidance, schedule, _ = variant_settings("continue_clip", v, guidance, schedule, None, legacy)
    frames = v["frames"] if shot.frames is None else shot.frames
    fs = v["default_fs"] if shot.fs is None else shot.fs
    check_overlap(overlap, frames, clip.shape[2])
    b, _, n, h, w = clip.shape
    g = torch.Generator().manual_seed(shot.seed)
    tail = clip[:, :, n - overlap:]
    image = tail[:, :, 0] if condition == "window_start" else tail[:, :, -1]
    with torch.inference_mode():
        prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
        c = image_conditioning(dc, image, prompts, frames, negative_prompts=[negative_prompt] * b, generator=g)
        known = dc.encode_first_stage(tail.transpose(1, 2).reshape(b * overlap, 3, h, w), generator=g)
        known = known.reshape(b, overlap, *known.shape[1:]).transpose(1, 2)
        x_T = randn(video_latent_shape(b, frames, h, w), g, dc.device)
        lat = continue_latents(dc, known, x_T, dataclasses.replace(c, fs=fs), guidance=guidance, schedule=schedule,
                               generator=g)
        new = dc.decode(lat[:, :, overlap:]).clamp(-1, 1)      # a valid clip to continue again
    return torch.cat([clip, new.to(clip)], dim=2)
