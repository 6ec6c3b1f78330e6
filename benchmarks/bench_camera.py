"""Camera overhead of CamI2V vs plain DynamiCrafter: one full-size UNet (random weights, the released
256 or 512 widths and sizes) called with and without the camera condition in one process, A/B calls
interleaved (plain, camera, camera, plain, ...) so both see the same machine load, plus the cost of
encoding the camera (pose encoder + epipolar masks). Random weights say nothing about the video: the
released CamI2V checkpoints are needed for real camera moves.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_camera.py --size 256 --frames 16 --pairs 1 \
        --out benchmarks/camera.json

Per call: seconds, and peak memory above what was resident before it (CUDA: allocated tensors; CPU:
the process's resident set, sampled every 2 ms, freed heap handed back to the OS before each call).
Peak totals add the weights (plain: without the camera modules) and, for the camera, its condition.
The epipolar attention spans every token of the clip (frames x latent pixels), so its cost grows as
frames^2 while the plain UNet's grows as frames: fewer frames understate the overhead. A full-size
model needs ~6 GB of RAM in fp32 for its weights.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamicrafter import camera as geometry  # noqa: E402
from dynamicrafter.config import (CAMI2V_EPIPOLAR, PRESETS, CameraConfig, ModelConfig,  # noqa: E402
                                  UNetConfig)
from dynamicrafter.model import DynamiCrafter  # noqa: E402

SIZES = {"256": (256, 256), "512": (320, 512)}


def build(size: str, dtype, device) -> DynamiCrafter:
    name = f"cami2v_{size}"
    unet = UNetConfig(image_gate=size == "256", default_fs=PRESETS[name].default_fs, camera_modules=True,
                      camera_registers=4)
    cfg = ModelConfig(unet=unet, vae=None, text=None, vision=None, resampler=None, variant=PRESETS[name],
                      camera=CameraConfig(**CAMI2V_EPIPOLAR[name]))
    torch.manual_seed(0)
    with torch.device(device):
        model = DynamiCrafter(cfg)
    return model.to(dtype).eval().requires_grad_(False)


def is_camera_param(name: str) -> bool:
    return name.startswith("pose_encoder.") or ".pluker_projection." in name or ".epipolar." in name


# ---------------------------------------------------------------------------- memory
def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak bytes above the level before the block: CUDA allocator stats, else the sampled resident set."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)       # freed heap back to the OS: a fair baseline
        except OSError:
            pass
        self.base = self.top = resident_bytes()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.done.wait(0.002):
            self.top = max(self.top, resident_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.done.set()
            self.thread.join()
            self.peak = max(self.top, resident_bytes()) - self.base


def measured(fn, device) -> tuple[float, int]:
    """(seconds, peak bytes above the level before) of one call."""
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        del out
    return seconds, mem.peak


def nbytes(cond) -> int:
    return sum(f.numel() * f.element_size() for f in cond.pose_features) + \
        sum(m.numel() * m.element_size() for m in cond.masks.values())


# ---------------------------------------------------------------------------- run
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="256")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="1: one branch; 2: both CFG branches in one call")
    ap.add_argument("--pairs", type=int, default=1, help="interleaved plain/camera pairs (ABBA order)")
    ap.add_argument("--warmup", action="store_true", help="one untimed call of each first")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="add the results to this JSON file (one entry per size / frames / batch / device)")
    args = ap.parse_args(argv)
    # 1. the model, its parameter counts and the inputs
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    H, W = SIZES[args.size]
    T, b = args.frames, args.batch
    t0 = time.perf_counter()
    model = build(args.size, dtype, device)
    built_s = time.perf_counter() - t0
    params = {"camera": 0, "plain": 0}
    weight_bytes = {"camera": 0, "plain": 0}
    for n, p in model.named_parameters():
        kind = "camera" if is_camera_param(n) else "plain"
        params[kind] += p.numel()
        weight_bytes[kind] += p.numel() * p.element_size()
    print(f"CamI2V {args.size} ({W}x{H}, {T} frames, batch {b}, {args.dtype}, {device}, "
          f"{torch.get_num_threads()} threads): UNet {params['plain'] / 1e6:.1f} M parameters + camera modules "
          f"{params['camera'] / 1e6:.1f} M (built in {built_s:.0f} s)", flush=True)
    RT = geometry.trajectory("orbit left", T, 0.1)
    K = geometry.intrinsics(H, W, frames=T)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, T, H // 8, W // 8, generator=gen).to(device, dtype)
    concat = torch.randn(b, 4, T, H // 8, W // 8, generator=gen).to(device, dtype)
    context = torch.randn(b, 77 + 16 * T, 1024, generator=gen).to(device, dtype)
    t = torch.tensor([500], device=device)
    with torch.inference_mode():
        # 2. the camera condition, once
        enc_s, enc_peak = measured(lambda: model.encode_camera(RT, K, (H, W),
                                                               generator=torch.Generator().manual_seed(0)), device)
        cam = model.encode_camera(RT, K, (H, W), generator=torch.Generator().manual_seed(0))
        print(f"encode camera: {enc_s:.1f} s, condition {nbytes(cam) / 2 ** 30:.2f} GiB", flush=True)
        calls = {"plain": lambda: model.denoise(x, t, context, concat, 3),
                 "camera": lambda: model.denoise(x, t, context, concat, 3, camera=cam)}
        if args.warmup:
            for fn in calls.values():
                fn()
        # 3. interleaved pairs: plain, camera | camera, plain | ...
        runs = {"plain": [], "camera": []}
        for i in range(args.pairs):
            for kind in (("plain", "camera") if i % 2 == 0 else ("camera", "plain")):
                s, peak = measured(calls[kind], device)
                runs[kind].append((s, peak))
                print(f"  pair {i}: {kind:6s} {s:7.1f} s, peak +{peak / 2 ** 30:.2f} GiB", flush=True)
    # 4. ratios: time per pair (same load), peaks with the weights (and the camera's condition) added
    time_ratio = statistics.median(c[0] / p[0] for p, c in zip(runs["plain"], runs["camera"]))
    act = {k: max(r[1] for r in v) for k, v in runs.items()}
    total = {"plain": weight_bytes["plain"] + act["plain"],
             "camera": weight_bytes["plain"] + weight_bytes["camera"] + nbytes(cam) + act["camera"]}
    res = {"size": args.size, "width": W, "height": H, "frames": T, "batch": b, "dtype": args.dtype,
           "device": str(device), "threads": torch.get_num_threads(), "pairs": args.pairs,
           "params_plain": params["plain"], "params_camera": params["camera"],
           "params_added": params["camera"] / params["plain"],
           "seconds": {k: [r[0] for r in v] for k, v in runs.items()}, "time_ratio": time_ratio,
           "encode_camera_s": enc_s, "encode_camera_peak_bytes": enc_peak, "condition_bytes": nbytes(cam),
           "activation_peak_bytes": act, "activation_peak_ratio": act["camera"] / act["plain"],
           "total_peak_bytes": total, "total_peak_ratio": total["camera"] / total["plain"]}
    print(f"camera / plain: time {time_ratio:.2f}x, peak above the weights {res['activation_peak_ratio']:.2f}x "
          f"({act['camera'] / 2 ** 30:.2f} / {act['plain'] / 2 ** 30:.2f} GiB), peak with the weights "
          f"{res['total_peak_ratio']:.2f}x ({total['camera'] / 2 ** 30:.2f} / {total['plain'] / 2 ** 30:.2f} GiB), "
          f"parameters +{100 * res['params_added']:.1f}% (camera CFG adds one more plain call per step)")
    if args.out:                       # one file for all runs, keyed by size and frames
        out = Path(args.out)
        runs_so_far = json.loads(out.read_text()) if out.is_file() else {}
        runs_so_far[f"{args.size}_{T}frames_batch{b}_{device.type}"] = res
        out.write_text(json.dumps(runs_so_far, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
