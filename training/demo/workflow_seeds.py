"""The bundled demo workflow over many seeds, in ComfyUI's real executor: does the first frame keep
the input? ("DynamiCrafter demo.json" as shipped, on assets/demo/ and assets/example.png, only
the sampler's seed changed.) Per seed: the first frame's PSNR against the input image, and its
object colour error (the RGB distance between the red circle's mean colour in the first frame
and in the input, over the circle's pixels in the input); a seed "changes the colour" above 40.

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

import av
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from comfy_workflow import load_workflow  # noqa: E402
from run_workflow import prepare_prompt, video_outputs  # noqa: E402
from training.synthetic import COLORS  # noqa: E402

WORKFLOW = REPO / "workflows" / "DynamiCrafter demo.json"
CHECKPOINT = REPO / "assets" / "demo" / "dynamicrafter_demo.safetensors"
IMAGE = REPO / "assets" / "example.png"
COLOUR_TOL = 40.0


def first_frame_scores(video: Path, image: np.ndarray, colour: str = "red") -> tuple[float, float]:
    with av.open(str(video)) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(np.float64)
    mse = float(np.mean((first - image) ** 2))
    mask = np.linalg.norm(image - np.array(COLORS[colour], dtype=np.float64), axis=-1) < COLOUR_TOL
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
        prompt = prepare_prompt(load_workflow(WORKFLOW), rt.node_classes,
                                sets=[f"DynamiCrafterDDIMSampler.seed={seed}"])
        video = video_outputs(rt.run(prompt), rt.output_dir)[0]
        psnr, colour_error = first_frame_scores(video, image)
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
