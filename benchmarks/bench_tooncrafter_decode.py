"""ToonCrafter decode at full size (ch 128, mult 1,2,4,4; random weights, fp32, CPU): our
memory-lean decoder beside the official decoder's batching, same weights, same run.

    flock /tmp/dc-heavy.lock .venv/bin/python benchmarks/bench_tooncrafter_decode.py [--frames 16]

Each variant runs in its own process (peak RSS is per process): the official batching pushes the
whole clip through every layer at once (the temporal GroupNorms over all frames, every
intermediate of a layer alive together), ours keeps at most two clip-sized activations and runs
every per-frame operation a few frames at a time. Both decode the same (1, 4, T, 40, 64) latent
with the references of two 320x512 keyframes; the script prints time, peak RSS, the RSS before
decoding (weights, references) and the largest difference between the two outputs.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dynamicrafter.config import VAEConfig  # noqa: E402
from dynamicrafter.models.vae import ResnetBlock  # noqa: E402
from dynamicrafter.models.vae_dualref import AutoencoderKLDualref, RefCrossAttention  # noqa: E402

FULL = VAEConfig(ch=128, ch_mult=(1, 2, 4, 4), decoder="dualref", ref_attn_levels=(2, 3), ref_attn_inner=512)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 30


# ----------------------------------------------------------------------------- official batching

def official_video_resblock(block, x, t):
    """The official VideoResBlock on all b*T frames at once: spatial block, then the temporal
    branch on (b, C, T, H, W) with nn.GroupNorm over the 5-D tensor (fp32), then the blend."""
    xs = ResnetBlock.forward(block, x)
    v = xs.unflatten(0, (-1, t)).transpose(1, 2)
    ts = block.time_stack
    r = ts.out_layers(ts.in_layers(v))
    alpha = torch.sigmoid(block.mix_factor)
    out = alpha * (v + r) + (1.0 - alpha) * v
    return out.transpose(1, 2).flatten(0, 1)


def official_decode(dec, z, refs):
    t = z.shape[0]
    h = dec.conv_in(z)
    h = official_video_resblock(dec.mid.block_1, h, t)
    h = dec.mid.attn_1(h)
    h = official_video_resblock(dec.mid.block_2, h, t)
    for i in reversed(range(len(dec.up))):
        for block in dec.up[i].block:
            h = official_video_resblock(block, h, t)
        m = dec.attn_refinement[i]
        h = m(h, refs[i], chunk=t) if isinstance(m, RefCrossAttention) else m.add_to(h, refs[i], True, True)
        if hasattr(dec.up[i], "upsample"):
            h = dec.up[i].upsample(h)
    h = F.silu(dec.norm_out(h))
    h = dec.attn_refinement[-1].add_to(h, refs[-1], True, True)
    return dec.conv_out.mix_time(dec.conv_out(h))


# ----------------------------------------------------------------------------- one variant

def run_variant(mode: str, frames: int, out_path: str, threads: int, height: int = 320, width: int = 512) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = AutoencoderKLDualref(FULL).eval().requires_grad_(False)
    with torch.no_grad():
        for p in vae.parameters():        # small random weights keep activations in a sane range
            p.normal_(0, 0.02)
        for m in vae.modules():              # norms scale by 1 (zero scales would zero the output)
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
        g = torch.Generator().manual_seed(1)
        keys = torch.rand(2, 3, height, width, generator=g) * 2 - 1
        t0 = time.perf_counter()
        refs = vae.references(keys[:1], keys[1:])
        encode_s = time.perf_counter() - t0
        refs = [r[0] for r in refs]
        z = torch.randn(frames, 4, height // 8, width // 8, generator=g)
        before = current_rss_gib()
        t0 = time.perf_counter()
        video = vae.decode(z, refs) if mode == "ours" else official_decode(vae.decoder, z, refs)
        decode_s = time.perf_counter() - t0
    torch.save(video, out_path)
    return {"mode": mode, "frames": frames, "decode_s": decode_s, "encode_refs_s": encode_s,
            "peak_rss_gib": peak_rss_gib(), "rss_before_decode_gib": before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="320x512", help="HxW of the keyframes and frames")
    ap.add_argument("--variant", choices=["ours", "official"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        height, width = (int(v) for v in args.size.split("x"))
        print(json.dumps(run_variant(args.variant, args.frames, args.out, args.threads, height, width)))
        return
    results, outputs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("official", "ours"):
            path = str(Path(tmp) / f"{mode}.pt")
            proc = subprocess.run([sys.executable, __file__, "--variant", mode, "--frames", str(args.frames),
                                   "--threads", str(args.threads), "--size", args.size, "--out", path],
                                  capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            outputs.append(torch.load(path))
    diff = (outputs[0] - outputs[1]).abs().max().item()
    scale = outputs[0].abs().max().item()
    off, ours = results
    print(f"ToonCrafter decoder, full size, random weights, fp32, {args.threads} threads, "
          f"{args.frames} latent frames -> {args.frames} frames of {args.size}, with references")
    print(f"{'batching':<34}{'decode s':>10}{'peak RSS GiB':>14}{'RSS before GiB':>16}")
    for r, name in ((off, "official (whole clip per layer)"), (ours, "ours (chunked, 2 clip tensors)")):
        print(f"{name:<34}{r['decode_s']:>10.1f}{r['peak_rss_gib']:>14.2f}{r['rss_before_decode_gib']:>16.2f}")
    print(f"ours/official: time {ours['decode_s'] / off['decode_s']:.2f}x, peak RSS "
          f"{ours['peak_rss_gib'] / off['peak_rss_gib']:.2f}x; max|difference| {diff:.2e} (output max {scale:.2f})")


if __name__ == "__main__":
    main()
