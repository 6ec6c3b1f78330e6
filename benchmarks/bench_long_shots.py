"""Long shots on the demo model: chained segments vs context windows vs clip continuation.

Every method animates the first frame of held-out synthetic clips (`training.synthetic`, the
seed the demo's held-out set uses; a shape moving left / right / up / down over a static
background) into 32 and 64 frames with the demo model's 8-frame clips, DDIM 25 steps, eta 1,
the model's cfg_text / guidance rescale, fs 24 (the settings of `training/demo/evaluate.py`):

- chained: segments of 8 frames, each animated from the previous one's last decoded frame
  (`long_shots.chain_segments`, what `DynamiCrafter Long Video` does with method "chained");
- windows: one video, the UNet on context windows of 8 frames overlapping by 4, blended
  (`sample_ddim(window=8, window_overlap=4)`);
- continued: one 8-frame clip, then `long_shots.continue_clip` again and again (windows of 8
  whose first 4 frames are pinned to the video so far: 4 new frames each).

The object is followed with the demo tracker (`training/demo/evaluate.track`: its true
silhouette in the input image, template-matched in every frame). Measured per method and length:

1. seams: mean per-frame displacement of the object at the joins (the first step of a chained
   segment; the first step into a continuation's new frames; the steps where a window starts or
   ends) divided by the mean inside segments / windows, pooled over clips: 1.0 = no stall
   (< 1) or jump (> 1) at the joins;
2. drift, last frame vs first: the object's mean-colour change (RGB distance) and PSNR at its
   tracked places, and the PSNR of the background (pixels outside both places; it is static);
3. direction kept: share of clips whose object moved the caption's way overall (> 0 px) and did
   not turn back over the last 8 frames (> -1 px); net displacement along the caption, in px;
4. time per output frame (seconds on this machine, and as a ratio to chained in the same run).

    flock /tmp/dc-heavy.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_long_shots.py \
        --clips 4 --out benchmarks/long_shots.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynamicrafter  # noqa: E402
from dynamicrafter.sampling.long_shots import chain_segments, continue_clip, segment_joins, window_overlap  # noqa: E402
from dynamicrafter.pipeline import image_conditioning  # noqa: E402
from dynamicrafter.sampling.windows import context_windows  # noqa: E402
from training.demo.evaluate import object_mask, psnr, to_uint8, track  # noqa: E402
from training.synthetic import DIRECTIONS, make_specs, render_clip  # noqa: E402

HELDOUT_SEED = 2000          # training/demo/train_demo.sh: the held-out clips
SIZE = 64
FS = 24


# ------------------------------------------------------------------------------------ 1. inputs
def held_out(n: int):
    """The first n held-out specs and their rendered first frames (exact pixels, no codec)."""
    specs = make_specs(n, HELDOUT_SEED)
    firsts = np.stack([render_clip(s, SIZE, SIZE, 2)[0][0] for s in specs])
    return specs, firsts


# ------------------------------------------------------------------------------------ 2. methods
def segment(dc, images, prompts, frames, seed, steps, window=None, overlap=4):
    """(b, 3, frames, H, W) decoded video animated from images (b, 3, H, W) in [-1, 1]."""
    v = dc.variant
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        c = image_conditioning(dc, images, prompts, frames, generator=g)
        x_T = torch.randn((images.shape[0], 4, frames, SIZE // 8, SIZE // 8), generator=g)
        # single CFG at the model's text scale (the figures in benchmarks/long_shots.json were taken so)
        lat = dynamicrafter.sample_ddim(dc, x_T, dynamicrafter.Conditioning(c.cond, c.uncond, concat=c.concat, fs=FS),
                                        guidance=dynamicrafter.Guidance(v["cfg_text"], None, v["guidance_rescale"]),
                                        schedule=dynamicrafter.Schedule(steps, v["spacing"], 1.0),
                                        windows=dynamicrafter.Windows(window, overlap), generator=g)
        return dc.decode(lat).clamp(-1, 1)


def chained(dc, first, prompts, total, seg, steps, seed):
    video = chain_segments(lambda k, im: segment(dc, im[:, :, 0], prompts, seg, seed + k, steps),
                           first[:, :, None], total, seg, dim=2)
    return video, segment_joins(total, seg)


def windows(dc, first, prompts, total, seg, steps, seed):
    overlap = window_overlap(seg)
    video = segment(dc, first, prompts, total, seed, steps, window=seg, overlap=overlap)
    joins = set()
    for idx in context_windows(total, seg, overlap):
        if idx[0] > 0:
            joins.add(idx[0] - 1)             # the step into the window's first frame
        if idx[-1] < total - 1:
            joins.add(idx[-1])                # the step out of its last frame
    return video, sorted(joins)


def continued(dc, first, prompts, total, seg, steps, seed):
    overlap = seg // 2
    video, joins, k = segment(dc, first, prompts, seg, seed, steps), [], 1
    while video.shape[2] < total:
        joins.append(video.shape[2] - 1)      # last clip frame -> first new frame
        video = continue_clip(dc, video, prompts, shot=dynamicrafter.Shot(frames=seg, fs=FS, seed=seed + k),
                              overlap=overlap, schedule=dynamicrafter.Schedule(steps, dc.variant["spacing"], 1.0))
        k += 1
    return video[:, :, :total], joins


METHODS = {"chained": chained, "windows": windows, "continued": continued}


# ------------------------------------------------------------------------------------ 3. metrics
def measure(video: np.ndarray, first: np.ndarray, spec, joins: list[int], seg: int) -> dict:
    """The tracker's numbers for one generated video (T, H, W, 3) uint8 from input `first`."""
    mask = object_mask(first, spec.color)
    pos, _ = track(video, first, mask)
    step = np.linalg.norm(np.diff(pos, axis=0), axis=1)                     # (T-1,) px per frame
    inside = np.ones(len(step), bool)
    inside[joins] = False
    ys, xs = np.nonzero(mask)
    (dx0, dy0), (dx1, dy1) = pos[0].astype(int), pos[-1].astype(int)
    obj0, obj1 = video[0][ys + dy0, xs + dx0], video[-1][ys + dy1, xs + dx1]
    bg = np.ones(mask.shape, bool)
    bg[ys + dy0, xs + dx0] = False
    bg[ys + dy1, xs + dx1] = False
    axis = np.array(DIRECTIONS[spec.direction])
    net = float(np.dot(pos[-1] - pos[0], axis))
    last = float(np.dot(pos[-1] - pos[-seg], axis))
    return {"join_step_sum": float(step[joins].sum()), "joins": len(joins),
            "inside_step_sum": float(step[inside].sum()), "inside": int(inside.sum()),
            "object_colour_change": float(np.linalg.norm(obj1.astype(np.float64).mean(0) - obj0.mean(0))),
            "object_psnr": psnr(obj1, obj0), "background_psnr": psnr(video[-1][bg], video[0][bg]),
            "direction_kept": bool(net > 0 and last > -1), "net_px": net}


def summarise(rows: list[dict], seconds: float, frames: int) -> dict:
    join = sum(r["join_step_sum"] for r in rows) / max(1, sum(r["joins"] for r in rows))
    inside = sum(r["inside_step_sum"] for r in rows) / max(1, sum(r["inside"] for r in rows))
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    return {"seam_ratio": join / inside if inside > 0 else math.inf, "join_px": join, "inside_px": inside,
            "object_colour_change": mean("object_colour_change"), "object_psnr": mean("object_psnr"),
            "background_psnr": mean("background_psnr"), "direction_kept": mean("direction_kept"),
            "net_px": mean("net_px"), "s_per_frame": seconds / (len(rows) * frames)}


# ------------------------------------------------------------------------------------ 4. run
def table(results: list[dict]) -> str:
    head = ("| frames | method | seam ratio (1 = none) | join / inside px | object colour change | object PSNR "
            "last/first | background PSNR last/first | direction kept | net px | s / frame | time vs chained |")
    lines = [head, "|" + "|".join("---" for _ in range(11)) + "|"]
    for r in results:
        lines.append(f"| {r['frames']} | {r['method']} | {r['seam_ratio']:.2f} | {r['join_px']:.2f} / "
                     f"{r['inside_px']:.2f} | {r['object_colour_change']:.1f} | {r['object_psnr']:.1f} dB | "
                     f"{r['background_psnr']:.1f} dB | {r['direction_kept']:.2f} | {r['net_px']:.1f} | "
                     f"{r['s_per_frame']:.3f} | {r['time_vs_chained']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(REPO / "assets" / "demo" / "dynamicrafter_demo.safetensors"))
    p.add_argument("--clips", type=int, default=4, help="held-out clips (batched)")
    p.add_argument("--frames", type=int, nargs="+", default=[32, 64], help="video lengths")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", help="write the results as JSON")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    dc = dynamicrafter.load_model(a.ckpt).float().eval()
    seg = dc.variant["frames"]
    specs, firsts = held_out(a.clips)
    first = torch.from_numpy(firsts).float().div(127.5).sub(1).permute(0, 3, 1, 2)
    prompts = [s.caption for s in specs]
    results = []
    for total in a.frames:
        base = None
        for name in a.methods:
            t0 = time.perf_counter()
            video, joins = METHODS[name](dc, first, prompts, total, seg, a.steps, a.seed)
            seconds = time.perf_counter() - t0
            vids = to_uint8(video)
            rows = [measure(v, f, s, joins, seg) for v, f, s in zip(vids, firsts, specs)]
            r = {"frames": total, "method": name, **summarise(rows, seconds, total), "seconds": seconds,
                 "join_steps": joins}
            base = r["s_per_frame"] if name == "chained" or base is None else base
            r["time_vs_chained"] = r["s_per_frame"] / base
            results.append(r)
            print(f"[long shots] {total} frames, {name}: {seconds:.0f}s", file=sys.stderr, flush=True)
    print(table(results))
    out = {"checkpoint": a.ckpt, "clips": a.clips, "steps": a.steps, "segment_frames": seg, "size": SIZE,
           "sampler": f"DDIM {a.steps} steps, eta 1, cfg_text {dc.variant['cfg_text']}, guidance_rescale "
                      f"{dc.variant['guidance_rescale']}, fs {FS}", "torch_threads": torch.get_num_threads(),
           "results": results}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
