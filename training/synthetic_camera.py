"""Synthetic camera-control clips: a small 3D room seen from a moving camera with known poses.

Every clip ray-casts (numpy, one ray per pixel, 2x2 supersampled) a scene of a checkered floor, a
striped back wall and a few coloured boxes standing on the floor, from a camera that pans, zooms or
orbits (`dynamicrafter.camera.simple_trajectory`, OpenCV axes: x right, y down, z forward). Next to each
mp4 it writes the camera's pose file in the RealEstate10K layout the trainer reads (`training.data`):
a first line with the clip's name as a URL, then per frame `timestamp fx fy cx cy 0 0` (intrinsics as
fractions of the frame width and height) and the 3x4 world-to-camera matrix, row-major. The CSV has
the columns ``video,caption,poses``.

    python -m training.synthetic_camera --out data/rooms --n 64 --size 64 --frames 16
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from dynamicrafter.camera import simple_trajectory
from training.synthetic import COLORS, write_rows, write_video

MOVES = {   # name -> simple_trajectory arguments (units: the scene's, the first camera 4 units from the boxes)
    "pans left": dict(pan=(-1.0, 0.0)), "pans right": dict(pan=(1.0, 0.0)),
    "moves up": dict(pan=(0.0, -0.6)), "moves down": dict(pan=(0.0, 0.4)),
    "zooms in": dict(zoom=1.5), "zooms out": dict(zoom=-1.5),
    "orbits left": dict(orbit=25.0, radius=4.5), "orbits right": dict(orbit=-25.0, radius=4.5),
}
FLOOR_Y, WALL_Z = 1.0, 9.0      # the floor plane y = 1 (below the first camera), the back wall z = 9
FOCAL = 0.5                     # focal length as a fraction of the frame width: a 90 degree field of view


@dataclass
class RoomSpec:
    move: str
    seed: int

    @property
    def caption(self) -> str:
        return f"coloured boxes in a room, the camera {self.move}"


def make_boxes(rng: np.random.Generator, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(min corner, max corner, colour) of `count` boxes standing on the floor in front of the camera."""
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    boxes = []
    for _ in range(count):
        size = rng.uniform(0.8, 1.6, 3)
        centre = np.array([rng.uniform(-1.8, 1.8), FLOOR_Y - size[1] / 2, rng.uniform(3.0, 5.5)])
        boxes.append((centre - size / 2, centre + size / 2, palette[rng.integers(len(palette))]))
    return boxes


def camera_rays(c2w: np.ndarray, height: int, width: int, focal: float, supersample: int = 2):
    """World-space ray origins (3,) and unit directions (H*s, W*s, 3) through sub-pixel centres of a
    pinhole camera with `focal` pixels focal length and the principal point at the frame centre."""
    s = supersample
    f, cx, cy = focal, width / 2, height / 2
    u = (np.arange(width * s) + 0.5) / s
    v = (np.arange(height * s) + 0.5) / s
    x, y = np.meshgrid((u - cx) / f, (v - cy) / f)
    d = np.stack([x, y, np.ones_like(x)], axis=-1) @ c2w[:3, :3].T
    return c2w[:3, 3], d / np.linalg.norm(d, axis=-1, keepdims=True)


def hit_box(o, d, lo, hi):
    """Ray-box (slab) intersection: distance (inf when missed) and the axis of the face hit."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_in, t_out = near.max(axis=-1), far.min(axis=-1)
    t = np.where((t_in <= t_out) & (t_in > 1e-4), t_in, np.inf)
    return t, near.argmax(axis=-1)


def hit_plane(o, d, axis: int, value: float):
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (value - o[axis]) / d[..., axis]
    return np.where(t > 1e-4, t, np.inf)


def render_view(c2w: np.ndarray, scene, height: int, width: int, focal: Optional[float] = None) -> np.ndarray:
    """uint8 (H, W, 3) picture of the room `scene` = (boxes, wall colour) from camera-to-world pose `c2w`
    (z-buffered: nearest hit); `focal` in pixels, default FOCAL * width."""
    boxes, wall = scene
    o, d = camera_rays(c2w, height, width, FOCAL * width if focal is None else focal)
    t_floor, t_wall = hit_plane(o, d, 1, FLOOR_Y), hit_plane(o, d, 2, WALL_Z)
    depth = np.minimum(t_floor, t_wall)
    p = o + d * depth[..., None]
    checker = ((np.floor(p[..., 0] * 1.5) + np.floor(p[..., 2] * 1.5)) % 2)[..., None]
    floor = np.array([200.0, 190.0, 170.0]) * (0.55 + 0.45 * checker)
    stripes = (0.6 + 0.4 * np.sin(p[..., 0] * 1.5)[..., None]) * (0.8 + 0.2 * np.cos(p[..., 1] * 2.0)[..., None])
    rgb = np.where((t_floor <= t_wall)[..., None], floor, wall * stripes)
    shade = np.array([0.75, 1.0, 0.9])      # faces facing x, y (top), z
    for lo, hi, colour in boxes:
        t, face = hit_box(o, d, lo, hi)
        nearer = t < depth
        q = o + d * np.where(nearer, t, 0.0)[..., None]
        grain = 0.85 + 0.15 * np.sign(np.sin(q.sum(axis=-1) * 8.0))
        rgb = np.where(nearer[..., None], colour * shade[face][..., None] * grain[..., None], rgb)
        depth = np.where(nearer, t, depth)
    rgb = np.where(np.isinf(depth)[..., None], np.array([150.0, 190.0, 230.0]), rgb)   # sky where nothing is hit
    s = rgb.shape[0] // height
    rgb = rgb.reshape(height, s, width, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def make_scene(spec: RoomSpec):
    """(boxes, wall colour) of a clip's room."""
    rng = np.random.default_rng(spec.seed)
    boxes = make_boxes(rng, int(rng.integers(3, 6)))
    return boxes, rng.uniform(90, 200, 3)


def render_clip(spec: RoomSpec, height: int, width: int, frames: int):
    """(uint8 (T, H, W, 3) frames, (T, 4, 4) float64 world-to-camera poses) of one clip."""
    scene = make_scene(spec)
    w2c = simple_trajectory(frames, **MOVES[spec.move]).numpy()
    video = np.stack([render_view(np.linalg.inv(m), scene, height, width) for m in w2c])
    return video, w2c


def pose_file_text(name: str, w2c: np.ndarray, height: int, width: int, fps: int) -> str:
    """RealEstate10K layout: a URL line, then `timestamp fx fy cx cy 0 0 <3x4 world-to-camera>` per frame."""
    fx, fy = FOCAL, FOCAL * width / height         # the same focal length in pixels on both axes
    lines = [f"https://synthetic.local/{name}"]
    for k, m in enumerate(w2c):
        numbers = " ".join(f"{v:.9g}" for v in m[:3].reshape(-1))
        lines.append(f"{round(k * 1e6 / fps)} {fx:.9g} {fy:.9g} 0.5 0.5 0 0 {numbers}")
    return "\n".join(lines) + "\n"


def generate_dataset(out_dir: str, n: int, *, height: int = 64, width: int = 64, frames: int = 16,
                     fps: int = 8, seed: int = 0) -> str:
    """Write n clips (``videos/room_XXXXX.mp4`` + ``poses/room_XXXXX.txt``) and ``captions.csv``
    (video,caption,poses; paths relative to it) under out_dir; returns the CSV path. The moves cycle
    through MOVES so that small sets hold every one."""
    if frames < 2:
        raise ValueError(f"a camera clip needs at least 2 frames, got {frames}")
    rng = np.random.default_rng(seed)
    moves = list(MOVES)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "poses"), exist_ok=True)
    rows = []
    for i in range(n):
        spec = RoomSpec(moves[i % len(moves)], int(rng.integers(2**31 - 1)))
        video, w2c = render_clip(spec, height, width, frames)
        name = f"room_{i:05d}"
        write_video(video, os.path.join(out_dir, "videos", name + ".mp4"), fps=fps)
        with open(os.path.join(out_dir, "poses", name + ".txt"), "w") as fh:
            fh.write(pose_file_text(name, w2c, height, width, fps))
        rows.append({"video": f"videos/{name}.mp4", "caption": spec.caption, "poses": f"poses/{name}.txt",
                     "move": spec.move, "seed": spec.seed})
    return write_rows(os.path.join(out_dir, "captions.csv"), rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=64, help="number of clips")
    p.add_argument("--size", type=int, nargs="+", default=[64], help="H [W] in pixels (even)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(generate_dataset(a.out, a.n, height=a.size[0], width=a.size[-1], frames=a.frames, fps=a.fps,
                           seed=a.seed))


if __name__ == "__main__":
    main()
