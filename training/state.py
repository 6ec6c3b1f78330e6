"""Saving and restoring a run's training state: which tensors a checkpoint shards, the optimizer
layout that lets a resume allocate them first, and the resume checks against the run's config."""
from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from training import checkpoint as ck
from training.config import TrainConfig, config_changes, guarded
from training.optim import lr_factor

if TYPE_CHECKING:
    from training.distributed import Env
    from training.train import Trainee

log = logging.getLogger("training")


def check_resume(state: dict, cfg: TrainConfig, allow_config_change: bool, is_main: bool) -> None:
    """List every config change since the checkpoint; refuse those that change what the run
    trains unless allowed, and the global batch (it fixes the data order) always."""
    if state["global_batch"] != cfg.run.global_batch:
        raise ck.ResumeError(f"{state['path']} was trained with run.global_batch={state['global_batch']}; "
                             f"resuming with {cfg.run.global_batch} would change the data order. "
                             "Keep run.global_batch, or use a new run.run_dir")
    old = TrainConfig().to_dict()      # keys newer than the checkpoint count as their defaults
    for section, values in json.loads(state["config"]).items():
        old.setdefault(section, {}).update(values)
    changes = [c for c in config_changes(old, cfg.to_dict()) if c[0] != "run.global_batch"]
    if changes and is_main:
        log.warning("resuming with config changes: %s", "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes))
    refused = [c for c in changes if guarded(c[0])]
    if refused and not allow_config_change:
        raise ck.ResumeError(f"{state['path']} was trained with other settings ("
                             + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in refused)
                             + "); pass --allow-config-change to resume with them, or use a new run.run_dir")


def resume(cfg: TrainConfig, env: Env, t: Trainee, allow_config_change: bool) -> int:
    """Restore the newest complete checkpoint (every process the same one); the step to start from."""
    r = cfg.run
    state = ck.load_latest(r.run_dir)
    if env.world > 1:
        found = [None] * env.world
        dist.all_gather_object(found, None if state is None else state["step"])
        if len(set(found)) != 1:
            raise ck.ResumeError(f"processes see different checkpoints in {r.run_dir} (steps {found}): run_dir "
                                 "must be on a filesystem shared by every node")
    if state is None:
        return 0
    check_meta(state, cfg, t)
    check_resume(state, cfg, allow_config_change, env.is_main)
    restore(state, cfg, env, t)
    if env.is_main:
        log.info("resumed from %s (step %d)", state["path"], state["step"])
    return state["step"]


def checkpoint_tensors(t: Trainee) -> dict:
    """What a checkpoint shards, flat: ``trainable/<name>``, ``optim/<name>/<state key>`` (the
    tensors of each parameter's optimizer state) and ``ema/<name>``. Under FSDP each is this
    process's shard (a DTensor); otherwise the whole tensor, which every process holds alike."""
    out = {f"trainable/{n}": p.detach() for n, p in t.named}
    for n, p in t.named:
        for k, v in t.opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{n}/{k}"] = v
    if t.ema is not None:
        out.update({f"ema/{n}": v for n, v in t.ema.shadow.items()})
    return out


def optimizer_layout(t: Trainee) -> dict:
    """Per parameter, what its optimizer state holds, so a resume can allocate the state before
    reading its shards: tensors by shape and dtype ("like_param": shaped, so sharded, like the
    parameter), other values as they are."""
    layout = {}
    for n, p in t.named:
        entry = {}
        for k, v in t.opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                entry[k] = {"like_param": v.ndim > 0 and tuple(v.shape) == tuple(p.shape), "shape": list(v.shape),
                            "dtype": str(v.dtype).removeprefix("torch."), "on_cpu": v.device.type == "cpu"}
            else:
                entry[k] = {"value": v}
        layout[n] = entry
    return layout


def save(cfg: TrainConfig, env: Env, t: Trainee, step: int) -> None:
    """Collective: each process writes its own shards (ck.save_sharded); rank 0 the rest."""
    r = cfg.run
    rngs = [None] * env.world
    if env.world > 1:
        dist.all_gather_object(rngs, ck.rng_state())
    else:
        rngs = [ck.rng_state()]
    meta = {"step": step, "samples_seen": step * r.global_batch, "global_batch": r.global_batch, "stage": r.stage,
            "trainable": [n for n, _ in t.named], "scheduler": t.sched.state_dict(),
            "optimizer": {"param_groups": t.opt.state_dict()["param_groups"], "layout": optimizer_layout(t)},
            "ema": None if t.ema is None else {"decay": t.ema.decay, "num_updates": t.ema.num_updates},
            "rng": rngs, "world_size": env.world,
            "config": json.dumps(cfg.to_dict()), "model_config": json.dumps(t.dc.cfg.to_dict())}
    ck.save_sharded(checkpoint_tensors(t), meta, r.run_dir, step, env.rank,
                    barrier=dist.barrier if env.world > 1 else None)
    if env.is_main:
        ck.prune(r.run_dir, r.keep_last)


# optimizer state a checkpoint may hold per parameter: AdamW's, and bitsandbytes' AdamW8bit's
OPTIMIZER_STATE = {"adamw": {"step", "exp_avg", "exp_avg_sq"},
                   "adamw8bit": {"step", "state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2",
                                 "max1", "max2", "new_max1", "new_max2", "unorm_vec"}}
STATE_DTYPES = ("float32", "float16", "bfloat16", "uint8", "int8", "int32", "int64")


def _bad(meta: dict, why: str):
    raise ck.ResumeError(f"{meta.get('path', 'checkpoint')}: {why}; the checkpoint was not written by this "
                         "trainer for this run, refusing it")


def check_meta(meta: dict, cfg: TrainConfig, t: "Trainee") -> None:
    """Everything restore() uses from meta.pt, checked against the run's own config and model
    before anything is allocated from it; a mismatch names the field."""
    def want(key, types):
        if not isinstance(meta.get(key), types) or isinstance(meta.get(key), bool):
            _bad(meta, f"meta.pt field {key!r} is {type(meta.get(key)).__name__}")
        return meta[key]
    step = want("step", int)
    if not 0 <= step <= 1 << 40:
        _bad(meta, f"meta.pt step {step} is out of range")
    want("global_batch", int)
    try:
        stored = json.loads(want("config", str))
    except ValueError:
        stored = None
    if not (isinstance(stored, dict) and all(isinstance(v, dict) for v in stored.values())):
        _bad(meta, "meta.pt config is not the trainer's config")
    want("trainable", list)
    opt = want("optimizer", dict)
    layout = opt.get("layout")
    if not isinstance(layout, dict):
        _bad(meta, "meta.pt optimizer.layout is not a mapping")
    params = dict(t.named)
    unknown = [n for n in layout if n not in params]
    if unknown:
        _bad(meta, f"optimizer.layout names {unknown[0]!r}, not a trainable parameter of this run")
    allowed = OPTIMIZER_STATE[cfg.optim.name]
    for n, entry in layout.items():
        p = params[n]
        if not isinstance(entry, dict):
            _bad(meta, f"optimizer.layout[{n!r}] is not a mapping")
        for k, spec in entry.items():
            field = f"optimizer.layout[{n!r}][{k!r}]"
            if k not in allowed:
                _bad(meta, f"{field}: {cfg.optim.name} keeps no state {k!r}")
            if not isinstance(spec, dict):
                _bad(meta, f"{field} is not a mapping")
            if "value" in spec:
                if type(spec["value"]) not in (int, float):
                    _bad(meta, f"{field} value is {type(spec['value']).__name__}, not a number")
                continue
            if spec.get("dtype") not in STATE_DTYPES:
                _bad(meta, f"{field} dtype {spec.get('dtype')!r:.40} is none of {', '.join(STATE_DTYPES)}")
            if spec.get("like_param") is True:
                continue
            shape = spec.get("shape")
            if not (isinstance(shape, list) and len(shape) <= 8 and all(type(i) is int and i >= 0 for i in shape)):
                _bad(meta, f"{field} shape {shape!r:.60} is not a shape")
            if math.prod(shape) > max(p.numel(), 4096):     # scalars, 8-bit quantization maps and block maxima
                _bad(meta, f"{field} shape {shape} is larger than parameter {n!r} ({p.numel()} elements)")
    sched = meta.get("scheduler")
    if not isinstance(sched, dict) or sched.get("last_epoch") != step:
        _bad(meta, f"meta.pt scheduler.last_epoch is not the checkpoint's step {step}")
    ema = meta.get("ema")
    if ema is not None and not (isinstance(ema, dict) and type(ema.get("num_updates")) is int
                                and 0 <= ema["num_updates"] <= step):
        _bad(meta, f"meta.pt ema.num_updates is not a count of at most {step} updates")
    rngs = meta.get("rng")
    if not (isinstance(rngs, list) and rngs and all(ck.valid_rng_state(r) for r in rngs)):
        _bad(meta, "meta.pt rng holds no valid random generator states")


def restore(meta: dict, cfg: TrainConfig, env: "Env", t: "Trainee") -> None:
    """Collective: the checkpoint's shards into this process's parameters, optimizer and EMA
    (allocated as this run holds them, so another world size reshards), then the rest. What the
    file says is checked first (check_meta); hyper-parameters and flags come from the config."""
    names = [n for n, _ in t.named]
    if not isinstance(meta.get("trainable"), list) or set(meta["trainable"]) != set(names):
        raise ck.ResumeError(f"{meta['path']} trained a different parameter set ({len(meta['trainable'])} tensors "
                             f"vs {len(names)}); the stage or train_all setting changed. Use a new run_dir for a new "
                             "stage.")
    if t.ema is not None and meta.get("ema") is None:
        raise ck.ResumeError("EMA is on but the checkpoint has none; it was written with run.ema_decay=0")
    check_meta(meta, cfg, t)
    targets = {f"trainable/{n}": p.detach() for n, p in t.named}
    opt_state = {}
    for i, (n, p) in enumerate(t.named):
        state = {}
        for k, spec in meta["optimizer"]["layout"].get(n, {}).items():
            if "value" in spec:
                state[k] = spec["value"]
                continue
            dtype = getattr(torch, spec["dtype"])
            state[k] = targets[f"optim/{n}/{k}"] = (
                torch.zeros_like(p.detach(), dtype=dtype) if spec["like_param"]
                else torch.zeros(spec["shape"], dtype=dtype, device="cpu" if spec.get("on_cpu") else p.device))
        if state:
            opt_state[i] = state
    if t.ema is not None:
        targets.update({f"ema/{n}": v for n, v in t.ema.shadow.items()})
    ck.load_sharded(meta["path"], targets)
    # the run's own param_groups: lr, betas, eps, weight_decay and flags such as maximize are the config's
    t.opt.load_state_dict({"state": opt_state, "param_groups": t.opt.state_dict()["param_groups"]})
    step = meta["step"]
    t.sched.last_epoch, t.sched._step_count = step, step + 1
    o = cfg.optim
    t.sched.base_lrs = [o.lr] * len(t.opt.param_groups)
    for g in t.opt.param_groups:
        g.update(initial_lr=o.lr, lr=o.lr * lr_factor(step, cfg), betas=tuple(o.betas), eps=o.eps,
                 weight_decay=o.weight_decay)
    t.sched._last_lr = [g["lr"] for g in t.opt.param_groups]
    if t.ema is not None:
        t.ema.num_updates = meta["ema"]["num_updates"]
    rngs = meta["rng"]
    ck.set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
