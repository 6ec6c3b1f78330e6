"""Saving and restoring a run's training state: which tensors a checkpoint shards, the optimizer
layout that lets a resume allocate them first, and the resume checks against the run's config."""
from __future__ import annotations

import json
import logging
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


def restore(meta: dict, cfg: TrainConfig, env: Env, t: Trainee) -> None:
    """Collective: the checkpoint's shards into this process's parameters, optimizer and EMA
    (allocated as this run holds them, so another world size reshards), then the rest."""
    names = [n for n, _ in t.named]
    if set(meta["trainable"]) != set(names):
        raise ck.ResumeError(f"{meta['path']} trained a different parameter set ({len(meta['trainable'])} tensors "
                             f"vs {len(names)}); the stage or train_all setting changed. Use a new run_dir for a new "
                             "stage.")
    if t.ema is not None and meta["ema"] is None:
        raise ck.ResumeError("EMA is on but the checkpoint has none; it was written with run.ema_decay=0")
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
                else torch.zeros(spec["shape"], dtype=dtype, device="cpu" if spec["on_cpu"] else p.device))
        if state:
            opt_state[i] = state
    if t.ema is not None:
        targets.update({f"ema/{n}": v for n, v in t.ema.shadow.items()})
    ck.load_sharded(meta["path"], targets)
    t.opt.load_state_dict({"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]})
    t.sched.load_state_dict(meta["scheduler"])
    # the optimizer and scheduler states carry the old hyperparameters: the config's rule
    o = cfg.optim
    t.sched.base_lrs = [o.lr] * len(t.opt.param_groups)
    for g in t.opt.param_groups:
        g.update(initial_lr=o.lr, lr=o.lr * lr_factor(meta["step"], cfg), betas=tuple(o.betas), eps=o.eps,
                 weight_decay=o.weight_decay)
    t.sched._last_lr = [g["lr"] for g in t.opt.param_groups]
    if t.ema is not None:
        t.ema.decay, t.ema.num_updates = meta["ema"]["decay"], int(meta["ema"]["num_updates"])
    rngs = meta["rng"]
    ck.set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
