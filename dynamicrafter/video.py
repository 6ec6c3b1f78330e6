"""Reading images and writing videos (PyAV for mp4, Pillow for webp/gif)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) or (1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, truncating like the
    official saver: clamp, (x + 1) / 2 * 255, cast."""
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError("to_uint8 takes one video; index the batch first")
        video = video[0]
    x = ((video.detach().float().clamp(-1, 1) + 1.0) / 2.0 * 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def load_image(path) -> torch.Tensor:
    """An image file -> (1, 3, H, W) float in [-1, 1] (RGB; alpha dropped)."""
    from PIL import Image, UnidentifiedImageError

    from .contract import check_load_image
    path = check_load_image(path)
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"path must be an image file Pillow can read, got {str(path)!r} ({e})") from e
    if 0 in arr.shape:
        raise ValueError(f"path must be an image of at least 1x1 pixels, "
                         f"got {str(path)!r} ({arr.shape[1]}x{arr.shape[0]})")
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0 * 2.0 - 1.0


def save_video(frames, path, fps: float = 8, quality: int = 18) -> Path:
    """Write frames ((T, H, W, 3) uint8 array, or a [-1, 1] tensor (3, T, H, W)) as .mp4
    (H.264 via PyAV), .webp or .gif (animated, Pillow) or .png (a frame strip)."""
    if isinstance(frames, torch.Tensor):
        frames = to_uint8(frames)
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        import av
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=int(round(fps)))
            stream.width, stream.height = frames.shape[2] // 2 * 2, frames.shape[1] // 2 * 2
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(quality)}
            for f in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f[:stream.height, :stream.width], format="rgb24")))
            out.mux(stream.encode())
    elif suffix in (".webp", ".gif"):
        from PIL import Image
        ims = [Image.fromarray(f) for f in frames]
        kw = dict(lossless=False, quality=90) if suffix == ".webp" else dict(optimize=False)
        ims[0].save(path, save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0, **kw)
    elif suffix == ".png":
        from PIL import Image
        Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)
    else:
        raise ValueError(f"unsupported video format {suffix!r}: use .mp4, .webp, .gif or .png (frame strip)")
    return path


# Containers a video is read from: FFmpeg demuxer names (never concat/playlist/script demuxers,
# which open other files or URLs), local files only, and the declared size checked before decoding.
VIDEO_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi", "gif", "mpegts", "flv", "ogg")
MAX_VIDEO_SIDE = 4096          # pixels, each side (4K UHD fits)
MAX_VIDEO_FRAMES = 100_000
PROBE_SECONDS = 30.0           # counting the frames of a stream that declares none


class VideoError(ValueError):
    """A video file that is not read: not a supported container, or beyond the size limits."""


@contextmanager
def open_video(path):
    """(container, first video stream) of a local video file in one of VIDEO_FORMATS whose
    declared width, height and frame count are within the limits; VideoError otherwise."""
    import av
    name = Path(path).name
    opts = {"format_whitelist": ",".join(VIDEO_FORMATS), "protocol_whitelist": "file", "probesize": str(32 << 20),
            "analyzeduration": str(10_000_000)}
    try:
        container = av.open(str(path), options=opts)
    except av.FFmpegError as e:
        raise VideoError(f"{name}: not a video file in a supported container (mp4/mov, mkv/webm, avi, gif, "
                         f"mpeg-ts, flv, ogg) ({e})") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{name}: no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if not (0 < w <= MAX_VIDEO_SIDE and 0 < h <= MAX_VIDEO_SIDE):
            raise VideoError(f"{name}: declares {w}x{h} frames; videos up to {MAX_VIDEO_SIDE}x{MAX_VIDEO_SIDE} "
                             "are read (resize it first)")
        if (stream.frames or 0) > MAX_VIDEO_FRAMES:
            raise VideoError(f"{name}: declares {stream.frames} frames, more than {MAX_VIDEO_FRAMES}; cut it first")
        yield container, stream


def checked_frames(frames, name: str):
    """`frames` (decoded av.VideoFrames), refusing one beyond the size limits or past the frame cap."""
    for i, fr in enumerate(frames):
        if i >= MAX_VIDEO_FRAMES:
            raise VideoError(f"{name}: more than {MAX_VIDEO_FRAMES} frames; cut it first")
        if fr.width > MAX_VIDEO_SIDE or fr.height > MAX_VIDEO_SIDE:
            raise VideoError(f"{name}: frame {i} is {fr.width}x{fr.height}; videos up to "
                             f"{MAX_VIDEO_SIDE}x{MAX_VIDEO_SIDE} are read")
        yield fr


def count_frames(container, stream, name: str) -> int:
    """Frames of a stream that declares no count: its packets, within PROBE_SECONDS."""
    deadline, n = time.monotonic() + PROBE_SECONDS, 0
    for p in container.demux(stream):
        n += p.size > 0
        if n > MAX_VIDEO_FRAMES:
            raise VideoError(f"{name}: more than {MAX_VIDEO_FRAMES} frames; cut it first")
        if time.monotonic() > deadline:
            raise VideoError(f"{name}: counting its frames took over {PROBE_SECONDS:.0f} s; re-encode it")
    return n


def read_video(path) -> np.ndarray:
    """All frames of a video file as (T, H, W, 3) uint8 (see open_video for what is read)."""
    with open_video(path) as (container, stream):
        return np.stack([fr.to_ndarray(format="rgb24")
                         for fr in checked_frames(container.decode(stream), Path(path).name)])
