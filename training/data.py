"""Video + caption data for the trainer.

A dataset is a folder of videos and a CSV. Two CSV layouts are read:
  * WebVid: ``videoid,name,page_dir`` -> ``<video_dir>/<page_dir>/<videoid>.mp4``, caption ``name``
  * plain:  ``video,caption``         -> ``<video_dir>/<video>`` (absolute paths are kept)
``video_dir`` defaults to the CSV's folder. Extra columns are ignored.

Sampling is a deterministic *stream*: stream index k (0, 1, 2, ...) maps to epoch
k // N and, inside it, to position k % N of a seeded permutation of the N videos; every
random choice for that sample (frame stride, start frame) comes from a generator seeded
by (seed, k). The data position of a run is therefore one integer (samples consumed),
resume is exact without saving loader state, and the samples of one optimizer step do
not depend on how they are split over processes and accumulation steps.

Unreadable or too-short videos are skipped (logged once each) and replaced by the next
video of the same permutation; an empty dataset is an error that says why.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import numpy as np
import torch

from dynamicrafter.pipeline import cover_crop

log = logging.getLogger("training.data")


class DatasetError(ValueError):
    """The dataset cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class VideoRecord:
    path: str
    caption: str


def read_annotations(csv_path: str, video_dir: Optional[str] = None) -> list[VideoRecord]:
    """Rows of a WebVid-layout or plain CSV as (absolute video path, caption)."""
    if not os.path.isfile(csv_path):
        raise DatasetError(f"caption CSV not found: {csv_path}")
    video_dir = video_dir or os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = set(reader.fieldnames or [])
        if {"videoid", "name", "page_dir"} <= header:
            def row_to_record(row):
                return VideoRecord(os.path.join(video_dir, row["page_dir"], f"{row['videoid']}.mp4"), row["name"])
        elif {"video", "caption"} <= header:
            def row_to_record(row):
                return VideoRecord(os.path.join(video_dir, row["video"]), row["caption"])
        else:
            raise DatasetError(
                f"{csv_path}: unrecognised CSV header {sorted(header)}; expected WebVid columns "
                "'videoid,name,page_dir' or plain columns 'video,caption'")
        return [row_to_record(row) for row in reader]


def probe_video(path: str) -> tuple[int, float]:
    """(number of frames, frames per second) of the first video stream."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        n = stream.frames
        if not n:   # container without a frame count: count the packets that carry frames
            n = sum(1 for p in container.demux(stream) if p.size > 0)
    return int(n), fps


def decode_frames(path: str, indices: list[int]) -> np.ndarray:
    """uint8 (len(indices), H, W, 3) RGB frames at the given (sorted, possibly repeated) indices."""
    import av

    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    last = wanted[-1]
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    missing = [i for i in wanted if i not in got]
    if missing:
        raise ValueError(f"video ended before frame {missing[0]} (decoded {len(got)} of {len(wanted)} wanted frames)")
    return np.stack([got[i] for i in indices])


def choose_clip(n_frames: int, frames: int, max_stride: int, rng: np.random.Generator) -> tuple[int, int]:
    """(start, stride) of a clip of `frames` frames with a random stride in 1..max_stride that fits."""
    if n_frames < frames:
        raise ValueError(f"video has {n_frames} frames, fewer than the {frames} needed")
    fit = (n_frames - 1) // (frames - 1) if frames > 1 else max_stride
    stride = int(rng.integers(1, max(1, min(max_stride, fit)) + 1))
    start = int(rng.integers(0, n_frames - (frames - 1) * stride))
    return start, stride


class VideoDataset(torch.utils.data.Dataset):
    """Stream-indexed clips: ``ds[k]`` is sample k of the run (any k >= 0).

    Each item: ``video`` (3, T, H, W) float in [-1, 1], ``caption`` str, ``fs`` int (the frame
    stride, or the clip's frame rate fps/stride when ``fs_meaning == "fps"``), ``stride``,
    ``index`` (k) and ``path``.
    """

    def __init__(self, records: list[VideoRecord], *, frames: int, height: int, width: int,
                 max_stride: int = 6, fs_meaning: str = "frame_stride", fps_max: Optional[int] = None,
                 seed: int = 0, source: str = "dataset"):
        if fs_meaning not in ("frame_stride", "fps"):
            raise ValueError(f"fs_meaning must be 'frame_stride' or 'fps', got {fs_meaning!r}")
        if frames < 1 or max_stride < 1:
            raise ValueError("frames and max_stride must be >= 1")
        if not records:
            raise DatasetError(f"{source}: the dataset is empty (no rows); add videos and captions to the CSV")
        present = [r for r in records if os.path.isfile(r.path)]
        if len(present) < len(records):
            missing = [r.path for r in records if not os.path.isfile(r.path)]
            log.warning("%s: %d of %d listed videos do not exist and are skipped (first: %s)",
                        source, len(missing), len(records), missing[0])
        if not present:
            raise DatasetError(f"{source}: none of the {len(records)} videos listed exists "
                               f"(first expected at {records[0].path}); check video_dir and the CSV paths")
        self.records = present
        self.frames, self.height, self.width = frames, height, width
        self.max_stride, self.fs_meaning, self.fps_max = max_stride, fs_meaning, fps_max
        self.seed = seed
        self.source = source
        self.bad: set[str] = set()
        self._probe: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self.records)

    @lru_cache(maxsize=4)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.records))

    def record_order(self, k: int) -> Iterator[int]:
        """Record indices to try for sample k: its own, then the next ones of its epoch's order."""
        n = len(self.records)
        perm = self._permutation(k // n)
        pos = k % n
        for j in range(n):
            yield int(perm[(pos + j) % n])

    def load_clip(self, rec: VideoRecord, rng: np.random.Generator) -> dict:
        if rec.path not in self._probe:
            self._probe[rec.path] = probe_video(rec.path)
        n_frames, fps = self._probe[rec.path]
        start, stride = choose_clip(n_frames, self.frames, self.max_stride, rng)
        idx = [start + i * stride for i in range(self.frames)]
        raw = decode_frames(rec.path, idx)
        x = torch.from_numpy(raw).permute(0, 3, 1, 2).float()
        x = cover_crop(x, self.height, self.width) / 127.5 - 1.0
        if self.fs_meaning == "frame_stride":
            fs = stride
        else:
            fs = max(1, int(fps // stride))
            if self.fps_max is not None:
                fs = min(fs, self.fps_max)
        return {"video": x.permute(1, 0, 2, 3).contiguous(), "caption": rec.caption, "fs": fs,
                "stride": stride, "path": rec.path}

    def __getitem__(self, k: int) -> dict:
        rng = np.random.default_rng([self.seed, int(k), 0xC11B])
        for r in self.record_order(int(k)):
            rec = self.records[r]
            if rec.path in self.bad:
                continue
            try:
                item = self.load_clip(rec, rng)
            except Exception as err:  # noqa: BLE001 -- any decode failure means: skip this file
                self.bad.add(rec.path)
                log.warning("%s: skipping unreadable video %s: %s: %s", self.source, rec.path,
                            type(err).__name__, err)
                continue
            item["index"] = int(k)
            return item
        raise DatasetError(f"{self.source}: none of the {len(self.records)} videos could be read "
                           f"(need at least {self.frames} decodable frames each); see the warnings above")


class StreamSampler(torch.utils.data.Sampler):
    """Yields the stream indices this rank consumes, from optimizer step `start_step` on.

    Optimizer step s uses samples [s*G, (s+1)*G) with G = micro_batch * world * accum;
    micro-step a of rank r takes [s*G + (a*world + r)*B, ... + B). Infinite.
    """

    def __init__(self, micro_batch: int, accum: int, rank: int = 0, world: int = 1, start_step: int = 0):
        self.b, self.accum, self.rank, self.world, self.start = micro_batch, accum, rank, world, start_step

    @property
    def global_batch(self) -> int:
        return self.b * self.world * self.accum

    def __iter__(self):
        s = self.start
        while True:
            base = s * self.global_batch
            for a in range(self.accum):
                first = base + (a * self.world + self.rank) * self.b
                yield from range(first, first + self.b)
            s += 1

    def __len__(self):  # pragma: no cover - infinite stream; DataLoader only needs it for len()
        raise TypeError("StreamSampler is infinite")


def collate(items: list[dict]) -> dict:
    return {
        "video": torch.stack([it["video"] for it in items]),
        "caption": [it["caption"] for it in items],
        "fs": torch.tensor([it["fs"] for it in items], dtype=torch.long),
        "stride": torch.tensor([it["stride"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "path": [it["path"] for it in items],
    }


def make_dataset(csv_path: str, video_dir: Optional[str] = None, **kw) -> VideoDataset:
    return VideoDataset(read_annotations(csv_path, video_dir), source=csv_path, **kw)
