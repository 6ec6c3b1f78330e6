"""fp8 weights on the full-size 512 UNet (random weights, CPU): weight bytes and output error.

The same random UNet + resampler (seeded) is built with every weight in fp32, fp16, bf16 and with
the layer matrices stored in fp8 (as `load_model(weight_dtype=...)` stores them; biases and norms
in the compute dtype), all computed in fp32; one forward (16 frames of an 8x8 latent, one
guidance branch) is compared with the fp32 one: RMS error relative to the output's RMS, the
figure `tests/test_ops.py` bounds on the tiny reference model.

    .venv/bin/python benchmarks/fp8_full.py       (~8 GB of RAM, a few minutes)
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import build  # noqa: E402

from dynamicrafter.config import PRESETS, ModelConfig, ResamplerConfig  # noqa: E402

FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn,
           "fp8_e5m2": torch.float8_e5m2}


def forward(model, cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 8, 8, generator=g)
    concat = torch.randn(1, 4, 16, 8, 8, generator=g)
    tokens = torch.randn(1, 257, cfg.resampler.embedding_dim, generator=g)
    with torch.no_grad():
        ctx = model.image_context(tokens)
        text = torch.randn(1, 77, ctx.shape[-1], generator=g)
        return model.denoise(x, torch.tensor([500]), torch.cat([text, ctx], 1), concat=concat, fs=torch.tensor([24]))


def unet_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.unet.state_dict().values())


def main() -> None:
    torch.set_num_threads(1)
    cfg = dataclasses.replace(ModelConfig(vae=None, text=None, vision=None, resampler=ResamplerConfig(video_length=16)),
                              variant=PRESETS["512"])
    torch.manual_seed(0)
    fp32 = build(cfg, torch.device("cpu"), torch.float32, torch.float32)
    ref = forward(fp32, cfg)
    fp32_bytes = unet_bytes(fp32)
    del fp32
    print("full-size 512 UNet + resampler, random weights (N(0, 0.02)), fp32 compute on CPU")
    print("| weights | UNet bytes (GB) | vs fp16 | forward RMS error / output RMS |")
    print("|---|---|---|---|")
    print(f"| fp32 | {fp32_bytes / 1e9:.2f} | 2.00 | 0 |", flush=True)
    fp16_bytes = fp32_bytes / 2
    for name, dtype in FORMATS.items():
        torch.manual_seed(0)
        model = build(cfg, torch.device("cpu"), dtype, torch.float32)
        out = forward(model, cfg)
        rms = float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        b = unet_bytes(model)
        print(f"| {name} | {b / 1e9:.2f} | {b / fp16_bytes:.2f} | {rms:.4f} |", flush=True)
        del model


if __name__ == "__main__":
    main()
