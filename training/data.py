"""Video + caption data for the trainer.

A dataset is a folder of videos and a CSV. Two CSV layouts are read:
  * WebVid: ``videoid,name,page_dir`` -> ``<video_dir>/<page_dir>/<videoid>.mp4``, caption ``name``
  * plain:  ``video,caption`` (or path/file for the video, text/prompt for the caption)
            -> ``<video_dir>/<video>`` (absolute paths are kept)
Optional ``start``/``end`` (or ``start_time``/``end_time``) columns, in seconds, trim each
video. An optional ``poses`` column names each clip's camera pose file (RealEstate10K layout, one
row per video frame; relative to ``video_dir``) for camera-control training: items then carry the
clip's world-to-camera ``RT`` and pixel intrinsics ``K``. ``video_dir`` defaults to the CSV's folder.
Extra columns are ignored.

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
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

import numpy as np
import torch

from dynamicrafter import camera as geometry
from dynamicrafter.pipeline import cover_crop, cover_crop_box

log = logging.getLogger("training.data")


class DatasetError(ValueError):
    """The dataset cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class VideoRecord:
    path: str
    caption: str
    start: Optional[float] = None       # seconds: clips are drawn from [start, end) of the video
    end: Optional[float] = None
    poses: Optional[str] = None         # camera pose file (RealEstate10K rows, one per video frame)


PATH_COLUMNS = ("video", "path", "file")
CAPTION_COLUMNS = ("caption", "text", "prompt")
START_COLUMNS = ("start", "start_time")
END_COLUMNS = ("end", "end_time")
POSE_COLUMNS = ("poses", "pose_file", "camera")


def _pick(header: dict, names: tuple) -> Optional[str]:
    return next((header[n] for n in names if n in header), None)


def _seconds(value: str, column: str, line: int, csv_path: str) -> Optional[float]:
    if value is None or not value.strip():
        return None
    try:
        t = float(value)
    except ValueError:
        raise DatasetError(f"{csv_path} line {line}: {column}={value!r} is not a time in seconds") from None
    if t < 0:
        raise DatasetError(f"{csv_path} line {line}: {column}={value!r} is negative")
    return t


def read_annotations(csv_path: str, video_dir: Optional[str] = None) -> list[VideoRecord]:
    """Rows of a WebVid-layout or plain CSV as (absolute video path, caption[, start, end])."""
    if not os.path.isfile(csv_path):
        raise DatasetError(f"caption CSV not found: {csv_path}")
    video_dir = video_dir or os.path.dirname(os.path.abspath(csv_path))
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = {(n or "").strip().lower(): n for n in reader.fieldnames or []}   # normalised -> as written
        path_col, cap_col = _pick(header, PATH_COLUMNS), _pick(header, CAPTION_COLUMNS)
        start_col, end_col = _pick(header, START_COLUMNS), _pick(header, END_COLUMNS)
        pose_col = _pick(header, POSE_COLUMNS)
        if {"videoid", "name", "page_dir"} <= set(header):
            vid, name, page = header["videoid"], header["name"], header["page_dir"]

            def locate(row):
                return os.path.join(video_dir, row[page], f"{row[vid]}.mp4"), row[name]
        elif path_col and cap_col:
            def locate(row):
                return os.path.join(video_dir, row[path_col]), row[cap_col]
        else:
            raise DatasetError(
                f"{csv_path}: unrecognised CSV header {sorted(header)}; expected a video column "
                f"({'/'.join(PATH_COLUMNS)}) and a caption column ({'/'.join(CAPTION_COLUMNS)}), "
                "or the WebVid columns 'videoid,name,page_dir'")
        records = []
        for line, row in enumerate(reader, start=2):
            path, caption = locate(row)
            start = _seconds(row.get(start_col), start_col, line, csv_path) if start_col else None
            end = _seconds(row.get(end_col), end_col, line, csv_path) if end_col else None
            if start is not None and end is not None and end <= start:
                raise DatasetError(f"{csv_path} line {line}: {end_col}={end} is not after {start_col}={start}")
            poses = os.path.join(video_dir, row[pose_col]) if pose_col and (row.get(pose_col) or "").strip() else None
            records.append(VideoRecord(path, caption or "", start, end, poses))
    return records


def empty_captions(records: list[VideoRecord]) -> int:
    return sum(not r.caption.strip() for r in records)


def check_records(records: list[VideoRecord], source: str) -> list[VideoRecord]:
    """The records whose video exists (one stat per row), with a warning for missing files and
    empty captions; a DatasetError when nothing is left. Run once, on rank 0 (see shared_records)."""
    if not records:
        raise DatasetError(f"{source}: the dataset is empty (no rows); add videos and captions to the CSV")
    def exists(r):
        return os.path.isfile(r.path) and (r.poses is None or os.path.isfile(r.poses))

    present = [r for r in records if exists(r)]
    if len(present) < len(records):
        missing = [r.path if not os.path.isfile(r.path) else r.poses for r in records if not exists(r)]
        log.warning("%s: %d of %d listed videos (or their pose files) do not exist and are skipped (first: %s)",
                    source, len(missing), len(records), missing[0])
    if not present:
        raise DatasetError(f"{source}: none of the {len(records)} videos listed exists "
                           f"(first expected at {records[0].path}); check video_dir and the CSV paths")
    empty = empty_captions(present)
    if empty:
        log.warning("%s: %d of %d rows have an empty caption; they train as text-dropped (unconditional) "
                    "samples, on top of data.uncond_prob. Fill them in or remove those rows.",
                    source, empty, len(present))
    return present


def shared_records(csv_path: str, video_dir: Optional[str], rank: int = 0, broadcast=None) -> list[VideoRecord]:
    """Read and check the CSV on rank 0 only and hand the result to every process.
    `broadcast(obj)` returns rank 0's obj on every rank (None: a single process)."""
    payload = None
    if rank == 0:
        try:
            payload = ("ok", check_records(read_annotations(csv_path, video_dir), csv_path))
        except DatasetError as err:
            payload = ("error", str(err))
    if broadcast is not None:
        payload = broadcast(payload)
    kind, value = payload
    if kind == "error":
        raise DatasetError(value)
    return value


def probe_video(path: str) -> tuple[int, float]:
    """(number of frames, frames per second) of the first video stream."""
    from dynamicrafter.video import count_frames, open_video

    with open_video(path) as (container, stream):
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        n = stream.frames or count_frames(container, stream, os.path.basename(path))
    return int(n), fps


def decode_frames(path: str, indices: list[int], stats: Optional[dict] = None) -> np.ndarray:
    """uint8 (len(indices), H, W, 3) RGB frames at the given (possibly repeated) indices.

    Seeks to the keyframe before the first wanted frame and decodes from there, so the cost
    depends on the clip's length and the keyframe interval, not on where the clip starts.
    Frame numbers come from the timestamps (constant frame rate); a stream without
    timestamps, or a seek that lands after the wanted frame, falls back to decoding from the
    start and counting. `stats["decoded"]` receives the number of frames decoded."""
    from dynamicrafter.video import checked_frames, open_video

    wanted = sorted(set(indices))
    name = os.path.basename(path)
    with open_video(path) as (container, stream):
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        tb = stream.time_base
        t0 = stream.start_time or 0
        got, decoded = None, 0
        if wanted[0] > 0 and tb is not None:
            container.seek(t0 + int(wanted[0] / fps / tb), stream=stream, backward=True, any_frame=False)
            got, decoded = _collect(checked_frames(container.decode(stream), name), wanted,
                                    lambda i, f: None if f.pts is None else round((f.pts - t0) * tb * fps))
        if got is None:    # no usable timestamps, or the seek landed late: decode from the start, counting
            if decoded:
                container.seek(t0, stream=stream, backward=True, any_frame=False)
            got, counted = _collect(checked_frames(container.decode(stream), name), wanted, lambda i, f: i)
            decoded += counted
    if stats is not None:
        stats["decoded"] = decoded
    return _gather(got, wanted, indices)


def _collect(frames, wanted: list[int], number) -> tuple[Optional[dict], int]:
    """({frame number: RGB array} for the sorted `wanted` numbers, frames decoded). `number(i,
    frame)` says which frame the i-th decoded one is; None from it, or a first frame already past
    wanted[0], gives None instead of the dict (the caller decodes another way)."""
    got: dict[int, np.ndarray] = {}
    want = set(wanted)
    decoded = 0
    for i, frame in enumerate(frames):
        decoded += 1
        n = number(i, frame)
        if n is None or (decoded == 1 and n > wanted[0]):
            return None, decoded
        if n in want and n not in got:
            got[n] = frame.to_ndarray(format="rgb24")
        if n >= wanted[-1]:
            break
    return got, decoded


def _gather(got, wanted, indices):
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
                 seed: int = 0, source: str = "dataset", checked: bool = False):
        if fs_meaning not in ("frame_stride", "fps"):
            raise ValueError(f"fs_meaning must be 'frame_stride' or 'fps', got {fs_meaning!r}")
        if frames < 1 or max_stride < 1:
            raise ValueError("frames and max_stride must be >= 1")
        present = records if checked else check_records(records, source)
        self.records = present
        self.frames, self.height, self.width = frames, height, width
        self.max_stride, self.fs_meaning, self.fps_max = max_stride, fs_meaning, fps_max
        self.seed = seed
        self.source = source
        self.bad: set[str] = set()
        self._probe: dict[str, tuple[int, float]] = {}
        self._poses: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    # one dataset lives for the whole run; the last few epochs' orders are meant to be kept (bounded, maxsize=4)
    @lru_cache(maxsize=4)  # noqa: B019
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.records))

    def record_order(self, k: int) -> Iterator[int]:
        """Record indices to try for sample k: its own, then the next ones of its epoch's order."""
        n = len(self.records)
        perm = self._permutation(k // n)
        pos = k % n
        for j in range(n):
            yield int(perm[(pos + j) % n])

    def clip_indices(self, rec: VideoRecord, n_frames: int, fps: float, rng: np.random.Generator):
        """(frame indices, stride) of a random clip inside the record's [start, end) span."""
        lo = math.ceil(rec.start * fps - 1e-6) if rec.start is not None else 0
        hi = min(n_frames, math.floor(rec.end * fps + 1e-6)) if rec.end is not None else n_frames
        start, stride = choose_clip(hi - lo, self.frames, self.max_stride, rng)
        return [lo + start + i * stride for i in range(self.frames)], stride

    def fs_of(self, fps: float, stride: int) -> int:
        if self.fs_meaning == "frame_stride":
            return stride
        fs = max(1, int(fps // stride))
        return min(fs, self.fps_max) if self.fps_max is not None else fs

    def load_clip(self, rec: VideoRecord, rng: np.random.Generator) -> dict:
        if rec.path not in self._probe:
            self._probe[rec.path] = probe_video(rec.path)
        n_frames, fps = self._probe[rec.path]
        if rec.poses is not None:       # a clip needs a pose row for every frame
            n_frames = min(n_frames, self._pose_rows(rec).shape[0])
        idx, stride = self.clip_indices(rec, n_frames, fps, rng)
        raw = decode_frames(rec.path, idx)
        x = torch.from_numpy(raw).permute(0, 3, 1, 2).float()
        item = {"caption": rec.caption, "fs": self.fs_of(fps, stride), "stride": stride, "path": rec.path}
        if rec.poses is not None:
            item.update(self.camera_of(rec, idx, x.shape[-2:]))
        x = cover_crop(x, self.height, self.width) / 127.5 - 1.0
        return {"video": x.permute(1, 0, 2, 3).contiguous(), **item}

    def camera_of(self, rec: VideoRecord, idx: list[int], frame_hw) -> dict:
        """The clip's world-to-camera poses RT (T, 4, 4) and pixel intrinsics K (T, 3, 3) of its frames
        after the resize and centre crop (`cover_crop`), from the record's pose file."""
        rows = self._pose_rows(rec)
        if max(idx) >= rows.shape[0]:
            raise ValueError(f"pose file {rec.poses} has {rows.shape[0]} rows, the clip needs frame {max(idx)}: "
                             "write one pose row per video frame")
        rows = rows[idx]
        resized, top_left = cover_crop_box(int(frame_hw[0]), int(frame_hw[1]), self.height, self.width)
        return {"RT": geometry.w2c_from_rows(rows, rec.poses).float(),
                "K": geometry.pixel_intrinsics(rows[:, 1:5], resized, top_left)}

    def _pose_rows(self, rec: VideoRecord) -> torch.Tensor:
        if rec.poses not in self._poses:
            rows = geometry.read_pose_rows(rec.poses)
            n_frames = self._probe[rec.path][0]
            if rows.shape[0] != n_frames:
                log.warning("%s: %d pose rows for %d video frames; clips use the first %d frames",
                            rec.poses, rows.shape[0], n_frames, min(rows.shape[0], n_frames))
            self._poses[rec.poses] = rows
        return self._poses[rec.poses]

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
    """Tensors stacked (video, or the cached moments/clip/text), the rest as lists or long tensors."""
    out = {k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], torch.Tensor)}
    out.update({
        "caption": [it["caption"] for it in items],
        "fs": torch.tensor([it["fs"] for it in items], dtype=torch.long),
        "stride": torch.tensor([it["stride"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "path": [it["path"] for it in items],
    })
    return out


def make_dataset(csv_path: str, video_dir: Optional[str] = None, records: Optional[list] = None,
                 **kw) -> VideoDataset:
    """`records`: the rows already read and checked (shared_records); else read and check here."""
    if records is not None:
        return VideoDataset(records, source=csv_path, checked=True, **kw)
    return VideoDataset(read_annotations(csv_path, video_dir), source=csv_path, **kw)
