"""Context windows along time (design §8): the UNet runs on overlapping windows of W frames at
every sampling step and the overlapping outputs are blended, so a video can be longer than the
frames the model was trained on while every UNet call sees a clip of the trained length.

1. `context_windows`: which frames each window holds. "uniform": runs of W consecutive frames
   stepping W - overlap, the last one moved back to end on the last frame; "looped": the runs go
   on around the end (frame T-1 next to frame 0), for loop videos.
2. `blend_weights`: per window, per frame: a ramp over the overlap (1/(O+1) .. O/(O+1) at the
   edges, 1 inside), divided by the sum over the windows holding the frame, so the weights of a
   frame sum to 1 and joins fade across the overlap.
3. Per window, what the UNet reads is cut to its frames: the latent and the concat latent along
   time (`take_frames`), and the image tokens when the context holds 16 tokens per frame of the
   whole video (`take_context`: the layout `UNet3D.per_frame_context` reads, design §7). The
   conditioning frames stay on their frames: image-to-video has the start latent on every frame
   (every window gets it); interpolation / loop put the start latent on frame 0 and the end (or
   start) latent on frame T-1, so the windows holding those frames are the ones conditioned on
   them ("looped" joins T-1 and 0 in one window).

Everything else (timestep, fs, guidance) is the window's as the whole video's. The library
sampler (`sampling.sample_ddim`) and the ComfyUI model (`nodes/comfy_model.py`) use these helpers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..config import QUERIES_PER_FRAME, TEXT_CONTEXT_LEN

SCHEDULES = ("uniform", "looped")


def context_windows(frames: int, window: int, overlap: int, schedule: str = "uniform") -> list[list[int]]:
    """Frame indices of each window, in order; one window [0..T-1] when window >= frames."""
    if window >= frames:
        return [list(range(frames))]
    stride = window - overlap
    if schedule == "looped":
        count = -(-frames // stride)         # ceil: the runs go round once
        return [[(s + k) % frames for k in range(window)] for s in range(0, count * stride, stride)]
    starts = list(range(0, frames - window + 1, stride))
    if starts[-1] + window < frames:
        starts.append(frames - window)
    return [list(range(s, s + window)) for s in starts]


def edge_ramp(window: int, overlap: int) -> np.ndarray:
    """(W,) float64: min(1, (k+1)/(O+1), (W-k)/(O+1)), so two windows overlapping by O sum to 1."""
    k = np.arange(window, dtype=np.float64)
    return np.minimum(1.0, np.minimum(k + 1, window - k) / (overlap + 1))


def _blend_weights(windows: Sequence[Sequence[int]], frames: int, overlap: int) -> list[np.ndarray]:
    total = np.zeros(frames, dtype=np.float64)
    ramps = []
    for idx in windows:
        ramp = edge_ramp(len(idx), overlap)
        np.add.at(total, np.asarray(idx), ramp)
        ramps.append(ramp)
    if (total == 0).any():
        missing = np.flatnonzero(total == 0).tolist()
        raise ValueError(f"context windows leave frames {missing[:8]} uncovered")
    return [ramp / total[np.asarray(idx)] for ramp, idx in zip(ramps, windows)]


def blend_weights(windows: Sequence[Sequence[int]], frames: int, overlap: int) -> list[torch.Tensor]:
    """Per window, (W,) float64 weights of its frames; for every frame the weights sum to 1
    (computed in NumPy: no float64 torch op; the sampler holds them as float32, `plan_windows`)."""
    return [torch.from_numpy(w) for w in _blend_weights(windows, frames, overlap)]


def take_frames(x: Optional[torch.Tensor], idx: Sequence[int], dim: int = 2) -> Optional[torch.Tensor]:
    """The window's frames of a (b, C, T, h, w) tensor (None stays None)."""
    if x is None:
        return None
    return x.index_select(dim, torch.as_tensor(idx, device=x.device))


def per_frame_tokens(context: torch.Tensor, frames: int) -> bool:
    """Does the context hold [77 text | 16 image tokens per frame] for `frames` frames?"""
    return context.shape[1] == TEXT_CONTEXT_LEN + QUERIES_PER_FRAME * frames


def take_context(context: torch.Tensor, idx: Sequence[int], frames: int) -> torch.Tensor:
    """The window's context: the text and the image tokens of its frames when the context holds
    16 tokens per frame of the `frames`-frame video; otherwise (text only, or tokens not laid out
    per frame of this video) every frame reads the whole context, in a window as in the video."""
    if not per_frame_tokens(context, frames):
        return context
    image = context[:, TEXT_CONTEXT_LEN:].unflatten(1, (frames, QUERIES_PER_FRAME))
    image = image.index_select(1, torch.as_tensor(idx, device=context.device)).flatten(1, 2)
    return torch.cat([context[:, :TEXT_CONTEXT_LEN], image], dim=1)


@dataclass
class WindowPlan:
    """The windows of one sampling run and their blend weights."""
    frames: int
    windows: list
    weights: list

    def on(self, device, dtype) -> list:
        """(frame indices, weights) per window as tensors on `device`, made once per device and dtype."""
        key = (torch.device(device), dtype)
        cache = self.__dict__.setdefault("_on", {})
        if key not in cache:
            cache[key] = [(torch.as_tensor(idx, device=device), w.to(device=device, dtype=dtype))
                          for idx, w in zip(self.windows, self.weights)]
        return cache[key]

    def blend(self, x: torch.Tensor, run: Callable[[list], torch.Tensor], dim: int = 2) -> torch.Tensor:
        """sum over windows of weight * run(window's frame indices), put back on its frames."""
        out = None
        for k, idx in enumerate(self.windows):
            part = run(idx)
            if out is None:
                out = torch.zeros(*part.shape[:dim], self.frames, *part.shape[dim + 1:],
                                  dtype=part.dtype, device=part.device)
            index, w = self.on(part.device, part.dtype)[k]
            shape = [1] * part.ndim
            shape[dim] = len(idx)
            out.index_add_(dim, index, part * w.reshape(shape))
        return out


def plan_windows(frames: int, window: Optional[int], overlap: int = 4, schedule: str = "uniform") \
        -> Optional[WindowPlan]:
    """None when windows are off (window None or >= frames): the sampler then runs as without them."""
    if window is None or window >= frames:
        return None
    windows = context_windows(frames, window, overlap, schedule)
    weights = [torch.from_numpy(w.astype(np.float32)) for w in _blend_weights(windows, frames, overlap)]
    return WindowPlan(frames, windows, weights)
