#!/usr/bin/env bash
# The README's main job: install what is needed, then animate an image through the bundled
# image-to-video workflow in the real ComfyUI executor and print where the mp4 is.
#
#   bash scripts/demo.sh [--ckpt FILE] [--image FILE] [--prompt TEXT] [--out FILE.mp4] [--steps N]
#
# Without --ckpt it runs the demo template (workflows/DynamiCrafter demo.json) on the bundled demo
# model (assets/demo/, trained by training/ on synthetic clips), at the size, length and guidance
# its metadata carries; with a real DynamiCrafter checkpoint it runs the image-to-video template:
# pass --width/--height/--frames to suit it (e.g. --width 512 --height 320 --frames 16 for 512).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CKPT="" IMAGE="assets/example.png" PROMPT="a red circle moves to the right" OUT="outputs/demo.mp4"
EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --ckpt) CKPT="$2"; shift 2 ;;
        --image) IMAGE="$2"; shift 2 ;;
        --prompt) PROMPT="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --steps|--width|--height|--frames) EXTRA+=("$1" "$2"); shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

bash scripts/setup.sh </dev/null

WORKFLOW="workflows/DynamiCrafter image to video.json"
SIZE=()
if [[ -z "$CKPT" ]]; then
    if [[ -f assets/demo/dynamicrafter_demo.safetensors ]]; then
        CKPT="assets/demo/dynamicrafter_demo.safetensors"
        WORKFLOW="workflows/DynamiCrafter demo.json"
    elif [[ -f ../shared/reference/tiny_v/model.safetensors ]]; then
        CKPT="../shared/reference/tiny_v/model.safetensors"
        echo "[demo] no demo model in assets/demo/ yet: using the random-weight reference checkpoint" \
             "(the pipeline runs end to end; the video is noise)" >&2
        SIZE=(--width 64 --height 64 --frames 8 --steps 25)
    else
        echo "[demo] no checkpoint: pass --ckpt /path/to/dynamicrafter_512.ckpt" >&2
        exit 2
    fi
fi

.venv/bin/python scripts/run_workflow.py "$WORKFLOW" \
    --ckpt "$CKPT" --image "$IMAGE" --prompt "$PROMPT" --out "$OUT" "${SIZE[@]}" "${EXTRA[@]}"
case "$OUT" in /*) echo "$OUT" ;; *) echo "$ROOT/$OUT" ;; esac
