"""The GPU benchmark's command runs end to end in its CPU dry-run mode (tiny model, 1 step)."""
from __future__ import annotations

import os
import subprocess

import comfy_runtime


def test_gpu_benchmark_dry_run(tmp_path):
    reason = comfy_runtime.comfy_missing_reason()
    out = tmp_path / "gpu_results.md"
    cmd = ["bash", "benchmarks/gpu.sh", "--dry-run", "--out", str(out), "--workdir", str(tmp_path / "work")]
    if reason:
        cmd.append("--skip-comfy")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, cwd=comfy_runtime.REPO_ROOT, capture_output=True, text=True, timeout=1200,
                          env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 256 |") and line.count("|") == 8]
    assert len(rows) == 6, table            # fp16 / bf16 / fp8 weights x single / dual CFG
    assert all("11.9 / 10" in r for r in rows)
    assert {r.split("|")[2].strip() for r in rows} == {"fp16", "bf16", "fp8_e4m3fn"}
    if not reason:
        assert "ComfyUI executor, --lowvram" in table
    # the speed sweep: eager and each fast path (fp8 products: fp8 weights only) forwards for 1-3
    # branches with TFLOP/s and the fraction of the matmul rate measured in the same run; DDIM
    # single/dual and the fast solver per path
    paths = ("eager", "fused", "channels_last", "compiled", "all")
    forward = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| 256 | fp16 |")
               and line.count("|") == 11]
    assert {(r[2].strip(), r[3].strip()) for r in forward} == {(p, str(b)) for p in paths
                                                               for b in (1, 2, 3)}, table
    for r in forward:
        seconds, tflop, tflops, fraction = (float(r[i]) for i in (4, 5, 6, 7))
        assert seconds > 0 and tflop > 0 and abs(tflops - tflop / seconds) <= 0.01 * tflops and fraction > 0
    assert all(r[9].strip() != "n/a" for r in forward if r[2].strip() in ("compiled", "all"))  # first compile
    videos = [line for line in table.splitlines() if line.startswith("| 256 | fp16 |") and line.count("|") == 10]
    assert {tuple(c.strip() for c in v.split("|")[3:5]) for v in videos} == {
        (p, s) for p in paths for s in ("ddim", "dpmpp_2m")}, table
