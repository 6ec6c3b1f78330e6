#!/usr/bin/env bash
# The offline GPU check (scripts/gpu_check.py): for a bare GPU machine with no package registry.
# Uses this checkout's .venv when there is one, else the machine's own python3 ($PYTHON to choose);
# never installs anything: missing packages are listed with the `pip download` command to carry them.
#   bash scripts/gpu_check.sh              # GPU: every bundled template, 8 GB card, seconds + peak VRAM
#   bash scripts/gpu_check.sh --dry-run    # CPU, tiny random model: the same code path (CI)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
