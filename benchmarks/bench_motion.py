"""Directing the motion on the demo model (`dynamicrafter.sampling.motion` through `animate`).

Held-out synthetic clips (`training.synthetic`, the demo's held-out seed; a shape moving left /
right / up / down over a static background), 64x64, the model's frames, DDIM `--steps`, eta 1,
the model's guidance. The object is followed with the demo tracker (`training/demo/evaluate.track`).

1. Motion brush: mask = the half of the frame holding the object's path (split across the
   motion) moves, the other half holds. Per clip: mean |frame - input| over the held half (also
   8+ px from the edge) vs the moving half, with and without the mask, the object's travel, and
   the VAE's own round trip of what the brush holds (decode of the image latent) vs the input; the
   held half three ways: pasted back from the input (animate), from the VAE round trip, not at all.
2. Video to video: init_video = the held-out clip itself (exact pixels); PSNR of the output to
   the clip vs strength (1 = pure noise, 0 = the clip's latents decoded).
3. Motion amount: motion m in [0, 1]; the object's travelled distance (tracker, px, first to last
   frame), the mean |frame - first frame| (0-255) and the first frame's PSNR to the input.
4. Prompt schedule: 2x the model's frames in context windows (window = the model's frames,
   overlap half a window), held-out clips that start in a corner (their position does not tell
   the axis: the caption does; from a side start the demo model moves away from the side whatever
   the caption says); the schedule says "moves <d>" on the first half and "moves <d2>" (across d,
   into the frame) on the second; per window (first / last), the object's displacement along d
   and along d2 (px), with the schedule and with the first prompt alone.

    flock /tmp/dc-heavy.lock env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_motion.py --clips 4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import dynamicrafter  # noqa: E402
from dynamicrafter.sampling.motion import paste_back  # noqa: E402
from training.demo.evaluate import object_mask, psnr, to_uint8, track  # noqa: E402
from training.synthetic import DIRECTIONS, make_specs, render_clip  # noqa: E402

HELDOUT_SEED = 2000          # training/demo/train_demo.sh: the held-out clips
SIZE = 64
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def caption(spec, direction: str) -> str:
    motion = f"moves to the {direction}" if direction in ("left", "right") else f"moves {direction}"
    return f"a {spec.color} {spec.shape} {motion}"


def pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1


def run(dc, spec, first, frames, steps, seed, motion=None, windows=None, callback=None) -> np.ndarray:
    """One animation of `first` at the demo's own guidance, `steps` DDIM steps at eta 1."""
    video = dynamicrafter.animate(dc, pixels(first[None])[:, :, 0], spec.caption,
                                  shot=dynamicrafter.Shot(frames=frames, seed=seed),
                                  schedule=dynamicrafter.Schedule(steps, dc.variant["spacing"], 1.0),
                                  motion=motion, windows=windows, callback=callback)
    return to_uint8(video)[0]


def along(pos: np.ndarray, direction: str) -> np.ndarray:
    """Positions (T, 2) projected on a direction's unit vector."""
    return pos @ np.array(DIRECTIONS[direction])


def perpendicular(direction: str, centre) -> str:
    """The direction across `direction` that points from the object's centre (x, y) into the frame's larger part."""
    dx, _ = DIRECTIONS[direction]
    if dx:
        return "down" if centre[1] < SIZE / 2 else "up"
    return "right" if centre[0] < SIZE / 2 else "left"


def centre_of(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def motion_brush(dc, spec, first, frames, steps, seed) -> dict:
    """The half of the frame holding the object's path (split across the motion) moves, the other holds.
    The held half's pixels three ways: the held latent decoded (no paste), pasted back from the input
    image (what `animate` returns), pasted back from the VAE round trip of the held image latent."""
    obj = object_mask(first, spec.color)
    cx, cy = centre_of(obj)
    mask = torch.zeros(SIZE, SIZE)
    if DIRECTIONS[spec.direction][0]:                 # horizontal motion: the object's band of rows moves
        mask[: SIZE // 2] = 1 if cy < SIZE / 2 else 0
        mask[SIZE // 2:] = 0 if cy < SIZE / 2 else 1
    else:
        mask[:, : SIZE // 2] = 1 if cx < SIZE / 2 else 0
        mask[:, SIZE // 2:] = 0 if cx < SIZE / 2 else 1
    last = {}
    video = run(dc, spec, first, frames, steps, seed, motion=dynamicrafter.Motion(mask=mask),
                callback=lambda i, n, x, x0: last.update(x=x.clone()))
    free = run(dc, spec, first, frames, steps, seed)
    travel = [float(along(track(v, first, obj)[0][-1], spec.direction)) for v in (video, free)]
    with torch.inference_mode():      # the latent the brush holds: the image's, drawn as animate draws it
        x = pixels(first[None])[:, :, 0]
        g = torch.Generator().manual_seed(seed)
        c = dynamicrafter.pipeline.image_conditioning(dc, x, [spec.caption], frames, generator=g)
        recon = dc.decode(c.concat[:, :, :1])[:, :, 0]
        raw = dc.decode(last["x"])                    # the sampled latent, decoded without the paste
        pasted = paste_back(raw, x, mask)
        round_trip = to_uint8(paste_back(raw, recon, mask))[0].astype(np.float64)
    if np.abs(to_uint8(pasted)[0].astype(int) - video.astype(int)).max() > 1:
        raise AssertionError("animate's output is not the paste-back of its decoded latent")
    raw, recon = to_uint8(raw)[0].astype(np.float64), to_uint8(recon[:, :, None])[0, 0].astype(np.float64)
    video, free = video.astype(np.float64), free.astype(np.float64)
    held = (mask == 0).numpy()
    band = torch.nn.functional.max_pool2d(mask[None, None], 17, stride=1, padding=8)[0, 0].numpy() > 0
    far = held & ~band                              # held pixels 8+ px (a latent pixel) from the moving half

    def err(v):                                     # (T, H, W): mean abs difference to the input, 0-255
        return np.abs(v - first.astype(np.float64)).mean(-1)
    diff, free_diff, raw_diff, rt_diff, vae = err(video), err(free), err(raw), err(round_trip), err(recon)
    return {"held": float(diff[:, held].mean()), "held_far": float(diff[:, far].mean()),
            "moving": float(diff[:, ~held].mean()), "moving_free": float(free_diff[:, ~held].mean()),
            "held_free": float(free_diff[:, held].mean()), "held_far_free": float(free_diff[:, far].mean()),
            "held_latent": float(raw_diff[:, held].mean()), "held_far_latent": float(raw_diff[:, far].mean()),
            "moving_latent": float(raw_diff[:, ~held].mean()),
            "held_round_trip": float(rt_diff[:, held].mean()), "held_far_round_trip": float(rt_diff[:, far].mean()),
            "vae_err_held": float(vae[held].mean()), "vae_err_far": float(vae[far].mean()),
            "travel": travel[0], "travel_free": travel[1]}


def v2v(dc, spec, clip, frames, steps, seed, strengths) -> dict:
    out = {}
    for s in strengths:
        video = run(dc, spec, clip[0], frames, steps, seed,
                    motion=dynamicrafter.Motion(init_video=pixels(clip), strength=s))
        out[s] = psnr(video, clip)
    return out


def motion_amount(dc, spec, first, frames, steps, seed, amounts) -> dict:
    mask = object_mask(first, spec.color)
    out = {}
    for m in amounts:
        video = run(dc, spec, first, frames, steps, seed, motion=dynamicrafter.Motion(amount=m))
        pos, _ = track(video, first, mask)
        out[m] = {"travel": float(np.linalg.norm(pos[-1] - pos[0])),
                  "along": float(along(pos[-1] - pos[0], spec.direction)),
                  "frame_diff": float(np.abs(video.astype(np.float64) - video[:1]).mean()),
                  "first_psnr": psnr(video[0], first)}
    return out


def schedule(dc, spec, first, frames, steps, seed) -> dict:
    """Corner starts (only the caption tells the axis): the caption's direction d on the first
    window, then across it (d2, into the frame) on the last; displacement per window along each."""
    total, w = 2 * frames, frames
    d = spec.direction
    obj = object_mask(first, spec.color)
    d2 = perpendicular(d, centre_of(obj))
    text = f"0: {caption(spec, d)} | {w - 1}: {caption(spec, d)} | {w}: {caption(spec, d2)} | " \
           f"{total - 1}: {caption(spec, d2)}"
    out = {}
    for name, sched in (("one prompt", None), ("schedule", text)):
        video = run(dc, spec, first, total, steps, seed, motion=dynamicrafter.Motion(prompt_schedule=sched),
                    windows=dynamicrafter.Windows(w, w // 2))
        pos, _ = track(video, first, obj)
        first_w, last_w = pos[w - 1] - pos[0], pos[-1] - pos[total - w]
        out[name] = {"first_d": float(along(first_w, d)), "first_d2": float(along(first_w, d2)),
                     "last_d": float(along(last_w, d)), "last_d2": float(along(last_w, d2))}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=str(REPO / "assets" / "demo" / "dynamicrafter_demo.safetensors"))
    p.add_argument("--clips", type=int, default=4, help="held-out clips")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--parts", nargs="+", default=["brush", "v2v", "motion", "schedule"])
    p.add_argument("--out", help="write the results as JSON")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    dc = dynamicrafter.load_model(a.ckpt).float()
    frames = dc.variant["frames"]
    specs = make_specs(a.clips, HELDOUT_SEED)
    clips = [render_clip(s, SIZE, SIZE, frames)[0] for s in specs]
    strengths, amounts = [0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0]
    res = {"clips": a.clips, "steps": a.steps, "frames": frames}
    if "brush" in a.parts:
        rows = [motion_brush(dc, s, c[0], frames, a.steps, a.seed) for s, c in zip(specs, clips)]
        res["brush"] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        b = res["brush"]
        print("\n| motion brush (mean abs difference to the input, 0-255) | held half | held, 8+ px from the edge "
              "| moving half | object travel (px) |")
        print("|---|---|---|---|---|")
        print(f"| mask, held pixels pasted from the input (`animate`) | {b['held']:.1f} | {b['held_far']:.1f} | "
              f"{b['moving']:.1f} | {b['travel']:.1f} |")
        print(f"| mask, held pixels pasted from the VAE round trip | {b['held_round_trip']:.1f} | "
              f"{b['held_far_round_trip']:.1f} | {b['moving']:.1f} | |")
        print(f"| mask, held latent only (no paste) | {b['held_latent']:.1f} | {b['held_far_latent']:.1f} | "
              f"{b['moving_latent']:.1f} | |")
        print(f"| without mask (same seed) | {b['held_free']:.1f} | {b['held_far_free']:.1f} | "
              f"{b['moving_free']:.1f} | {b['travel_free']:.1f} |")
        print(f"| VAE round trip of the held image latent | {b['vae_err_held']:.1f} | {b['vae_err_far']:.1f} | | |")
    if "v2v" in a.parts:
        rows = [v2v(dc, s, c, frames, a.steps, a.seed, strengths) for s, c in zip(specs, clips)]
        res["v2v"] = {s: float(np.mean([r[s] for r in rows])) for s in strengths}
        print("\n| strength | " + " | ".join(f"{s:g}" for s in strengths) + " |")
        print("|---" * (len(strengths) + 1) + "|")
        print("| PSNR to the clip (dB) | " + " | ".join(f"{res['v2v'][s]:.1f}" for s in strengths) + " |")
    if "motion" in a.parts:
        rows = [motion_amount(dc, s, c[0], frames, a.steps, a.seed, amounts) for s, c in zip(specs, clips)]
        res["motion"] = {m: {k: float(np.mean([r[m][k] for r in rows])) for k in rows[0][m]} for m in amounts}
        print("\n| motion m | " + " | ".join(f"{m:g}" for m in amounts) + " |")
        print("|---" * (len(amounts) + 1) + "|")
        for k, label in (("travel", "object travel (px)"), ("along", "along the caption (px)"),
                         ("frame_diff", "mean abs frame change (0-255)"), ("first_psnr", "first frame PSNR (dB)")):
            print(f"| {label} | " + " | ".join(f"{res['motion'][m][k]:.1f}" for m in amounts) + " |")
    if "schedule" in a.parts:
        corner = make_specs(a.clips, HELDOUT_SEED, corner_share=1.0)
        firsts = [render_clip(s, SIZE, SIZE, 1)[0][0] for s in corner]
        rows = [schedule(dc, s, f, frames, a.steps, a.seed) for s, f in zip(corner, firsts)]
        res["schedule"] = {n: {k: float(np.mean([r[n][k] for r in rows])) for k in rows[0][n]} for n in rows[0]}
        print("\n| prompts over 2 windows (corner starts) | first window: along d / across (px) | last window: "
              "along d / across, d2 (px) |")
        print("|---|---|---|")
        for n, r in res["schedule"].items():
            print(f"| {n} | {r['first_d']:+.1f} / {r['first_d2']:+.1f} | {r['last_d']:+.1f} / {r['last_d2']:+.1f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
