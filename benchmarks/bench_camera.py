"""Camera overhead of CamI2V vs plain DynamiCrafter: one full-size UNet (random weights, the released
256 or 512 sizes) run with and without the camera condition, in one process, plus the cost of encoding
the camera (pose encoder + epipolar masks). Random weights say nothing about the video: the released
CamI2V checkpoints are needed for real camera moves.

    .venv/bin/python benchmarks/bench_camera.py --size 256 [--frames 16] [--repeat 1] [--device cpu]

Prints: parameters (plain / camera modules), seconds per UNet call without and with camera and their
ratio, seconds to encode the camera, and (CUDA) peak memory of each call. A full-size 256 model needs
~7 GB of RAM in fp32 (use --dtype bf16 on small machines).
"""
from __future__ import annotations

import argparse
import sys
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


def timed(fn, repeat: int, device) -> tuple[float, float]:
    fn()    # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    del out
    return (time.perf_counter() - t0) / repeat, peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="256")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    H, W = SIZES[args.size]
    T = args.frames
    model = build(args.size, dtype, device)
    cam_params = sum(p.numel() for n, p in model.named_parameters()
                     if n.startswith("pose_encoder.") or ".pluker_projection." in n or ".epipolar." in n)
    plain_params = sum(p.numel() for p in model.parameters()) - cam_params
    print(f"CamI2V {args.size} ({W}x{H}, {T} frames, {args.dtype}, {device}): UNet {plain_params / 1e6:.1f} M "
          f"parameters + camera modules {cam_params / 1e6:.1f} M")
    RT = geometry.trajectory("orbit left", T, 0.1)
    K = geometry.intrinsics(H, W, frames=T)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, T, H // 8, W // 8, generator=gen).to(device, dtype)
    concat = torch.randn(1, 4, T, H // 8, W // 8, generator=gen).to(device, dtype)
    context = torch.randn(2, 77 + 16 * T, 1024, generator=gen).to(device, dtype)   # cond + uncond branches
    t = torch.tensor([500], device=device)
    with torch.inference_mode():
        enc_s, enc_peak = timed(lambda: model.encode_camera(RT, K, (H, W), generator=torch.Generator().manual_seed(0)),
                                args.repeat, device)
        cam = model.encode_camera(RT, K, (H, W), generator=torch.Generator().manual_seed(0))
        plain_s, plain_peak = timed(lambda: model.denoise(x, t, context, concat, 3), args.repeat, device)
        cam_s, cam_peak = timed(lambda: model.denoise(x, t, context, concat, 3, camera=cam), args.repeat, device)
    print(f"encode camera: {enc_s:.2f} s (peak {enc_peak:.2f} GiB)")
    print(f"UNet call, 2 branches, plain DynamiCrafter: {plain_s:.2f} s (peak {plain_peak:.2f} GiB)")
    print(f"UNet call, 2 branches, with camera:        {cam_s:.2f} s (peak {cam_peak:.2f} GiB)")
    print(f"camera / plain time: {cam_s / plain_s:.2f}x (camera CFG adds one more plain-cost call per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
