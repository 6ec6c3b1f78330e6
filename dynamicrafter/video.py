"""Reading images and writing videos (PyAV for mp4, Pillow for webp/gif)."""
from __future__ import annotations

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
        raise ValueError(f"path must be an image of at least 1x1 pixels, got {str(path)!r} ({arr.shape[1]}x{arr.shape[0]})")
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


def read_video(path) -> np.ndarray:
    """All frames of a video file as (T, H, W, 3) uint8."""
    import av
    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
