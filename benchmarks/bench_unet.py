"""Speed and memory of the full-size 512 UNet on this machine (random weights, fp32).

Prints: one UNet forward (16 frames, 40x64 latent) time, its exact FLOP count and achieved
GFLOP/s next to this machine's fp32 matmul GFLOP/s measured in the same run, peak RSS and
activation memory (peak minus resident weights), then the same for one dual-CFG DDIM step
(three guidance branches). Run:  .venv/bin/python benchmarks/bench_unet.py [--frames 16 --latent 40 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamicrafter.config import ModelConfig, ResamplerConfig  # noqa: E402
from dynamicrafter.model import DynamiCrafter  # noqa: E402
from dynamicrafter.sampling.ddim import Conditioning, sample_ddim  # noqa: E402
from dynamicrafter.settings import Guidance, Schedule  # noqa: E402

GIB = 1024 ** 3


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:   # "5" resets VmHWM to the current RSS
        f.write("5")


def matmul_gflops(n: int = 2048, repeats: int = 8) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e9


def count_flops(model_cfg, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        meta = DynamiCrafter(model_cfg)
    meta_inputs = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta.denoise(*meta_inputs)
    return counter.get_total_flops()


def build(model_cfg) -> DynamiCrafter:
    """Random weights without paying for nn.init on 1.4B parameters: allocate, then fill."""
    from dynamicrafter.sampling.schedule import schedule_buffers
    with torch.device("meta"):
        model = DynamiCrafter(model_cfg)
    model = model.to_empty(device="cpu")
    v = model_cfg.variant
    schedule = schedule_buffers(v.zero_snr, v.parameterization, v.dynamic_rescale_base)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for name, buf in model.named_buffers():
            buf.copy_(schedule[name])
    return model.eval().requires_grad_(False)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--latent", type=int, nargs=2, default=(40, 64))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-cfg", action="store_true", help="only the single forward")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = ModelConfig(vae=None, text=None, vision=None, resampler=ResamplerConfig(video_length=args.frames))
    t0 = time.perf_counter()
    model = build(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"built full-size 512 UNet + resampler ({weights / GIB:.2f} GiB of weights) "
          f"in {time.perf_counter() - t0:.0f}s")

    f, (h, w) = args.frames, args.latent
    x = torch.randn(1, 4, f, h, w)
    concat = torch.randn(1, 4, f, h, w)
    ctx = [torch.randn(1, 77 + 16 * f, 1024) for _ in range(3)]
    t = torch.tensor([999])
    fs = torch.tensor([24])
    flops = count_flops(cfg, (x, t, ctx[0], concat, fs))
    gflops_mm = matmul_gflops()
    print(f"fp32 matmul throughput here: {gflops_mm:.1f} GFLOP/s ({args.threads} threads)")
    print(f"one UNet forward: {flops / 1e12:.2f} TFLOP")

    base = rss_bytes()
    reset_peak_rss()
    with torch.inference_mode():
        t1 = time.perf_counter()
        model.denoise(x, t, ctx[0], concat, fs)
        fwd = time.perf_counter() - t1
    fwd_peak = peak_rss_bytes()
    res = dict(frames=f, latent=[h, w], threads=args.threads, weights_gib=weights / GIB, tflop=flops / 1e12,
               matmul_gflops=gflops_mm, forward_s=fwd, forward_gflops=flops / fwd / 1e9,
               forward_peak_rss_gib=fwd_peak / GIB, forward_activation_gib=(fwd_peak - base) / GIB)
    print(f"forward: {fwd:.1f}s, {flops / fwd / 1e9:.1f} GFLOP/s = {flops / fwd / 1e9 / gflops_mm:.0%} of matmul; "
          f"peak RSS {fwd_peak / GIB:.2f} GiB, activations {(fwd_peak - base) / GIB:.2f} GiB")

    fwd_act = fwd_peak - base
    if not args.skip_cfg:
        base = rss_bytes()
        reset_peak_rss()
        with torch.inference_mode():
            t1 = time.perf_counter()
            sample_ddim(model, x, Conditioning(ctx[0], ctx[1], ctx[2], concat=concat, fs=fs),
                        guidance=Guidance(7.5, 1.5, 0.7), schedule=Schedule(1))
            step = time.perf_counter() - t1
        step_peak = peak_rss_bytes()
        res.update(cfg_step_s=step, cfg_step_peak_rss_gib=step_peak / GIB,
                   cfg_step_activation_gib=(step_peak - base) / GIB)
        print(f"dual-CFG DDIM step (3 branches): {step:.1f}s = {step / fwd:.2f}x forward; peak RSS "
              f"{step_peak / GIB:.2f} GiB, activations {(step_peak - base) / GIB:.2f} GiB "
              f"= {(step_peak - base) / max(fwd_act, 1):.2f}x forward")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
