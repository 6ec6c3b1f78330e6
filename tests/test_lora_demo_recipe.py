"""The LoRA recipe for the bundled demo model (training/configs/lora_demo.yaml, README): it trains
as written (only the data and the length overridden here) and exports a LoRA that a ComfyUI
running as another user can read (0644 whatever the umask)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RECIPE = os.path.join(ROOT, "training", "configs", "lora_demo.yaml")
DEMO = os.path.join(ROOT, "assets", "demo", "dynamicrafter_demo.safetensors")


def test_demo_lora_recipe_trains_and_exports_a_readable_lora(tmp_path):
    if not os.path.isfile(DEMO):
        pytest.skip(f"{DEMO} not found")
    from safetensors import safe_open

    from training import synthetic
    from training.config import load_config
    cfg = load_config(RECIPE)
    assert cfg.model.init == "assets/demo/dynamicrafter_demo.safetensors" and cfg.run.lora
    assert (cfg.data.height, cfg.data.width, cfg.data.frames) == (64, 64, 16)   # the demo model's own size
    csv = synthetic.generate_dataset(str(tmp_path / "data"), 2, height=64, width=64, frames=16, seed=3)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "training.train", RECIPE, f"data.csv={csv}", f"run.run_dir={run}",
                        "run.max_steps=2", "run.save_every=2", "run.global_batch=1", "run.micro_batch=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                       preexec_fn=lambda: os.umask(0o077))       # a private umask: the export must still be 0644
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])["export"]
    assert out.endswith("lora.safetensors") and stat.S_IMODE(os.stat(out).st_mode) == 0o644
    with safe_open(out, "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
