"""Writes assets/example.png, the image the README's main command animates: the first frame of
a held-out synthetic clip (seed outside the demo model's training set), a red circle that the
prompt "a red circle moves to the right" asks to move."""
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.synthetic import ClipSpec, render_clip  # noqa: E402

frames, _ = render_clip(ClipSpec("circle", "red", "right", "checker", seed=987654321), 64, 64, 2)
out = Path(__file__).resolve().parents[1] / "assets" / "example.png"
Image.fromarray(frames[0]).save(out)
print(out)
