"""Write the Templates-browser thumbnail of every bundled workflow, workflows/<name>.jpg, from its
graph picture docs/images/<name>.png (scripts/screenshot_workflows.py).

    .venv/bin/python scripts/make_thumbnails.py

ComfyUI lists a custom node's workflows/*.json as templates and its frontend shows
/api/workflow_templates/<pack>/<name>.jpg as each one's thumbnail. The picture is cut to the
graph (the web UI's bars and menus left out), padded to 4:3 and scaled to THUMB_SIZE.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
THUMB_SIZE = (480, 360)
CANVAS = (75, 128, 1800, 900)     # the graph canvas in an 1800x1000 screenshot: no side bar, tabs, toolbars
MARGIN = 16


def thumbnail(picture: Image.Image) -> Image.Image:
    x0, y0, x1, y1 = CANVAS
    canvas = np.asarray(picture.convert("RGB"))[y0:y1, x0:x1].astype(np.int16)
    background = np.median(canvas.reshape(-1, 3), axis=0)
    ink = np.abs(canvas - background).max(axis=2) > 12
    xs, ys = np.nonzero(ink.sum(axis=0) >= 3)[0], np.nonzero(ink.sum(axis=1) >= 3)[0]   # thin strays left out
    if len(xs) == 0 or len(ys) == 0:
        raise ValueError("the picture shows no graph")
    left, top = max(0, xs.min() - MARGIN), max(0, ys.min() - MARGIN)
    right, bottom = min(canvas.shape[1], xs.max() + MARGIN), min(canvas.shape[0], ys.max() + MARGIN)
    graph = canvas[top:bottom, left:right].astype(np.uint8)
    h, w = graph.shape[:2]
    tw, th = THUMB_SIZE
    W, H = max(w, -(-h * tw // th)), max(h, -(-w * th // tw))        # the smallest 4:3 box around it
    out = Image.new("RGB", (W, H), tuple(int(c) for c in background))
    out.paste(Image.fromarray(graph), ((W - w) // 2, (H - h) // 2))
    return out.resize(THUMB_SIZE, Image.LANCZOS)


def main() -> None:
    for wf in sorted((REPO / "workflows").glob("*.json")):
        picture = REPO / "docs" / "images" / f"{wf.stem}.png"
        if not picture.is_file():
            sys.exit(f"{picture} is missing: run scripts/screenshot_workflows.py {wf.stem} first")
        target = wf.with_suffix(".jpg")
        thumbnail(Image.open(picture)).save(target, quality=85, optimize=True)
        print("wrote", target)


if __name__ == "__main__":
    main()
