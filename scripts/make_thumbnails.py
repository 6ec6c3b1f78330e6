"""Write the Templates-browser thumbnail of every bundled workflow, workflows/<name>.jpg: the
example inputs it animates (its LoadImage pictures, or the first frame of its LoadVideo clip) side
by side, so the cards differ at a glance; a template without an input picture (text to video)
shows its graph picture docs/images/<name>.png (scripts/screenshot_workflows.py).

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


def example_inputs(workflow: dict) -> list[Image.Image]:
    """The pictures a workflow loads, in graph order (shipped in assets/ or assets/examples/)."""
    pictures = []
    for node in workflow["nodes"]:
        if node["type"] not in ("LoadImage", "LoadVideo"):
            continue
        name = node["widgets_values"][0]
        path = next((p for p in (REPO / "assets" / name, REPO / "assets" / "examples" / name) if p.is_file()), None)
        if path is None:
            continue
        if node["type"] == "LoadImage":
            pictures.append(Image.open(path).convert("RGB"))
        else:
            import av
            with av.open(str(path)) as c:
                pictures.append(next(c.decode(video=0)).to_image().convert("RGB"))
    return pictures


def input_thumbnail(pictures: list[Image.Image], background=(24, 24, 24)) -> Image.Image:
    """The pictures side by side, each scaled to fit its share of a THUMB_SIZE card."""
    tw, th = THUMB_SIZE
    out = Image.new("RGB", THUMB_SIZE, background)
    cell = tw // len(pictures)
    for i, p in enumerate(pictures):
        scale = min((cell - 8) / p.width, (th - 8) / p.height)
        q = p.resize((max(1, round(p.width * scale)), max(1, round(p.height * scale))), Image.LANCZOS)
        out.paste(q, (i * cell + (cell - q.width) // 2, (th - q.height) // 2))
    return out


def card(workflow: Path) -> Image.Image:
    """The Templates browser card of a workflow: its example inputs, or its graph picture without one."""
    import json
    pictures = example_inputs(json.loads(workflow.read_text()))[:3]
    if pictures:
        return input_thumbnail(pictures)
    picture = REPO / "docs" / "images" / f"{workflow.stem}.png"
    if not picture.is_file():
        sys.exit(f"{picture} is missing: run scripts/screenshot_workflows.py {workflow.stem} first")
    return thumbnail(Image.open(picture))


def main() -> None:
    for wf in sorted((REPO / "workflows").glob("*.json")):
        target = wf.with_suffix(".jpg")
        card(wf).save(target, quality=85, optimize=True)
        print("wrote", target)


if __name__ == "__main__":
    main()
