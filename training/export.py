"""Consolidate a sharded training checkpoint into one .safetensors in the official key layout.

    python -m training.export runs/stage3 --out my_model.safetensors [--step 1200] [--dtype fp16] [--no-ema]
        [--defaults '{"cfg_text": 2.0}']

(A run with run.lora exports its LoRA file instead.)

The model is rebuilt the way the run built it (its stored config: init checkpoint or tiny
seed, stage preparation), then the checkpoint's trained tensors (EMA ones by default when the
run kept an EMA) are read from every process's shard file straight into it, in this one
process and whatever the number of processes that wrote them, and the whole model is written
with the library's writer, so `dynamicrafter.load_model` and the ComfyUI loader read it like
any released file. `--defaults` records sampling defaults the run's evaluation chose (text and
image guidance, guidance rescale, fs, DDIM spacing) in the metadata, beside the training size the
run records itself; the library, the CLI and the nodes' Variant Defaults then use them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Optional

from dynamicrafter.config import DTYPES
from dynamicrafter.model import DynamiCrafter
from dynamicrafter.checkpoints.metadata import MetadataError, parse_config_metadata
from training import checkpoint as ck
from training.config import TrainConfig
from training.modeling import build_model, export_safetensors, tiny_model_config


TINY_MAX_PARAMS = 200_000_000     # a model.tiny run's model (the demo's is ~10M parameters)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def trusted_config(meta: dict, run_dir: str, init: Optional[str] = None,
                   init_extra: Optional[list] = None) -> TrainConfig:
    """The run's config as the checkpoint stores it, but no file it names outside `run_dir` is
    read unless the user names the base model with --init / --init-extra, and a tiny model is
    sized within TINY_MAX_PARAMS before it is built."""
    try:
        cfg = TrainConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError, AttributeError) as e:
        raise ck.ResumeError(f"{meta['path']}: its stored run config is unusable ({e})") from None
    if init is not None:
        cfg.model.init = init
    elif cfg.model.init and not _inside(cfg.model.init, run_dir):
        raise ck.ResumeError(f"{meta['path']}: its config builds on model.init={cfg.model.init!r}, outside the run "
                             f"folder {run_dir}; export reads it only when you name it: pass --init PATH (the base "
                             "model you trust)")
    if init_extra is not None:
        cfg.model.init_extra = list(init_extra)
    outside = [p for p in cfg.model.init_extra if not _inside(p, run_dir)]
    if outside and init_extra is None:
        raise ck.ResumeError(f"{meta['path']}: its config reads model.init_extra={outside!r}, outside the run folder "
                             f"{run_dir}; pass --init-extra PATH... (the files you trust) to export it")
    if cfg.model.tiny:
        import torch
        overrides = {k: dict(v) for k, v in (cfg.model.tiny_overrides or {}).items()}
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in DynamiCrafter(tiny_model_config(cfg.data.frames, overrides)).parameters())
        except (ValueError, TypeError, KeyError) as e:
            raise ck.ResumeError(f"{meta['path']}: its config's model.tiny_overrides are unusable ({e})") from None
        if n > TINY_MAX_PARAMS:
            raise ck.ResumeError(f"{meta['path']}: its config's model.tiny_overrides make a {n / 1e6:.0f}M-parameter "
                                 f"model, not a tiny one (at most {TINY_MAX_PARAMS / 1e6:.0f}M); refusing to build it")
    return cfg


def model_from_checkpoint(meta: dict, use_ema: bool = True, run_dir: Optional[str] = None,
                          init: Optional[str] = None, init_extra: Optional[list] = None):
    """(model, run config) with the checkpoint's weights: `meta` from ck.load_latest/read_meta."""
    run_dir = run_dir or os.path.dirname(os.path.dirname(meta["path"]))
    cfg = trusted_config(meta, run_dir, init, init_extra)
    dc = build_model(cfg)
    params = dict(dc.named_parameters())
    missing = [n for n in meta["trainable"] if n not in params]
    if missing:
        raise ValueError(f"checkpoint tensors not in the rebuilt model: {missing[:3]}")
    source = "ema" if use_ema and meta.get("ema") is not None else "trainable"
    ck.load_sharded(meta["path"], {f"{source}/{n}": params[n].detach() for n in meta["trainable"]})
    return dc, cfg


SAMPLING_DEFAULTS = ("cfg_text", "cfg_img", "guidance_rescale", "default_fs", "spacing")


def set_sampling_defaults(dc, defaults: dict) -> None:
    """Write sampling defaults into the model's variant (its metadata on export); only the keys of
    SAMPLING_DEFAULTS: they change how the model is sampled by default, never what it computes."""
    unknown = sorted(set(defaults) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise SystemExit(f"error: --defaults takes {', '.join(SAMPLING_DEFAULTS)}; not {', '.join(unknown)}")
    cfg = dataclasses.replace(dc.cfg, variant=dataclasses.replace(dc.cfg.variant, **defaults))
    try:        # the checks a loader makes on the metadata, before anything is written
        parse_config_metadata(json.dumps(cfg.to_dict()))
    except MetadataError as e:
        raise SystemExit(f"error: --defaults: {e.key} {e.why}") from None
    dc.cfg = cfg


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--init", help="the base model the run started from, when its config names one outside "
                   "run_dir (export reads no file outside it that you did not name)")
    p.add_argument("--init-extra", nargs="*", help="the run's model.init_extra files, when outside run_dir")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even when the run kept an EMA")
    p.add_argument("--defaults", type=json.loads, default={},
                   help=f"sampling defaults for the metadata, JSON with keys among {', '.join(SAMPLING_DEFAULTS)}")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if a.step is None:
        try:
            meta = ck.load_latest(a.run_dir)
        except ck.ResumeError as e:       # e.g. a run folder of an older trainer version: one line, no traceback
            raise SystemExit(f"error: {e}") from None
        if meta is None:
            raise SystemExit(f"no complete checkpoint in {ck.checkpoint_dir(a.run_dir)}")
    else:
        path = ck.checkpoint_path(a.run_dir, a.step)
        if not os.path.isdir(path):
            raise SystemExit(f"no checkpoint {path}; complete ones: {[s for s, _ in ck.list_checkpoints(a.run_dir)]}")
        try:
            meta = ck.read_meta(path)
        except ck.ResumeError as e:
            raise SystemExit(f"error: {e}") from None
    try:
        dc, cfg = model_from_checkpoint(meta, use_ema=not a.no_ema, run_dir=a.run_dir, init=a.init,
                                        init_extra=a.init_extra)
    except ck.ResumeError as e:
        raise SystemExit(f"error: {e}") from None
    set_sampling_defaults(dc, a.defaults)
    ema = meta.get("ema") is not None and not a.no_ema
    weights = (f"EMA weights (decay {meta['ema']['decay']}) at step {meta['step']}" if ema
               else f"raw weights after {meta['step']} steps")
    if cfg.run.lora:      # a LoRA run exports its adapters (the lora_unet_* file), not the base model
        from training.lora import export_lora
        path = export_lora(dc, a.out, cfg.run.lora, a.dtype, weights)
    else:
        path = export_safetensors(dc, a.out, a.dtype, weights)
    print(path)
    return path


if __name__ == "__main__":
    main()
