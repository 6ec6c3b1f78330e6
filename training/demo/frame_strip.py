"""Frame strip of a video, for the README: every frame side by side (in rows of --per-row),
upscaled (nearest).

    python training/demo/frame_strip.py outputs/demo.mp4 assets/demo/demo_strip.png --scale 2 --per-row 8
"""
import argparse

import av
import numpy as np
from PIL import Image


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video")
    p.add_argument("out")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--gap", type=int, default=2, help="white pixels between frames")
    p.add_argument("--per-row", type=int, default=0, help="frames per row (0: one row)")
    a = p.parse_args(argv)
    with av.open(a.video) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    h, w, _ = frames[0].shape
    s, gap = a.scale, a.gap
    cols = a.per_row or len(frames)
    rows = -(-len(frames) // cols)
    strip = np.full((rows * (h * s + gap) - gap, cols * (w * s + gap) - gap, 3), 255, dtype=np.uint8)
    for i, f in enumerate(frames):
        x, y = (i % cols) * (w * s + gap), (i // cols) * (h * s + gap)
        strip[y:y + h * s, x:x + w * s] = f.repeat(s, axis=0).repeat(s, axis=1)
    Image.fromarray(strip).save(a.out)
    print(a.out)


if __name__ == "__main__":
    main()
