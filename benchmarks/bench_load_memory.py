"""Resident memory of loading a full-size checkpoint: the library and the ComfyUI loader node.

A random full-size 512 checkpoint in the official layout (UNet, resampler, VAE, OpenCLIP-H text and
image towers: 10.4 GB in fp32) is written once as a Lightning `.ckpt`; then each load runs in a
fresh process, which prints its resident memory before loading, its peak (VmHWM) and its resident
memory after the load, and the bytes of the weights the load keeps. The figure that matters is
peak over kept: what a machine must have beyond the weights themselves.

    flock /tmp/dc-heavy.lock .venv/bin/python benchmarks/bench_load_memory.py [--dir DIR] [--modes library node]

Needs ~11 GB of disk and, for the fp32 node load, ~12 GB of RAM.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))     # gpu_bench.build: the random full-size model

DTYPES = {"fp32": (torch.float32, None), "fp16": (torch.float16, None), "bf16": (torch.bfloat16, None),
          "fp8_e4m3fn": (torch.float32, torch.float8_e4m3fn)}
GIB = 2 ** 30


def status(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    raise KeyError(field)


def make_checkpoint(path: Path) -> None:
    """Random full-size 512 weights (fp32), every part, as the official release's Lightning dict."""
    from gpu_bench import build

    from dynamicrafter.config import PRESETS, ModelConfig
    model = build(dataclasses.replace(ModelConfig(), variant=PRESETS["512"]), torch.device("cpu"),
                  torch.float32, torch.float32)
    tmp = path.with_suffix(".part")
    torch.save({"state_dict": model.state_dict()}, tmp)
    tmp.rename(path)


def kept_bytes(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def load_once(mode: str, dtype: str, path: Path, workdir: Path) -> dict:
    compute, weight = DTYPES[dtype]
    if mode == "library":
        import dynamicrafter
        before = status("VmRSS")
        t0 = time.perf_counter()
        dc = dynamicrafter.load_model(path, dtype=compute, weight_dtype=weight)
        seconds = time.perf_counter() - t0
        kept = kept_bytes(dc)
    else:
        import comfy_runtime
        base = comfy_runtime.make_base_dir(workdir / "comfy", models={"checkpoints": {path.name: path}})
        comfy = comfy_runtime.InProcessComfy(base, extra_args={"cpu": True})   # noqa: F841 (keeps ComfyUI up)
        from nodes_pack_access import pack
        gc.collect()
        before = status("VmRSS")
        t0 = time.perf_counter()
        model, clip, clip_vision, vae = pack("loader").DynamiCrafterLoader.execute(path.name, dtype, "auto")
        seconds = time.perf_counter() - t0
        kept = kept_bytes(model.model, clip.cond_stage_model, clip_vision.model, vae.first_stage_model)
    gc.collect()
    return {"mode": mode, "dtype": dtype, "seconds": seconds, "rss_before_gib": before,
            "peak_gib": status("VmHWM"), "after_gib": status("VmRSS"), "kept_gib": kept / GIB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(REPO / ".cache" / "bench_load"), help="where the 10.4 GB file goes")
    ap.add_argument("--modes", nargs="+", default=["library", "node"], choices=["library", "node"])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ckpt = Path(args.dir) / "dc_random_512.ckpt"
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(load_once(args.one[0], args.one[1], ckpt, Path(tmp))))
        return
    if not ckpt.exists():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        print(f"writing {ckpt} ...", flush=True)
        make_checkpoint(ckpt)
    print(f"full-size 512 checkpoint, random weights, fp32 .ckpt ({ckpt.stat().st_size / GIB:.1f} GiB); "
          "one fresh process per load; GiB")
    print("| load | dtype | seconds | RSS before | peak | after | weights kept | (peak - before) / kept |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for mode in args.modes:
        for dtype in args.dtypes:
            out = subprocess.run([sys.executable, __file__, "--dir", args.dir, "--one", mode, dtype],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(f"| {mode} | {dtype} | failed: {out.stderr.strip().splitlines()[-1]} |||||", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = (r["peak_gib"] - r["rss_before_gib"]) / r["kept_gib"]
            print(f"| {mode} | {dtype} | {r['seconds']:.1f} | {r['rss_before_gib']:.2f} | {r['peak_gib']:.2f} | "
                  f"{r['after_gib']:.2f} | {r['kept_gib']:.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
