"""Writes the example inputs the bundled workflows name, rendered by the synthetic world the demo
model was trained on (training/synthetic.py), from seeds outside its training set:

- assets/example.png: what the README's main command animates, a red circle that the prompt
  "a red circle moves to the right" asks to move (64x64, the demo model's size);
- assets/examples/: the other templates' inputs at the released models' 512x320: first.png and
  last.png (start and end of one clip: interpolation, ToonCrafter), scene1-3.png (storytelling,
  one per scene prompt), key1-3.png (keyframes: start, middle and end of one clip) and clip.mp4
  (continue a clip). Copy them into ComfyUI's input/ folder.
- assets/examples/ at the demo model's 64x64: motion_mask.png (the motion brush's mask: white moves,
  the band the example's circle travels along, rows 24-60; black holds the image, the top and bottom
  rows) and motion_clip.mp4 (video to video: 16 frames of a blue square moving to the right).
"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training.synthetic import ClipSpec, render_clip, write_video  # noqa: E402

H, W = 320, 512          # the 512 models' size, which the templates other than the demo use
# storytelling's scenes, in the order and with the prompts of workflows/DynamiCrafter storytelling.json
SCENES = (ClipSpec("circle", "red", "right", "checker", seed=987654322),
          ClipSpec("square", "blue", "up", "stripes", seed=987654323),
          ClipSpec("triangle", "yellow", "left", "gradient", seed=987654324))


def main() -> None:
    frames, _ = render_clip(ClipSpec("circle", "red", "right", "checker", seed=987654321), 64, 64, 2)
    Image.fromarray(frames[0]).save(ROOT / "assets" / "example.png")
    out = ROOT / "assets" / "examples"
    out.mkdir(parents=True, exist_ok=True)
    clip, _ = render_clip(ClipSpec("circle", "purple", "right", "noise", seed=987654330), H, W, 16)
    Image.fromarray(clip[0]).save(out / "first.png")
    Image.fromarray(clip[-1]).save(out / "last.png")
    for i, j in enumerate((0, 8, 15)):
        Image.fromarray(clip[j]).save(out / f"key{i + 1}.png")
    for i, spec in enumerate(SCENES):
        Image.fromarray(render_clip(spec, H, W, 1)[0][0]).save(out / f"scene{i + 1}.png")
    video, _ = render_clip(ClipSpec("square", "green", "down", "stripes", seed=987654331), H, W, 16)
    write_video(video, str(out / "clip.mp4"), fps=24)
    mask = np.zeros((64, 64, 3), np.uint8)
    mask[24:61] = 255          # example.png's circle spans rows 28-52; the band holds its way to the right
    Image.fromarray(mask).save(out / "motion_mask.png")
    demo_clip, _ = render_clip(ClipSpec("square", "blue", "right", "gradient", seed=987654332), 64, 64, 16)
    write_video(demo_clip, str(out / "motion_clip.mp4"), fps=24)
    print(ROOT / "assets" / "example.png", *sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
