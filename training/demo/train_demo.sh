#!/usr/bin/env bash
# Reproduces the bundled demo model (assets/demo/dynamicrafter_demo.safetensors) from scratch
# with this repository's trainer: synthetic clips -> small VAE -> small CLIP towers -> stage 1 -> 2 -> 3
# -> 3 continued three times (3b, 3c, and 3d on clips that start in a corner) -> fp16 export -> held-out
# evaluation -> the README's demo command, its frame strip and the bundled workflow over 16 seeds.
# Everything is seeded; on 2 CPU cores it took 164 minutes of training + about 16 of evaluation
# and checks (README "Demo model").
#
#   bash training/demo/train_demo.sh            # whole chain, then evaluate
#   S3_STEPS=6000 bash training/demo/train_demo.sh   # longer stage 3
#
# Intermediate data lives in data/demo/ and runs/demo/ (git-ignored). A finished stage is not
# rerun (its model.safetensors exists); an interrupted one resumes from its last checkpoint.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-.venv/bin/python}"
S1_STEPS="${S1_STEPS:-150}" S2_STEPS="${S2_STEPS:-100}" S3_STEPS="${S3_STEPS:-3000}" S3b_STEPS="${S3b_STEPS:-2000}"
S3c_STEPS="${S3c_STEPS:-2500}" S3d_STEPS="${S3d_STEPS:-2500}"
VAE_STEPS="${VAE_STEPS:-1500}" CLIP_STEPS="${CLIP_STEPS:-600}"
# the demo's default guidance, chosen by the held-out evaluation (README "Demo model"): text-only
# guidance (dual CFG at image scale 1: the image tokens in both branches) at a low scale keeps this
# small model's first frame and object; it says so in its metadata
DEMO_CFG="${DEMO_CFG:-2.0}" DEMO_CFG_IMG="${DEMO_CFG_IMG:-1.0}"
OUT="assets/demo/dynamicrafter_demo.safetensors"
log() { echo "[train_demo $(date +%H:%M:%S)] $*"; }

# 1. data: 2000 training clips and 96 held-out clips (different seeds), 64x64, 16 frames at 24 fps
#    (the trainer conditions on fs = fps = 24, the workflow's default); for stage 3d, 4000 more
#    training clips, half of them starting in a corner, where only the caption tells the axis
if [[ ! -f data/demo/train/captions.csv ]]; then
    log "synthetic data"
    "$PY" -m training.synthetic --out data/demo/train --n 2000 --size 64 --frames 16 --fps 24 --seed 1000
fi
if [[ ! -f data/demo/heldout/captions.csv ]]; then
    "$PY" -m training.synthetic --out data/demo/heldout --n 96 --size 64 --frames 16 --fps 24 --seed 2000
fi
if [[ ! -f data/demo/train_corner/captions.csv ]]; then
    "$PY" -m training.synthetic --out data/demo/train_corner --n 4000 --size 64 --frames 16 --fps 24 --seed 3000 \
        --corner-share 0.5
fi

# 2. the small KL-f8 VAE (64x64 frames -> 4x8x8 latents)
if [[ ! -f runs/demo/vae.safetensors ]]; then
    log "VAE ($VAE_STEPS steps)"
    "$PY" -m training.pretrain_vae --csv data/demo/train/captions.csv --out runs/demo/vae.safetensors --size 64 \
        --steps "$VAE_STEPS" --batch 16 --lr 4e-4 --vae '{"ch": 32, "ch_mult": [1,2,2,2], "num_res_blocks": 1, "norm_groups": 8}'
fi

# 3. small CLIP towers (the tiny model's text and image towers, open_clip architecture) trained
#    contrastively on frames and captions of the same clips, so the context stream carries the image
if [[ ! -f runs/demo/clip.safetensors ]]; then
    log "CLIP towers ($CLIP_STEPS steps)"
    "$PY" -m training.pretrain_clip --csv data/demo/train/captions.csv --out runs/demo/clip.safetensors \
        --steps "$CLIP_STEPS" --batch 128
fi

# 4. the three stages (stage 1 builds the tiny model around the VAE and CLIP towers, which stay
#    frozen), stage 3 continued three times (3b, 3c; 3d on the corner clips)
for s in 1 2 3 3b 3c 3d; do
    steps_var="S${s}_STEPS"
    if [[ ! -f "runs/demo/stage$s/model.safetensors" ]]; then
        log "stage $s (${!steps_var} steps)"
        "$PY" -m training.train "training/configs/demo_stage$s.yaml" "run.max_steps=${!steps_var}"
    fi
done

# 5. fp16 export (EMA weights) for the node pack, its config in the file's metadata
mkdir -p assets/demo
"$PY" -m training.export runs/demo/stage3d --out "$OUT" --dtype fp16 --init runs/demo/stage3c/model.safetensors \
    --defaults "{\"cfg_text\": $DEMO_CFG, \"cfg_img\": $DEMO_CFG_IMG}"
"$PY" -c "import json, sys; from safetensors import safe_open
m = json.loads(safe_open(sys.argv[1], 'pt').metadata()['dynamicrafter_config'])
json.dump(m, open(sys.argv[2], 'w'), indent=1)" "$OUT" "${OUT%.safetensors}.json"
log "exported $OUT ($(du -h "$OUT" | cut -f1)) and its config ${OUT%.safetensors}.json"
"$PY" scripts/make_workflows.py      # the demo template takes its size, length, fs and guidance from that config

# 6. held-out evaluation (all 96 held-out clips, 16 seeds on the first 8) -> assets/demo/eval.json
"$PY" training/demo/evaluate.py --ckpt "$OUT" --csv data/demo/heldout/captions.csv --out assets/demo/eval.json

# 7. the README's main command and its frame strip; the bundled workflow over 16 seeds in ComfyUI
bash scripts/demo.sh --out outputs/demo.mp4
"$PY" training/demo/frame_strip.py outputs/demo.mp4 assets/demo/demo_strip.png --scale 2 --per-row 8
"$PY" training/demo/workflow_seeds.py --seeds 16 --out assets/demo/workflow_seeds.json
