"""Tiny synthetic video dataset: coloured shapes moving over textured backgrounds.

Every clip shows one shape (circle, square or triangle) of one colour travelling in a
straight line (left, right, up or down) over a static textured background (stripes,
checkerboard, smooth noise or a gradient). The caption names the motion, e.g.
"a red circle moves to the left". The shape starts on the side it moves away from, anywhere
across the motion ("side" origin), so a first frame mostly gives its motion away. A "corner"
origin also puts it near an end across the motion, where a clip along the other axis could
start too, so that only the caption tells the axis (``--corner-share``). Clips are written as
H.264 mp4 files with PyAV, plus a CSV (``video,caption`` or the WebVid layout
``videoid,name,page_dir``) that ``training.data.VideoDataset`` reads directly. Extra CSV columns
record the ground truth (shape, colour, direction, origin, centroid at the first and last frame)
so that evaluations can check the motion of generated clips.

    python -m training.synthetic --out data/shapes --n 200 --size 64 --frames 16
"""
from __future__ import annotations

import argparse
import csv
import os
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (225, 35, 35),
    "green": (35, 200, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "white": (250, 250, 250),
    "purple": (160, 50, 210),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
BACKGROUNDS = ("stripes", "checker", "noise", "gradient")


@dataclass
class ClipSpec:
    shape: str
    color: str
    direction: str
    background: str
    seed: int
    origin: str = "side"    # where it starts: "side" or "corner" (see the module docstring)

    @property
    def caption(self) -> str:
        if self.direction in ("left", "right"):
            motion = f"moves to the {self.direction}"
        else:
            motion = f"moves {self.direction}"
        return f"a {self.color} {self.shape} {motion}"


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    # Backgrounds stay in a mid-luminance, low-saturation range so the shapes stand out.
    base = rng.uniform(60, 170)
    return np.clip(base + rng.uniform(-35, 35, size=3), 0, 255)


def render_background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float array in [0, 255].

    Textures are low-frequency on purpose (soft stripes and checks of period >= 24 px at 64x64):
    a KL-f8 VAE with 4 latent channels sees an 8x8 pixel patch per latent, and finer textures
    would be lost in it, so the demo model would spend its capacity on texture instead of motion.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    c0, c1 = _muted_colour(rng), _muted_colour(rng)
    unit = max(height, width) / 64
    if kind == "stripes":       # soft sinusoidal stripes at a random angle
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(24, 40) * unit
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) / period + rng.uniform(0, 1)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * phase)
    elif kind == "checker":     # soft checks: the sign of sin(x) sin(y), smoothed by tanh
        cell = rng.uniform(14, 22) * unit
        ox, oy = rng.uniform(0, 2 * cell, size=2)
        t = 0.5 + 0.5 * np.tanh(3 * np.sin(np.pi * (xx + ox) / cell) * np.sin(np.pi * (yy + oy) / cell))
    elif kind == "noise":       # value noise on a 5x5 grid, bilinearly interpolated
        grid = rng.uniform(0, 1, size=(5, 5))
        gy = yy / max(height - 1, 1) * 4
        gx = xx / max(width - 1, 1) * 4
        y0, x0 = np.floor(gy).clip(0, 3).astype(int), np.floor(gx).clip(0, 3).astype(int)
        fy, fx = gy - y0, gx - x0
        t = (grid[y0, x0] * (1 - fy) * (1 - fx) + grid[y0 + 1, x0] * fy * (1 - fx)
             + grid[y0, x0 + 1] * (1 - fy) * fx + grid[y0 + 1, x0 + 1] * fy * fx)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(angle) + yy * np.sin(angle)
        t = (proj - proj.min()) / max(proj.max() - proj.min(), 1e-6)
    else:
        raise ValueError(f"unknown background {kind!r}; choose one of {BACKGROUNDS}")
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    # a little per-pixel grain so the texture is not perfectly flat
    img = img + rng.normal(0, 2, size=img.shape)
    return np.clip(img, 0, 255)


def shape_coverage(shape: str, height: int, width: int, cx: float, cy: float, r: float,
                   supersample: int = 4) -> np.ndarray:
    """Anti-aliased (H, W) coverage in [0, 1] of a shape centred at (cx, cy) in pixel units."""
    offs = (np.arange(supersample) + 0.5) / supersample
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    acc = np.zeros((height, width))
    for oy in offs:
        for ox in offs:
            dx = xx + ox - cx
            dy = yy + oy - cy
            if shape == "circle":
                inside = dx * dx + dy * dy <= r * r
            elif shape == "square":
                s = r * 0.85
                inside = (np.abs(dx) <= s) & (np.abs(dy) <= s)
            elif shape == "triangle":
                # apex up; base at cy + r, apex at cy - r
                frac = (dy + r) / (2 * r)
                inside = (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
            else:
                raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
            acc += inside
    return acc / (supersample * supersample)


def render_clip(spec: ClipSpec, height: int, width: int, frames: int):
    """Returns (uint8 frames (T, H, W, 3), centroid track (T, 2) as (x, y) pixels)."""
    rng = np.random.default_rng(spec.seed)
    bg = render_background(spec.background, height, width, rng)
    r = rng.uniform(0.14, 0.2) * min(height, width)
    dx, dy = DIRECTIONS[spec.direction]
    # travel between 40% and 60% of the frame along the motion axis, staying inside it
    extent = width if dx != 0 else height
    travel = rng.uniform(0.4, 0.6) * extent
    margin = r + 1
    lo_x, hi_x = margin, width - margin
    lo_y, hi_y = margin, height - margin
    travel = min(travel, (hi_x - lo_x) if dx != 0 else (hi_y - lo_y))    # small frames: what fits
    if dx != 0:
        slack = max(hi_x - lo_x - travel, 0.0)
        start_x = lo_x + rng.uniform(0, slack) if dx > 0 else hi_x - rng.uniform(0, slack)
        start_y = rng.uniform(lo_y, hi_y)
    else:
        slack = max(hi_y - lo_y - travel, 0.0)
        start_y = lo_y + rng.uniform(0, slack) if dy > 0 else hi_y - rng.uniform(0, slack)
        start_x = rng.uniform(lo_x, hi_x)
    if spec.origin == "corner":      # across the motion, start where a clip along that axis would
        across_lo, across_hi, across_extent = (lo_y, hi_y, height) if dx != 0 else (lo_x, hi_x, width)
        span = across_hi - across_lo
        across_slack = max(span - min(rng.uniform(0.4, 0.6) * across_extent, span), 0.0)
        offset = rng.uniform(0, across_slack)
        across = across_lo + offset if rng.random() < 0.5 else across_hi - offset
        start_x, start_y = (start_x, across) if dx != 0 else (across, start_y)
    elif spec.origin != "side":
        raise ValueError(f"unknown origin {spec.origin!r}; choose 'side' or 'corner'")
    colour = np.array(COLORS[spec.color], dtype=np.float64)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    track = np.empty((frames, 2))
    for f in range(frames):
        a = f / max(frames - 1, 1)
        cx = start_x + dx * travel * a
        cy = start_y + dy * travel * a
        cov = shape_coverage(spec.shape, height, width, cx, cy, r)[..., None]
        out[f] = np.clip(np.rint(bg * (1 - cov) + colour * cov), 0, 255).astype(np.uint8)
        track[f] = (cx, cy)
    return out, track


def write_video(frames: np.ndarray, path: str, fps: int = 8, crf: int = 12, keyframe_every: int = 0) -> None:
    """Write uint8 (T, H, W, 3) RGB frames as an H.264 mp4 (H and W must be even);
    `keyframe_every` > 0 sets the keyframe interval (GOP size)."""
    import av

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 with yuv420p needs even sizes, got {h}x{w}")
    tmp = path + ".part"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        if keyframe_every:
            stream.codec_context.gop_size = keyframe_every
        for f in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[f]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def make_specs(n: int, seed: int = 0, corner_share: float = 0.0) -> list[ClipSpec]:
    """n clip specifications cycling through every (shape, colour, direction) combination
    in a seeded random order, so small sets are still balanced across directions; a
    `corner_share` of them start in a corner (drawn from their own stream: the rest of the
    set is the same as with no corners)."""
    if not 0.0 <= corner_share <= 1.0:
        raise ValueError(f"corner_share must be in [0, 1], got {corner_share}")
    rng = np.random.default_rng(seed)
    corner = np.random.default_rng([seed, 1]).random(n) < corner_share
    combos = [(s, c, d) for d in DIRECTIONS for s in SHAPES for c in COLORS]
    specs = []
    order: list[int] = []
    while len(specs) < n:
        if not order:
            order = list(rng.permutation(len(combos)))
        s, c, d = combos[order.pop()]
        bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        origin = "corner" if corner[len(specs)] else "side"
        specs.append(ClipSpec(s, c, d, bg, int(rng.integers(2**31 - 1)), origin))
    return specs


def generate_dataset(out_dir: str, n: int, *, height: int = 64, width: int = 64, frames: int = 16,
                     fps: int = 8, seed: int = 0, layout: str = "plain", corner_share: float = 0.0) -> str:
    """Write n clips under out_dir and a CSV describing them; returns the CSV path.

    layout "plain": ``out_dir/videos/clip_00000.mp4`` and ``out_dir/captions.csv`` with
    columns video,caption (+ ground truth; video paths relative to the CSV's folder).
    layout "webvid": ``out_dir/<page_dir>/<videoid>.mp4`` and ``out_dir/results.csv`` with
    columns videoid,name,page_dir (+ ground truth), as the WebVid-10M download tools lay it out.
    """
    if layout not in ("plain", "webvid"):
        raise ValueError(f"layout must be 'plain' or 'webvid', got {layout!r}")
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i, spec in enumerate(make_specs(n, seed, corner_share)):
        clip, track = render_clip(spec, height, width, frames)
        if layout == "plain":
            rel = f"videos/clip_{i:05d}.mp4"
            path = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            row = {"video": rel, "caption": spec.caption}
        else:
            page_dir = f"page_{i // 100:03d}"
            os.makedirs(os.path.join(out_dir, page_dir), exist_ok=True)
            videoid = str(1000000 + i)
            path = os.path.join(out_dir, page_dir, videoid + ".mp4")
            row = {"videoid": videoid, "name": spec.caption, "page_dir": page_dir}
        write_video(clip, path, fps=fps)
        row.update(shape=spec.shape, color=spec.color, direction=spec.direction,
                   background=spec.background, origin=spec.origin,
                   x_first=f"{track[0, 0]:.2f}", y_first=f"{track[0, 1]:.2f}",
                   x_last=f"{track[-1, 0]:.2f}", y_last=f"{track[-1, 1]:.2f}")
        rows.append(row)
    return write_rows(os.path.join(out_dir, "captions.csv" if layout == "plain" else "results.csv"), rows)


def write_rows(csv_path: str, rows: list[dict]) -> str:
    """A dataset's CSV: a header of the first row's keys, then one line per row; returns the path."""
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=100, help="number of clips")
    p.add_argument("--size", type=int, nargs="+", default=[64], help="H [W] in pixels (even)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["plain", "webvid"], default="plain")
    p.add_argument("--corner-share", type=float, default=0.0,
                   help="fraction of clips that start in a corner, where only the caption tells the axis")
    a = p.parse_args(argv)
    h, w = (a.size[0], a.size[-1])
    path = generate_dataset(a.out, a.n, height=h, width=w, frames=a.frames, fps=a.fps, seed=a.seed,
                            layout=a.layout, corner_share=a.corner_share)
    print(path)


if __name__ == "__main__":
    main()
