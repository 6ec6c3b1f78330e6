"""Latent and text-embedding cache (``data.cache_dir``): encode the frozen parts once.

The VAE, the CLIP image tower and the text encoder are frozen in every stage, and the VAE
encodes frame by frame, so what they compute for a frame does not depend on which clip the
frame lands in. The cache therefore holds, per video, the VAE posterior moments (mean |
logvar) and the CLIP image tokens of *every* frame after the resize and centre crop, and
per caption its text embedding. Training then draws its clips (stride, start, conditioning
frame) exactly as from the videos and samples the posterior with the same per-sample noise:
the same run, without decoding or encoding anything.

Layout: ``<cache_dir>/<config key>/videos/<video key>.pt`` and ``texts/<caption key>.pt``,
the config key covering the size and the encoders' weights, the video key the file's path,
size and modification time (an edited video is encoded again). Files are written atomically;
an interrupted build resumes where it stopped. Each process encodes its share of the videos.

Cost: 8 x h x w floats of moments and 257 x 1280 CLIP tokens per frame (stored in the
encoders' dtype); CLIP tokens dominate (about 1.3 MB per frame in fp32, 0.66 MB in bf16).
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

import numpy as np
import torch

from training import checkpoint as ck
from dynamicrafter.pipeline import cover_crop
from training.data import VideoDataset, VideoRecord, decode_frames, probe_video

log = logging.getLogger("training.cache")
CHUNK = 16          # frames decoded and encoded at a time


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


def model_key(dc, height: int, width: int) -> str:
    """Changes when the size or any frozen encoder weight changes."""
    h = hashlib.sha1(f"v1|{height}x{width}".encode())
    for part in (dc.first_stage_model, dc.embedder, dc.cond_stage_model):
        for name, t in sorted(part.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().flatten()[:1024].float().cpu().numpy().tobytes())   # a fingerprint
            h.update(str((tuple(t.shape), float(t.float().sum()))).encode())
    return h.hexdigest()[:16]


def video_key(path: str) -> str:
    st = os.stat(path)
    return _sha(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}")


class Cache:
    def __init__(self, root: str, dc, height: int, width: int):
        self.dir = os.path.join(root, model_key(dc, height, width))
        self.height, self.width = height, width

    def video_path(self, path: str) -> str:
        return os.path.join(self.dir, "videos", video_key(path) + ".pt")

    def text_path(self, caption: str) -> str:
        return os.path.join(self.dir, "texts", _sha(caption) + ".pt")

    @property
    def blank_path(self) -> str:
        return os.path.join(self.dir, "blank.pt")

    # ------------------------------------------------------------------ build
    @torch.no_grad()
    def build(self, dc, records: list[VideoRecord], rank: int = 0, world: int = 1) -> int:
        """Encode what is missing: videos rank::world on this process, captions and the blank
        (empty text, all-zero image) on rank 0. Returns the number of videos encoded here."""
        done = 0
        for i, rec in enumerate(records):
            if i % world != rank or os.path.exists(self.video_path(rec.path)):
                continue
            try:
                entry = self._encode_video(dc, rec.path)
            except Exception as err:  # noqa: BLE001 - the dataset skips it as it would skip the video
                log.warning("cache: cannot encode %s (%s: %s); it will be skipped", rec.path, type(err).__name__, err)
                continue
            ck.atomic_save(entry, self.video_path(rec.path))
            done += 1
        if rank == 0:
            for caption in sorted({r.caption for r in records} | {""}):
                if not os.path.exists(self.text_path(caption)):
                    ck.atomic_save({"text": dc.encode_text([caption])[0].cpu()}, self.text_path(caption))
            if not os.path.exists(self.blank_path):
                zeros = torch.zeros(1, 3, self.height, self.width)
                ck.atomic_save({"clip": dc.encode_clip_image(zeros)[0].cpu()}, self.blank_path)
        return done

    def _encode_video(self, dc, path: str) -> dict:
        n, fps = probe_video(path)
        moments, clip = [], []
        for start in range(0, n, CHUNK):
            idx = list(range(start, min(n, start + CHUNK)))
            x = torch.from_numpy(decode_frames(path, idx)).permute(0, 3, 1, 2).float()
            x = cover_crop(x, self.height, self.width) / 127.5 - 1.0
            moments.append(dc.vae_moments(x).cpu())                  # one frame at a time, as training
            clip.append(torch.cat([dc.encode_clip_image(f[None]) for f in x]).cpu())
        return {"moments": torch.cat(moments), "clip": torch.cat(clip), "n_frames": n, "fps": fps}


class CachedDataset(VideoDataset):
    """VideoDataset whose items hold cached encodings instead of pixels: ``moments`` (T, 8, h, w),
    ``clip`` (T, 257, D), ``text`` (77, C) and the blank ``text_empty`` / ``clip_zero``; clip
    choice, skipping and the stream order are those of the video dataset."""

    def __init__(self, records, cache: Cache, **kw):
        super().__init__(records, checked=True, **kw)
        self.cache = cache
        self._blank: Optional[dict] = None

    def load_clip(self, rec: VideoRecord, rng: np.random.Generator) -> dict:
        path = self.cache.video_path(rec.path)
        if not os.path.exists(path):
            raise ValueError("not in the cache (it could not be encoded)")
        entry = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        idx, stride = self.clip_indices(rec, int(entry["n_frames"]), float(entry["fps"]), rng)
        if self._blank is None:
            self._blank = {"text_empty": torch.load(self.cache.text_path(""), weights_only=True)["text"],
                           "clip_zero": torch.load(self.cache.blank_path, weights_only=True)["clip"]}
        text = torch.load(self.cache.text_path(rec.caption), weights_only=True)["text"]
        return {"moments": entry["moments"][idx].clone(), "clip": entry["clip"][idx].clone(), "text": text,
                **self._blank, "caption": rec.caption, "fs": self.fs_of(float(entry["fps"]), stride),
                "stride": stride, "path": rec.path}
