"""The offline GPU check (scripts/gpu_check.sh) in its CPU dry run: it lists what a bare machine
needs (and the wheel command for what is missing), then runs every template it covers through
ComfyUI's executor with a tiny random model, saving PNG frames when PyAV is missing."""
from __future__ import annotations

import os
import subprocess

import pytest

import comfy_runtime
import gpu_check


def _run(tmp_path, *extra):
    cmd = ["bash", "scripts/gpu_check.sh", "--dry-run", "--workdir", str(tmp_path / "work"),
           "--out", str(tmp_path / "gpu_check.md"), *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run(cmd, cwd=comfy_runtime.REPO_ROOT, capture_output=True, text=True, timeout=1500,
                          env=env, stdin=subprocess.DEVNULL)


def test_a_missing_package_gets_its_wheel_command_and_stops_the_check(tmp_path):
    proc = _run(tmp_path, "--assume-missing", "einops")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    line = next(ln for ln in lines if ln.startswith("package einops:"))
    assert "MISSING" in line and "pip download --only-binary=:all: --python-version 3." in line
    assert "--platform manylinux2014_" in line and line.endswith("-d wheels 'einops>=0.7'")
    assert "package safetensors: ok" in proc.stdout and "package open_clip_torch: ok 3.3.0" in proc.stdout
    assert "pip install --no-index --find-links wheels 'einops>=0.7'" in proc.stdout
    assert not (tmp_path / "work" / "models").exists()          # stopped before building anything


def test_dry_run_runs_every_template_and_saves_png_frames_without_pyav(tmp_path):
    reason = comfy_runtime.comfy_missing_reason()
    if reason:
        pytest.skip(reason)
    proc = _run(tmp_path, "--assume-missing", "av")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "ComfyUI: ok" in out and "PyAV: missing, videos are saved as PNG frames" in out
    assert "package av: optional, not installed -> pip download" in out
    rows = {ln[:46].strip(): ln[46:] for ln in out.splitlines()}
    for tpl in gpu_check.TEMPLATES:
        expected = "skipped: needs PyAV" if tpl.needs_av else " s  peak n/a (CPU)  ok"
        assert expected in rows.get(tpl.label, ""), (tpl.label, out[-4000:])
    for name in gpu_check.LEFT_OUT:
        assert rows[name[:-5]].strip().startswith("skipped:")
    pngs = list((tmp_path / "work" / "comfy").rglob("output/**/*.png"))
    assert len(pngs) >= 16, len(pngs)                           # frames, not videos
    assert not list((tmp_path / "work" / "comfy").rglob("output/**/*.mp4"))
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("| ok |") == len(gpu_check.TEMPLATES) - 1
    assert "| 512 | fp8_e4m3fn | sdpa | dual |" in table          # benchmarks/gpu_bench.py's speed table
    n = len(gpu_check.TEMPLATES)
    assert f"gpu check: {n - 1}/{n} templates ran, 0 failed" in out
