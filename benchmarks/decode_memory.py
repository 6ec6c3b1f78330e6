"""Peak activation memory of decoding 16 frames with the full-size SD VAE, with and without tiles.

Counted (dynamicrafter.memory.TensorMemory) on meta tensors: the live tensor bytes of the real
decode code path, without computing it; `--check` counts the same decode on CPU with random
weights at a small size and must agree. Frames are decoded one at a time (the decode node's
default `frames_per_batch` 1); the output video itself is included.

    .venv/bin/python benchmarks/decode_memory.py [--check]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dynamicrafter.config import PRESETS, ModelConfig  # noqa: E402
from tensor_memory import TensorMemory, fused_attention  # noqa: E402
from dynamicrafter.model import DynamiCrafter  # noqa: E402

SIZES = {"512x320": (40, 64), "1024x576": (72, 128)}
GIB = 2 ** 30


def vae_only_model(device: str) -> DynamiCrafter:
    cfg = dataclasses.replace(ModelConfig(), text=None, vision=None, resampler=None, variant=PRESETS["1024"])
    with torch.device("meta"):
        dc = DynamiCrafter(cfg)
    if device != "meta":                   # only the VAE gets memory; the UNet stays on meta
        dc.first_stage_model.to_empty(device=device)
        with torch.no_grad():
            for p in dc.first_stage_model.parameters():
                p.normal_(0, 0.02)
        dc.unet.time_embed[0].to_empty(device=device)     # where dc.decode takes its device from
    return dc.eval().requires_grad_(False)


def decode_peak(dc: DynamiCrafter, frames: int, h: int, w: int, tile) -> int:
    z = torch.randn(1, 4, frames, h, w, device=next(dc.first_stage_model.parameters()).device)
    with torch.no_grad(), fused_attention(), TensorMemory() as m:
        dc.decode(z, tile=tile)
    return m.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="meta count == CPU count at 2 frames of 24x40 latents")
    ap.add_argument("--frames", type=int, default=16)
    args = ap.parse_args()
    if args.check:
        for tile in (0, 16):
            meta = decode_peak(vae_only_model("meta"), 2, 24, 40, tile)
            cpu = decode_peak(vae_only_model("cpu"), 2, 24, 40, tile)
            print(f"check, tile {tile}: meta {meta / 2**20:.1f} MiB, CPU {cpu / 2**20:.1f} MiB")
    dc = vae_only_model("meta")
    print("| frames (decoded one at a time) | size | untiled peak GiB | tiled (auto: 64-latent tiles) peak GiB |")
    print("|---|---|---|---|")
    for name, (h, w) in SIZES.items():
        plain, tiled = decode_peak(dc, args.frames, h, w, 0), decode_peak(dc, args.frames, h, w, None)
        print(f"| {args.frames} | {name} | {plain / GIB:.2f} | {tiled / GIB:.2f} |")


if __name__ == "__main__":
    main()
