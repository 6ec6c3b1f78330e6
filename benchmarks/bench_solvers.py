"""Quality against work of the samplers: how close each method and step count comes to the
official 50-step DDIM (eta 0) video from the same noise, and at what cost.

For each model (the tiny reference checkpoint: random weights, the ODE still well defined; the
demo model on held-out clips) and each guidance setting, every method samples from the same x_T
and conditioning. Printed per method: UNet branch evaluations per video (a cached one counted at
its FLOP share), wall time as a ratio to the 50-step DDIM measured in the same run, PSNR to the
50-step DDIM of the latents (peak = the reference's value range) and of the decoded frames
(8-bit), and on the demo model the demo tracker metrics (training/demo/evaluate.py: direction
agreement, first-frame PSNR against the input image, object kept).

Methods: DDIM 50/25/15/10 (`sample_ddim`); ComfyUI's core samplers through our MODEL
(`comfy.samplers.KSampler` in process, single CFG + ComfyUI's RescaleCFG: core KSampler has no
dual CFG and no dynamic x0 rescale); our solvers (`dynamicrafter.sample`); DeepCache-style step
caching and CFG in an interval of timesteps, on top of DPM-Solver++ 2M.

    flock /tmp/dc-heavy.lock .venv/bin/python benchmarks/bench_solvers.py [--clips 2] [--out bench.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))   # comfy_runtime, nodes_pack_access

import dynamicrafter  # noqa: E402
from dynamicrafter.pipeline import fit_image, image_conditioning  # noqa: E402
from dynamicrafter.sampling.solvers import sample  # noqa: E402
from dynamicrafter.settings import Guidance, Schedule  # noqa: E402

# what runs, per plan: the full one on the tiny model, a reduced one on the demo batch (a step costs
# about clips x the tiny model's)
PLANS = {
    "full": dict(
        ddim=(25, 15, 10), ours=[("dpmpp_2m", 10), ("dpmpp_2m", 15), ("unipc", 10), ("unipc", 15)],
        core=[("euler", "simple", 10), ("dpmpp_2m", "simple", 10), ("dpmpp_2m", "karras", 10),
              ("dpmpp_2m_sde", "simple", 10), ("uni_pc", "simple", 10)],
        cache=[(15, 2, 1), (15, 3, 1), (15, 3, 0)],            # (steps, interval, depth) on dpmpp_2m
        cfg=[(15, (150, 850)), (15, (300, 700))],              # (steps, (t_lo, t_hi)) on dpmpp_2m
        dual_ddim=(15, 10), dual_ours=[("dpmpp_2m", 10), ("dpmpp_2m", 15), ("unipc", 15)]),
    "reduced": dict(
        ddim=(15, 10), ours=[("dpmpp_2m", 10), ("dpmpp_2m", 15)],
        core=[("euler", "simple", 10), ("dpmpp_2m", "simple", 10)],
        cache=[(15, 3, 1)], cfg=[(15, (150, 850))], dual_ddim=(15,), dual_ours=[("dpmpp_2m", 10), ("dpmpp_2m", 15)]),
}


# ------------------------------------------------------------------------------------ 1. inputs
def tiny_inputs(ckpt: Path, frames=8, size=(64, 64)):
    dc = dynamicrafter.load_model(str(ckpt)).float().eval()
    inputs = ckpt.parent / "inputs" / "single"
    image = fit_image(dynamicrafter.load_image(str(inputs / "image.png")), *size)
    prompt = (inputs / "prompt.txt").read_text().strip()
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        c = image_conditioning(dc, image, [prompt], frames, generator=g)
    x_T = torch.randn((1, 4, frames, size[0] // 8, size[1] // 8), generator=g)
    return dc, c, x_T, None


def demo_inputs(ckpt: Path, n: int):
    """The first n held-out clips (made by training.synthetic with the seed train_demo.sh uses)."""
    heldout = REPO / "data" / "demo" / "heldout"
    if not (heldout / "captions.csv").is_file():
        subprocess.run([sys.executable, "-m", "training.synthetic", "--out", str(heldout), "--n", "96", "--size", "64",
                        "--frames", "8", "--fps", "24", "--seed", "2000"], cwd=REPO, check=True)
    import csv

    from training.demo.evaluate import read_clip
    with open(heldout / "captions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    gts = np.stack([read_clip(str(heldout / r["video"])) for r in rows])
    first = torch.from_numpy(gts[:, 0]).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    dc = dynamicrafter.load_model(str(ckpt)).float().eval()
    g = torch.Generator().manual_seed(123)
    with torch.inference_mode():
        c = image_conditioning(dc, first, [r["caption"] for r in rows], gts.shape[1], generator=g)
    x_T = torch.randn((len(rows), 4, gts.shape[1], 8, 8), generator=g)
    return dc, c, x_T, (gts, rows)


# ------------------------------------------------------------------------------------ 2. methods
def run_ours(dc, c, x_T, guidance, solver, steps, cache=(1, 1), cfg_interval=None):
    stats = {}
    g = Guidance(guidance["cfg_text"], guidance.get("cfg_img"), guidance["guidance_rescale"], cfg_interval)
    t0 = time.perf_counter()
    with torch.inference_mode():
        lat = sample(dc, x_T, dataclasses.replace(c, fs=24), guidance=g,
                     schedule=Schedule(steps, eta=0.0, solver=solver, cache=cache), stats=stats)
    return lat, time.perf_counter() - t0, stats


class Core:
    """ComfyUI's KSampler on our MODEL (ModelPatcher), in this process."""

    def __init__(self):
        import comfy_runtime
        base = Path(tempfile.mkdtemp(prefix="dc_bench_comfy_"))
        self.rt = comfy_runtime.InProcessComfy.get() or comfy_runtime.InProcessComfy(comfy_runtime.make_base_dir(base))
        from nodes_pack_access import pack
        self.pack = pack

    def run(self, dc, c, x_T, guidance, sampler, scheduler, steps):
        import comfy.sample
        from comfy_extras.nodes_model_advanced import RescaleCFG
        model = self.pack("comfy_model").make_model_patcher(dc)
        if guidance.get("guidance_rescale"):
            model = RescaleCFG().patch(model, guidance["guidance_rescale"])[0]
        calls = []

        def count(apply_model, args):
            calls.append(args["input"].shape[0] // x_T.shape[0])
            return apply_model(args["input"], args["timestep"], **args["c"])
        model.set_model_unet_function_wrapper(count)
        ctx_len = 77
        common = {"concat_latent_image": c.concat / dc.scale_factor, "dc_fs": 24}
        pos = [[c.cond[:, :ctx_len], {**common, "dc_image_context": c.cond[:, ctx_len:]}]]
        neg = [[c.uncond[:, :ctx_len], {**common, "dc_image_context": c.uncond[:, ctx_len:]}]]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = comfy.sample.sample(model, x_T, steps, guidance["cfg_text"], sampler, scheduler, pos, neg,
                                      torch.zeros_like(x_T), seed=0, disable_pbar=True)
        return out * dc.scale_factor, time.perf_counter() - t0, {"evaluations": sum(calls), "cached": 0}


def cached_flop_share(dc, x_T, c, depth: int, branches: int) -> float:
    """FLOPs of a forward that reuses the deep features over a full one (with the guidance branches)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.cat([x_T[:1], c.concat[:1]], 1)
    ctx = torch.cat([c.cond[:1], c.uncond[:1], c.uncond[:1]][:branches])
    t, fs = torch.tensor([500]), torch.tensor([24])
    counts = []
    with torch.inference_mode():
        _, deep = dc.unet.forward_cut(x, t, ctx, fs, depth=depth)
        for d in (None, deep):
            with FlopCounterMode(display=False) as fc:
                dc.unet.forward_cut(x, t, ctx, fs, depth=depth, deep=d)
            counts.append(fc.get_total_flops())
    return counts[1] / counts[0]


# ------------------------------------------------------------------------------------ 3. metrics
def to_uint8(video: torch.Tensor) -> np.ndarray:
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()


def psnr(a, b, peak) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def measure(dc, lat, ref_lat, ref_frames, demo):
    with torch.inference_mode():
        frames = to_uint8(dc.decode(lat))
    row = {"latent_psnr": psnr(lat.numpy(), ref_lat.numpy(), float(ref_lat.max() - ref_lat.min())),
           "frame_psnr": psnr(frames, ref_frames, 255.0)}
    if demo is not None:
        from training.demo.evaluate import score
        gts, rows = demo
        s = score(frames, gts, rows)
        row.update(direction=s["direction_agreement"], first_frame_psnr=s["first_frame_psnr"], kept=s["object_kept"])
    return row


# ------------------------------------------------------------------------------------ 4. the table
def bench_model(name, dc, c, x_T, demo, guidance, setting, core, plan, save=None):
    """The rows of one model and guidance setting; save(rows so far), when given, after each row."""
    print(f"[bench] {name} / {setting}", file=sys.stderr, flush=True)
    ref_lat, ref_time, _ = run_ours(dc, c, x_T, guidance, "ddim", 50)
    with torch.inference_mode():
        ref_frames = to_uint8(dc.decode(ref_lat))
    rows = []

    def add(method, steps, result):
        lat, seconds, stats = result
        r = {"model": name, "setting": setting, "method": method, "steps": steps,
             "evaluations": stats["evaluations"], "cached": stats["cached"], "time_ratio": seconds / ref_time}
        r.update(measure(dc, lat, ref_lat, ref_frames, demo))
        rows.append(r)
        print(f"[bench]   {method} {steps}: {r}", file=sys.stderr, flush=True)
        if save is not None:     # rows so far, so a long run leaves its results behind
            save(rows)

    add("DDIM (reference)", 50, (ref_lat, ref_time, {"evaluations": 50 * (2 + ("cfg_img" in guidance)), "cached": 0}))
    dual = "cfg_img" in guidance
    for steps in plan["dual_ddim"] if dual else plan["ddim"]:
        add("DDIM", steps, run_ours(dc, c, x_T, guidance, "ddim", steps))
    for solver, steps in plan["dual_ours"] if dual else plan["ours"]:
        add(f"ours {solver}", steps, run_ours(dc, c, x_T, guidance, solver, steps))
    if core is not None and not dual:
        for sampler, scheduler, steps in plan["core"]:
            add(f"ComfyUI {sampler}/{scheduler}", steps, core.run(dc, c, x_T, guidance, sampler, scheduler, steps))
    if not dual:
        for steps, interval, depth in plan["cache"]:
            add(f"ours dpmpp_2m + cache k={interval} depth={depth}", steps,
                run_ours(dc, c, x_T, guidance, "dpmpp_2m", steps, cache=(interval, depth)))
            rows[-1]["flop_share"] = cached_flop_share(dc, x_T, c, depth, 2)
        for steps, interval in plan["cfg"]:
            add(f"ours dpmpp_2m + CFG t in [{interval[0]}, {interval[1]}]", steps,
                run_ours(dc, c, x_T, guidance, "dpmpp_2m", steps, cfg_interval=interval))
    for r in rows:   # cached evaluations at their FLOP share
        r["work"] = r["evaluations"] - r["cached"] * (1 - r.get("flop_share", 1.0))
    return rows


def print_table(rows):
    head = ("| model | guidance | method | steps | UNet evals | time vs DDIM 50 | latent PSNR dB | frame PSNR dB "
            "| direction | first-frame PSNR dB | kept |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        demo = [f"{r['direction']:.2f}", f"{r['first_frame_psnr']:.1f}", f"{r['kept']:.2f}"] if "direction" in r \
            else ["-", "-", "-"]
        work = f"{r['work']:.0f}" if r["cached"] == 0 else f"{r['work']:.0f} ({r['cached']:.0f} cached)"
        print(f"| {r['model']} | {r['setting']} | {r['method']} | {r['steps']} | {work} | {r['time_ratio']:.2f} | "
              f"{r['latent_psnr']:.1f} | {r['frame_psnr']:.1f} | " + " | ".join(demo) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", default=str(REPO.parent / "shared" / "reference" / "tiny_v" / "model.safetensors"))
    p.add_argument("--demo", default=str(REPO / "assets" / "demo" / "dynamicrafter_demo.safetensors"))
    p.add_argument("--clips", type=int, default=2, help="held-out demo clips (one batch)")
    p.add_argument("--no-core", action="store_true", help="skip ComfyUI's samplers")
    p.add_argument("--demo-plan", choices=list(PLANS), default="reduced")
    p.add_argument("--models", default="tiny,demo", help="comma-separated: tiny, demo")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the rows as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    core = None if a.no_core else Core()
    single = {"cfg_text": 7.5, "guidance_rescale": 0.7}
    dual = {"cfg_text": 7.5, "cfg_img": 1.5, "guidance_rescale": 0.7}
    rows = []
    models = []
    wanted = a.models.split(",")
    if "tiny" in wanted and os.path.isfile(a.tiny):
        models.append(("tiny (random)", PLANS["full"], lambda: tiny_inputs(Path(a.tiny))))
    if "demo" in wanted and os.path.isfile(a.demo):
        models.append((f"demo ({a.clips} held-out)", PLANS[a.demo_plan], lambda: demo_inputs(Path(a.demo), a.clips)))
    save = (lambda new: Path(a.out).write_text(json.dumps(rows + new, indent=1))) if a.out else None
    for name, plan, make in models:
        dc, c, x_T, demo = make()
        rows += bench_model(name, dc, c, x_T, demo, single, "cfg 7.5 + rescale 0.7", core, plan, save)
        rows += bench_model(name, dc, c, x_T, demo, dual, "dual cfg 7.5/1.5 + rescale 0.7", None, plan, save)
    print_table(rows)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
