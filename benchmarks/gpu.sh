#!/usr/bin/env bash
# One command for a lent GPU machine: install what is missing, run benchmarks/gpu_bench.py, and
# leave the table in benchmarks/gpu_results.md.
#   bash benchmarks/gpu.sh             # GPU: full sweep (256/512/1024, fp16/bf16/fp8, SDPA/xformers) + ComfyUI --lowvram
#   bash benchmarks/gpu.sh --dry-run   # CPU, tiny model: the same code end to end (tested in CI)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
if [[ " $* " != *" --dry-run "* ]]; then
    # a bare machine: the project's own set-up (venv with CUDA torch from the machine's index, ComfyUI tree)
    [[ -x "$PY" && -f .comfyui/main.py ]] || bash scripts/setup.sh </dev/null
    # xformers is optional: the sweep adds it when it imports
    "$PY" -c "import xformers" 2>/dev/null || timeout 120 "$PY" -m pip install -q xformers 2>/dev/null \
        || echo "xformers not installed: SDPA only"
fi
exec "$PY" benchmarks/gpu_bench.py "$@"
