"""The UNet's peak activation memory per latent element: the data behind ComfyUI's estimate.

ComfyUI plans sampling memory with `memory_required(shape)` = area x dtype bytes x 0.01 MiB x
`memory_usage_factor`, area = batch x frames x h x w of the latent (the batch holding the
guidance branches). This script counts the live tensor bytes of one no-grad UNet forward in the
released layout (channel_mult 1,2,4,4, 64-channel heads, image cross-attention, temporal layers)
with dynamicrafter.memory.TensorMemory and prints the factor that makes the formula equal to it:

- `--released` (default): the full width (model_channels 320) at the released sizes, 16 frames,
  3 guidance branches (dual CFG: ComfyUI batches them), counted on meta tensors (no compute, a
  few seconds; SDPA counted as the fused kernels run it, `memory.fused_attention`);
- `--check`: the same count on meta and on CPU with real numbers at small widths and sizes,
  which must agree byte for byte (the meta count is the CPU run's).

    .venv/bin/python benchmarks/memory_estimate.py [--released] [--check]

nodes/comfy_model.py uses the largest released factor, scaled by model_channels / 320.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynamicrafter.config import UNetConfig  # noqa: E402
from tensor_memory import TensorMemory, fused_attention  # noqa: E402
from dynamicrafter.models.unet import UNet3D  # noqa: E402

RELEASED = {"256": (32, 32), "512": (40, 64), "1024": (72, 128)}     # latent h x w per model


def random_unet(model_channels: int, device: str = "cpu") -> UNet3D:
    cfg = dataclasses.replace(UNetConfig(), model_channels=model_channels)
    with torch.device("meta"):
        unet = UNet3D(cfg)
    if device != "meta":
        unet = unet.to_empty(device=device)
        with torch.no_grad():
            for p in unet.parameters():
                p.normal_(0, 0.02)
    return unet.eval().requires_grad_(False)


def measure(unet: UNet3D, videos: int, frames: int, h: int, w: int) -> int:
    """Peak live activation bytes of one forward of `videos` latents (the guidance branches as
    ComfyUI batches them), on the UNet's device."""
    cfg = unet.cfg
    device = next(unet.parameters()).device
    x = torch.randn(videos, cfg.in_channels, frames, h, w, device=device)
    context = torch.randn(videos, 77 + 16 * frames, cfg.context_dim, device=device)
    t, fs = torch.full((videos,), 500, device=device), torch.full((videos,), 24, device=device)
    with torch.no_grad(), fused_attention(), TensorMemory() as m:
        unet(x, t, context, fs=fs)
    return m.peak


def comfy_factor(peak: int, videos: int, frames: int, h: int, w: int, dtype_bytes: int = 4) -> float:
    """The memory_usage_factor for which ComfyUI's formula gives `peak` bytes."""
    return peak / (videos * frames * h * w * dtype_bytes * 0.01 * 2 ** 20)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--released", action="store_true", help="full width at the released sizes (default)")
    ap.add_argument("--check", action="store_true", help="meta count == CPU count at small sizes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.check:
        print("| model_channels | videos x frames x h x w | meta MiB | CPU MiB |")
        print("|---|---|---|---|", flush=True)
        for mc, (videos, frames, h, w) in ((64, (3, 16, 8, 16)), (128, (3, 8, 16, 16)), (64, (1, 2, 72, 128))):
            meta = measure(random_unet(mc, "meta"), videos, frames, h, w)
            cpu = measure(random_unet(mc, "cpu"), videos, frames, h, w)
            print(f"| {mc} | {videos}x{frames}x{h}x{w} | {meta / 2**20:.2f} | {cpu / 2**20:.2f} |", flush=True)
    if args.released or not args.check:
        print("| model | latent (videos x frames x h x w) | peak activations GiB (fp32) | memory_usage_factor |")
        print("|---|---|---|---|", flush=True)
        unet = random_unet(320, "meta")
        for name, (h, w) in RELEASED.items():
            peak = measure(unet, 3, 16, h, w)
            print(f"| {name} | 3x16x{h}x{w} | {peak / 2**30:.2f} | {comfy_factor(peak, 3, 16, h, w):.3f} |", flush=True)


if __name__ == "__main__":
    main()
