"""Measure the UNet's peak activation memory per latent element (the data for a memory estimate).

One no-grad forward of a randomly initialised UNet in the released layout (channel_mult 1,2,4,4,
64-channel heads, image cross-attention, temporal layers) on CPU in fp32, at small sizes where the
UNet's block slicing is not active, counting live tensor bytes with dynamicrafter.memory.TensorMemory.
Prints, per case, the peak, and peak / (model_channels x videos x frames x h x w x 4 bytes).

    .venv/bin/python benchmarks/memory_estimate.py [--channels 64 128] [--full]

--full also measures model_channels=320 (the released width, ~5.6 GB of fp32 weights: run it
under `flock /tmp/dc-heavy.lock` on a shared machine).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynamicrafter.config import UNetConfig  # noqa: E402
from dynamicrafter.memory import TensorMemory  # noqa: E402
from dynamicrafter.unet import UNet3D  # noqa: E402

def random_unet(model_channels: int) -> UNet3D:
    cfg = dataclasses.replace(UNetConfig(), model_channels=model_channels)
    with torch.device("meta"):
        unet = UNet3D(cfg)
    unet = unet.to_empty(device="cpu")
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.02)
    return unet.eval().requires_grad_(False)


def measure(unet: UNet3D, videos: int, frames: int, h: int, w: int) -> int:
    """Peak live activation bytes of one forward: 1 latent video, `videos` guidance branches."""
    cfg = unet.cfg
    x = torch.randn(1, cfg.in_channels, frames, h, w)
    context = torch.randn(videos, 77 + 16 * frames, cfg.context_dim)
    with torch.no_grad(), TensorMemory() as m:
        unet(x, torch.tensor([500]), context, fs=torch.tensor([24]))
    return m.peak


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--full", action="store_true", help="also model_channels=320 (5.6 GB of weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=["1x8x8x8", "3x8x8x8", "3x16x8x8", "3x16x8x16"],
                    help="videos x frames x h x w (latent) per forward")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    channels = list(args.channels) + ([320] if args.full else [])
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases]
    print("| model_channels | videos x frames x h x w | peak MiB | bytes / (element x channel x 4) |")
    print("|---|---|---|---|", flush=True)
    for mc in channels:
        unet = random_unet(mc)
        for videos, frames, h, w in cases:
            peak = measure(unet, videos, frames, h, w)
            per = peak / (mc * videos * frames * h * w * 4)
            print(f"| {mc} | {videos}x{frames}x{h}x{w} | {peak / 2**20:.1f} | {per:.2f} |", flush=True)
        del unet


if __name__ == "__main__":
    main()
