"""Held-out evaluation of the demo model (issue 5), and the paper's ablation in miniature.

For every held-out synthetic clip (seeds the model never saw) the model gets the clip's first
frame and caption and generates a clip with the settings of the README's demo: DDIM 25 steps,
eta 1, and the guidance, rescale and fs the checkpoint's metadata gives (`--cfg-text`/`--cfg-img`
override them). Measured per clip:

- conformity to the input image: PSNR of the generated first frame against the input, the
  mean PSNR of every generated frame against the ground-truth clip, and whether the object is
  kept (at its tracked place in the last frame both its mean colour and its pixels, RMS,
  are within 40 RGB of how it looks in the first generated frame);
- motion: the object is tracked by template matching (`track`: its true silhouette in the
  input image, filled with the generated first frame's pixels, searched over every placement
  in each generated frame); the sign of its first-to-last displacement along the caption's
  axis must match the caption ("direction agreement"); "moved" also asks for at least 3
  pixels that way;
- interpolation (start + end frame given): PSNR of the last generated frame against the end
  image, and the middle frame's tracked position against the ground truth's.

First frame over seeds: the first `--seed-clips` held-out clips, each sampled with `--seeds`
seeds; per sample the first frame's PSNR against the input image and its object colour error
(RGB distance of the object's mean colour, at its tracked place, from the input's); a sample
"changes the colour" when that error exceeds 40 (the object-kept tolerance).

Conditions: the full model; "no concat" (the image latent replaced by zeros: only the
context stream carries the image); "no context" (the Resampler's image tokens replaced by
zeros: only the concat carries it). The same detector run on the ground-truth clips is
reported as a sanity row. Prints a table and writes it as JSON.

    python training/demo/evaluate.py --ckpt assets/demo/dynamicrafter_demo.safetensors \
        --csv data/demo/heldout/captions.csv --out assets/demo/eval.json
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from dynamicrafter import Conditioning, load_model, sample_ddim  # noqa: E402
from dynamicrafter.config import TEXT_CONTEXT_LEN  # noqa: E402
from dynamicrafter.pipeline import image_conditioning, video_latent_shape  # noqa: E402
from dynamicrafter.sampling.schedule import randn  # noqa: E402
from dynamicrafter.settings import Guidance, Schedule  # noqa: E402
from training.synthetic import COLORS, DIRECTIONS  # noqa: E402

MOVE_MIN_PX = 3.0
OBJECT_TOL = 40.0        # RGB distance: the true silhouette in the (exact) input frame
KEPT_TOL = 40.0          # object kept: mean-colour change and RMS difference of its last-frame match


def read_clip(path: str) -> np.ndarray:
    import av
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def object_mask(frame: np.ndarray, colour, tol: float = OBJECT_TOL) -> np.ndarray:
    """Pixels within `tol` (RGB distance) of the object's colour (a name or an RGB triple)."""
    ref = np.array(COLORS[colour] if isinstance(colour, str) else colour, dtype=np.float64)
    d = np.linalg.norm(frame.astype(np.float64) - ref, axis=-1)
    return d < tol


def _match(frames: torch.Tensor, tmpl: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best placement (top-left y, x) of the masked template `tmpl * m` (1, 3, h, w) in each of
    `frames` (T, 3, H, W): every placement inside the image, scored by the mean squared
    difference over the mask's pixels. Returns (T, 2) placements and (T,) their RMS error."""
    n = float(m.sum())
    tm = tmpl * m
    # sum_mask (I - T)^2 = sum_mask I^2 - 2 sum_mask I T + sum_mask T^2, each term a valid conv
    ii = torch.nn.functional.conv2d(frames.pow(2).sum(1, keepdim=True), m)
    it = torch.nn.functional.conv2d(frames, tm)
    mse = ((ii - 2 * it + tm.pow(2).sum()) / (3 * n)).clamp_min(0)[:, 0]       # (T, H-h+1, W-w+1)
    best = mse.flatten(1).argmin(1)
    return torch.stack([best // mse.shape[2], best % mse.shape[2]], 1), mse.flatten(1).min(1).values.sqrt()


def track(video: np.ndarray, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the object of the input `image` (H, W, 3) is in every frame of `video` (T, H, W, 3).

    Masked template matching in two steps: the object's true silhouette `mask` filled with the
    input's pixels is found in the first generated frame; the silhouette filled with that
    frame's own pixels there (the object as this video renders it) is then found in every
    frame. Returns (T, 2) positions (x, y) relative to the object's place in the input, in
    pixels, and (T,) the RMS error (0-255) of each match."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m = torch.from_numpy(mask[y0:y1, x0:x1].astype(np.float64))[None, None]      # (1, 1, h, w)
    frames = torch.from_numpy(video.astype(np.float64)).permute(0, 3, 1, 2)       # (T, 3, H, W)
    img = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None]
    first, _ = _match(frames[:1], img[:, :, y0:y1, x0:x1], m)
    py, px = first[0].tolist()
    pos, rms = _match(frames, frames[:1, :, py:py + y1 - y0, px:px + x1 - x0], m)
    return (pos.flip(1) - torch.tensor([x0, y0])).double().numpy(), rms.numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(b, 3, T, H, W) in [-1, 1] -> (b, T, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()


def generate(dc, first: torch.Tensor, prompts: list[str], frames: int, *, mode: str, end=None, steps: int = 25,
             seed: int = 123, cfg_text: float | None = None, cfg_img: float | None = None) -> np.ndarray:
    """The model's own defaults (variant cfg_text, cfg_img, guidance rescale, fs), DDIM eta 1."""
    g = torch.Generator().manual_seed(seed)
    v = dc.variant
    with torch.inference_mode():
        c = image_conditioning(dc, first, prompts, frames, end, generator=g)
        cond, uncond, concat = c.cond, c.uncond, c.concat
        if mode == "no_concat":
            concat = torch.zeros_like(concat)
        elif mode == "no_context":
            cond = cond.clone()
            uncond = uncond.clone()
            cond[:, TEXT_CONTEXT_LEN:] = 0
            uncond[:, TEXT_CONTEXT_LEN:] = 0
        h, w = first.shape[-2:]
        x_T = randn(video_latent_shape(first.shape[0], frames, h, w), g, dc.device)
        guidance = Guidance(v["cfg_text"] if cfg_text is None else cfg_text,
                            v.get("cfg_img") if cfg_img is None else cfg_img, v["guidance_rescale"])
        lat = sample_ddim(dc, x_T, Conditioning(cond, uncond, concat=concat, fs=v["default_fs"]), guidance=guidance,
                          schedule=Schedule(steps, v["spacing"], 1.0), generator=g)
        return to_uint8(dc.decode(lat))


def score(videos: np.ndarray, gts: np.ndarray, rows: list[dict], interp: bool = False) -> dict:
    """Conformity and motion of generated `videos` against the true clips `gts` (see the module
    docstring); the object is followed by `track` from its true silhouette in the input image."""
    agree = moved = kept = 0
    first_psnr, frame_psnr, end_psnr, mid_err, disp, colour_err, first_pos_err = [], [], [], [], [], [], []
    for vid, gt, row in zip(videos, gts, rows):
        first_psnr.append(psnr(vid[0], gt[0]))
        frame_psnr.append(float(np.mean([psnr(vid[t], gt[t]) for t in range(len(gt))])))
        end_psnr.append(psnr(vid[-1], gt[-1]))
        mask = object_mask(gt[0], row["color"])
        shift, rms = track(vid, gt[0], mask)
        first_pos_err.append(float(np.linalg.norm(shift[0])))
        d = float(np.dot(shift[-1] - shift[0], np.array(DIRECTIONS[row["direction"]])))
        disp.append(d)
        agree += int(d > 0)
        moved += int(d >= MOVE_MIN_PX)
        # object kept: at its tracked place in the last frame it still has its first-frame colour
        ys, xs = np.nonzero(mask)
        (dx0, dy0), (dx1, dy1) = shift[0].astype(int), shift[-1].astype(int)
        first_col = vid[0][ys + dy0, xs + dx0].astype(np.float64).mean(0)
        last_col = vid[-1][ys + dy1, xs + dx1].astype(np.float64).mean(0)
        colour_err.append(float(np.linalg.norm(last_col - first_col)))
        kept += int(colour_err[-1] < KEPT_TOL and rms[-1] < KEPT_TOL)
        if interp:
            mid = len(gt) // 2
            mid_err.append(float(np.linalg.norm(shift[mid] - track(gt, gt[0], mask)[0][mid])))
    n = len(rows)
    out = {"n": n, "first_frame_psnr": float(np.mean(first_psnr)),
           "first_frame_object_offset_px": float(np.mean(first_pos_err)),
           "frame_psnr_vs_gt": float(np.mean(frame_psnr)),
           "object_kept": kept / n, "direction_agreement": agree / n, f"moved_ge_{int(MOVE_MIN_PX)}px": moved / n,
           "mean_displacement_px": float(np.mean(disp)), "mean_object_colour_change": float(np.mean(colour_err))}
    if interp:
        out["end_frame_psnr"] = float(np.mean(end_psnr))
        out["mid_position_err_px"] = float(np.mean(mid_err))
    return out


def first_frame_over_seeds(dc, imgs: torch.Tensor, gts: np.ndarray, rows: list[dict], seeds: int,
                           batch: int, steps: int, cfg_text: float | None = None,
                           cfg_img: float | None = None) -> dict:
    """First-frame PSNR and object colour error against the input, every clip x every seed."""
    frames = gts.shape[1]
    psnrs, colour_errs = [], []
    for seed in range(seeds):
        vids = np.concatenate([generate(dc, imgs[i:i + batch, 0], [r["caption"] for r in rows[i:i + batch]], frames,
                                        mode="full", steps=steps, seed=seed, cfg_text=cfg_text, cfg_img=cfg_img)
                               for i in range(0, len(rows), batch)])
        for vid, gt, row in zip(vids, gts, rows):
            psnrs.append(psnr(vid[0], gt[0]))
            mask = object_mask(gt[0], row["color"])
            dx, dy = track(vid[:1], gt[0], mask)[0][0].astype(int)
            ys, xs = np.nonzero(mask)
            ys, xs = (ys + dy).clip(0, gt.shape[1] - 1), (xs + dx).clip(0, gt.shape[2] - 1)
            colour_errs.append(float(np.linalg.norm(vid[0][ys, xs].astype(np.float64).mean(0)
                                                    - gt[0][mask].astype(np.float64).mean(0))))
    return {"clips": len(rows), "seeds": seeds, "first_frame_psnr": float(np.mean(psnrs)),
            "first_frame_psnr_min": float(np.min(psnrs)), "first_frame_colour_error": float(np.mean(colour_errs)),
            "first_frame_colour_error_max": float(np.max(colour_errs)),
            "colour_changed": int(sum(e > KEPT_TOL for e in colour_errs))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="assets/demo/dynamicrafter_demo.safetensors")
    p.add_argument("--csv", default="data/demo/heldout/captions.csv")
    p.add_argument("--out", default="assets/demo/eval.json")
    p.add_argument("--n", type=int, default=0, help="first n held-out clips (0: all)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cfg-text", type=float, help="text guidance (default: the checkpoint's)")
    p.add_argument("--cfg-img", type=float, help="dual CFG's image guidance (default: the checkpoint's)")
    p.add_argument("--seeds", type=int, default=16, help="seeds per clip for the first-frame check (0: skip)")
    p.add_argument("--seed-clips", type=int, default=8, help="held-out clips in the first-frame check")
    a = p.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    dc = load_model(a.ckpt).float().eval()
    v = dc.variant
    cfg = v["cfg_text"] if a.cfg_text is None else a.cfg_text
    cfg_img = v.get("cfg_img") if a.cfg_img is None else a.cfg_img
    with open(a.csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = rows[:a.n] if a.n else rows
    base = os.path.dirname(os.path.abspath(a.csv))
    gts = np.stack([read_clip(os.path.join(base, r["video"])) for r in rows])
    frames = gts.shape[1]
    imgs = torch.from_numpy(gts).float().div(127.5).sub(1).permute(0, 1, 4, 2, 3)   # (b, T, 3, H, W)

    results = {"ground truth (detector check)": score(gts, gts, rows)}
    with torch.inference_mode():     # the VAE alone (encode + decode the true clip): the ceiling
        g = torch.Generator().manual_seed(0)
        recon = [to_uint8(dc.decode(dc.encode_first_stage(clip, generator=g).permute(1, 0, 2, 3)[None]))
                 for clip in imgs]
    recon = np.concatenate(recon)
    results["VAE reconstruction (ceiling)"] = score(recon, gts, rows)
    for name, mode, interp in (("full model", "full", False), ("no concat (zero image latent)", "no_concat", False),
                               ("no context (zero image tokens)", "no_context", False),
                               ("interpolation (start + end)", "full", True)):
        vids = []
        for i in range(0, len(rows), a.batch):
            sl = slice(i, i + a.batch)
            end = imgs[sl, -1] if interp else None
            vids.append(generate(dc, imgs[sl, 0], [r["caption"] for r in rows[sl]], frames, mode=mode, end=end,
                                 steps=a.steps, cfg_text=cfg, cfg_img=cfg_img))
        results[name] = score(np.concatenate(vids), gts, rows, interp=interp)
        print(f"[eval] {name}: {time.time() - t0:.0f}s", file=sys.stderr)

    if a.seeds:
        k = min(a.seed_clips, len(rows))
        results["first frame over seeds"] = first_frame_over_seeds(dc, imgs[:k], gts[:k], rows[:k], a.seeds, a.batch,
                                                                   a.steps, cfg, cfg_img)
        print(f"[eval] first frame over seeds: {time.time() - t0:.0f}s", file=sys.stderr)
        results_seeds = results.pop("first frame over seeds")
    cols = ["first_frame_psnr", "frame_psnr_vs_gt", "object_kept", "direction_agreement",
            f"moved_ge_{int(MOVE_MIN_PX)}px", "mean_displacement_px"]
    print(f"{'condition':34s} " + " ".join(f"{c[:20]:>20s}" for c in cols))
    for name, r in results.items():
        print(f"{name:34s} " + " ".join(f"{r[c]:20.3f}" for c in cols))
    r = results["interpolation (start + end)"]
    print(f"interpolation: end-frame PSNR {r['end_frame_psnr']:.2f} dB, middle-frame position error "
          f"{r['mid_position_err_px']:.2f} px")
    if a.seeds:
        r = results_seeds
        print(f"first frame over {r['seeds']} seeds x {r['clips']} clips: PSNR {r['first_frame_psnr']:.2f} dB "
              f"(min {r['first_frame_psnr_min']:.2f}), object colour error {r['first_frame_colour_error']:.1f} "
              f"(max {r['first_frame_colour_error_max']:.1f}), colour changed in {r['colour_changed']}")
        results["first frame over seeds"] = r
    out = {"checkpoint": a.ckpt, "heldout_csv": a.csv, "clips": len(rows), "frames": frames, "steps": a.steps,
           "sampler": f"DDIM eta 1, cfg_text {cfg}, cfg_img {cfg_img}, guidance_rescale {v['guidance_rescale']}, "
                      f"fs {v['default_fs']}",
           "results": results,
           "seconds": round(time.time() - t0, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(a.out)
    return out


if __name__ == "__main__":
    main()
