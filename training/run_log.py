"""Rank 0's record of a run: log.jsonl (trimmed on resume), TensorBoard scalars, the progress bar,
and the static memory estimate printed at the start."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Optional

from training.config import TrainConfig

if TYPE_CHECKING:
    from training.distributed import Env
    from training.train import Trainee

log = logging.getLogger("training")


def memory_estimate(dc, cfg: TrainConfig, world: int = 1) -> dict:
    """GB held by weights, gradients and optimizer states (activations not included)."""
    gb = 1e9
    train_n = sum(p.numel() for p in dc.parameters() if p.requires_grad)
    frozen_b = sum(p.numel() * p.element_size() for p in dc.parameters() if not p.requires_grad)
    train_b = sum(p.numel() * p.element_size() for p in dc.parameters() if p.requires_grad)
    shard = world if cfg.run.distributed == "fsdp" else 1
    state_bytes = 2 if cfg.optim.name == "adamw8bit" else 8
    est = {"trainable_params_M": round(train_n / 1e6, 1), "trainable_weights": train_b / shard / gb,
           "gradients": train_b / shard / gb, "optimizer_states": train_n * state_bytes / shard / gb,
           "frozen_weights": frozen_b / gb, "ema": train_n * 4 / shard / gb if cfg.run.ema_decay > 0 else 0.0}
    est["total_static"] = sum(v for k, v in est.items() if k != "trainable_params_M")
    return {k: round(v, 3) for k, v in est.items()}


class JsonlLog:
    def __init__(self, path: str, resume_step: int):
        self.path = path
        if os.path.exists(path):   # drop records of steps the resumed run will redo
            with open(path) as fh:
                keep = [ln for ln in fh if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            with open(path, "w") as fh:
                fh.writelines(keep)
        self.fh = open(path, "a", buffering=1)

    def write(self, rec: dict) -> None:
        self.fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.fh.close()


def make_tensorboard(run_dir: str, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as err:  # noqa: BLE001 - optional dependency
        log.warning("TensorBoard logging off (%s); pip install tensorboard to enable it", err)
        return None
    return SummaryWriter(os.path.join(run_dir, "tensorboard"))


class Logger:
    """Rank 0's log.jsonl, TensorBoard and progress bar; a no-op on the other ranks."""

    def __init__(self, cfg: TrainConfig, env: Env, t: Trainee, step: int):
        r = cfg.run
        self.cfg, self.on = cfg, env.is_main
        self.jsonl = JsonlLog(os.path.join(r.run_dir, "log.jsonl"), step) if self.on else None
        self.tb = make_tensorboard(r.run_dir, r.tensorboard) if self.on else None
        self.bar = None
        if self.on and r.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=r.max_steps, initial=step, desc=f"stage {r.stage}", dynamic_ncols=True)
        self.window_t, self.window_samples = time.time(), 0
        if self.on:
            log.info("stage %d: %d trainable tensors, %.2fM parameters; world %d, micro-batch %d, accumulation %d",
                     r.stage, len(t.named), sum(p.numel() for p in t.params) / 1e6, env.world, r.micro_batch, env.accum)
            log.info("static memory estimate per process: %s", json.dumps(memory_estimate(t.dc, cfg, env.world)))

    def step(self, step: int, loss: float, lr: float) -> None:
        r = self.cfg.run
        self.window_samples += r.global_batch
        if not self.on:
            return
        rate = self.window_samples / max(time.time() - self.window_t, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", clips_per_s=f"{rate:.2f}")
        if step % r.log_every == 0 or step == r.max_steps:
            now = time.time()
            rec = {"step": step, "loss": loss, "lr": lr,
                   "samples_per_s": self.window_samples / max(now - self.window_t, 1e-9),
                   "samples_seen": step * r.global_batch, "time": now}
            self.write(rec, {"train/loss": loss, "train/lr": lr, "train/samples_per_s": rec["samples_per_s"]})
            self.window_t, self.window_samples = now, 0

    def write(self, rec: dict, scalars: Optional[dict] = None) -> None:
        if not self.on:
            return
        self.jsonl.write(rec)
        if self.tb is not None:
            for k, v in (scalars or {}).items():
                self.tb.add_scalar(k, v, rec["step"])

    def close(self) -> None:
        for h in (self.bar, self.jsonl, self.tb):
            if h is not None:
                h.close()
