"""Convert a training checkpoint to one .safetensors in the official key layout.

    python -m training.export runs/stage3 --out my_model.safetensors [--step 1200] [--dtype fp16] [--no-ema]

(A run with run.lora exports its LoRA file instead.)

The model is rebuilt the way the run built it (its stored config: init checkpoint or tiny
seed, stage preparation), then the checkpoint's trained tensors (EMA ones by default when the
run kept an EMA) are put in, and the whole model is written with the library's writer, so
`dynamicrafter.load_model` and the ComfyUI loader read it like any released file.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from dynamicrafter.config import DTYPES
from training import checkpoint as ck
from training.config import TrainConfig
from training.modeling import build_model, export_safetensors


def model_from_checkpoint(state: dict, use_ema: bool = True):
    cfg = TrainConfig.from_dict(json.loads(state["config"]))
    dc = build_model(cfg)
    params = dict(dc.named_parameters())
    source = state["trainable"]
    if use_ema and state.get("ema") is not None:
        source = state["ema"]["shadow"]
    missing = [n for n in source if n not in params]
    if missing:
        raise ValueError(f"checkpoint tensors not in the rebuilt model: {missing[:3]}")
    with torch.no_grad():
        for n, v in source.items():
            params[n].copy_(v.to(params[n].dtype))
    return dc, cfg


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even when the run kept an EMA")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if a.step is None:
        state = ck.load_latest(a.run_dir)
        if state is None:
            raise SystemExit(f"no complete checkpoint in {ck.checkpoint_dir(a.run_dir)}")
    else:
        state = ck.load_checkpoint(ck.checkpoint_path(a.run_dir, a.step))
    dc, cfg = model_from_checkpoint(state, use_ema=not a.no_ema)
    ema = state.get("ema") is not None and not a.no_ema
    weights = (f"EMA weights (decay {state['ema']['decay']}) at step {state['step']}" if ema
               else f"raw weights after {state['step']} steps")
    if cfg.run.lora:      # a LoRA run exports its adapters (the lora_unet_* file), not the base model
        from training.lora import export_lora
        path = export_lora(dc, a.out, cfg.run.lora, a.dtype, weights)
    else:
        path = export_safetensors(dc, a.out, a.dtype, weights)
    print(path)
    return path


if __name__ == "__main__":
    main()
