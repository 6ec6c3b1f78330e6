"""The bundled demo workflow over many seeds, in ComfyUI's real executor: does the first frame keep
the input? ("DynamiCrafter demo.json" as shipped, on assets/demo/ and assets/example.png, only
the sampler's seed changed, and the decoded frames saved as PNG by core SaveImage instead of
H.264: the codec's 4:2:0 chroma alone moves the small red circle's mean colour by about 35 RGB,
which would hide what the model does.) Per seed: the first frame's PSNR against the input image, and its
object colour error (the RGB distance between the red circle's mean colour in the first frame
and in the input, over the circle's inner pixels in the input: its mask eroded by 4 px, so an
outline drawn a pixel or two smaller, as this small model draws a circle cut by the frame's edge,
is not taken for a colour change); a seed "changes the colour" above 40.

    .venv/bin/python training/demo/workflow_seeds.py --seeds 16 --out assets/demo/workflow_seeds.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from comfy_workflow import load_workflow  # noqa: E402
from run_workflow import prepare_prompt  # noqa: E402
from training.synthetic import COLORS  # noqa: E402

WORKFLOW = REPO / "workflows" / "DynamiCrafter demo.json"
CHECKPOINT = REPO / "assets" / "demo" / "dynamicrafter_demo.safetensors"
IMAGE = REPO / "assets" / "example.png"
COLOUR_TOL = 40.0


def frames_as_png(prompt: dict) -> dict:
    """The API prompt with its CreateVideo -> SaveVideo tail replaced by SaveImage of the same frames."""
    for k, node in list(prompt.items()):
        if node["class_type"] == "SaveVideo":
            create = prompt[node["inputs"]["video"][0]]
            prompt[k] = {"class_type": "SaveImage",
                         "inputs": {"images": create["inputs"]["images"], "filename_prefix": "workflow_seeds"}}
    return prompt


def inner_mask(image: np.ndarray, colour: str = "red") -> np.ndarray:
    """The object's pixels in `image` at least 4 px inside its outline."""
    mask = np.linalg.norm(image - np.array(COLORS[colour], dtype=np.float64), axis=-1) < COLOUR_TOL
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(9))) > 0


def first_frame_scores(first: np.ndarray, image: np.ndarray, colour: str = "red") -> tuple[float, float]:
    first = first.astype(np.float64)
    mse = float(np.mean((first - image) ** 2))
    mask = inner_mask(image, colour)
    colour_error = float(np.linalg.norm(first[mask].mean(0) - image[mask].mean(0)))
    return (99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)), colour_error


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--out", default=str(REPO / "assets" / "demo" / "workflow_seeds.json"))
    a = p.parse_args(argv)
    import comfy_runtime
    t0 = time.time()
    base = comfy_runtime.make_base_dir(Path(tempfile.mkdtemp(prefix="dc_workflow_seeds_")),
                                       models={"checkpoints": {CHECKPOINT.name: CHECKPOINT}},
                                       inputs={IMAGE.name: IMAGE})
    rt = comfy_runtime.InProcessComfy(base)
    image = np.asarray(Image.open(IMAGE).convert("RGB"), dtype=np.float64)
    rows = []
    for seed in range(a.seeds):
        prompt = frames_as_png(prepare_prompt(load_workflow(WORKFLOW), rt.node_classes,
                                              sets=[f"DynamiCrafterDDIMSampler.seed={seed}"]))
        saved = [i for out in rt.run(prompt)["outputs"].values() for i in out.get("images", [])]
        first = Image.open(rt.output_dir / saved[0].get("subfolder", "") / saved[0]["filename"]).convert("RGB")
        psnr, colour_error = first_frame_scores(np.asarray(first), image)
        rows.append({"seed": seed, "first_frame_psnr": psnr, "first_frame_colour_error": colour_error})
        print(json.dumps(rows[-1]), file=sys.stderr)
    out = {"workflow": WORKFLOW.name, "seeds": a.seeds,
           "first_frame_psnr_mean": float(np.mean([r["first_frame_psnr"] for r in rows])),
           "first_frame_psnr_min": float(np.min([r["first_frame_psnr"] for r in rows])),
           "first_frame_colour_error_max": float(np.max([r["first_frame_colour_error"] for r in rows])),
           "colour_changed": int(sum(r["first_frame_colour_error"] > COLOUR_TOL for r in rows)),
           "per_seed": rows, "seconds": round(time.time() - t0, 1)}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{a.seeds} seeds: first-frame PSNR {out['first_frame_psnr_mean']:.2f} dB (min "
          f"{out['first_frame_psnr_min']:.2f}), largest object colour error {out['first_frame_colour_error_max']:.1f}, "
          f"colour changed in {out['colour_changed']}")
    print(a.out)
    return out


if __name__ == "__main__":
    main()
