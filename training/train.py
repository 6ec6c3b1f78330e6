"""Headless DynamiCrafter training: ``python -m training.train CONFIG [section.key=value ...]``.

Single process, or ``torchrun --nproc_per_node=N -m training.train CONFIG`` (DDP, or FSDP
with run.distributed=fsdp). A run directory holds everything: the resolved config,
``log.jsonl``, TensorBoard events, ``checkpoints/step_*/`` (sharded, atomic, keep-last-K), sample
videos and the exported ``model.safetensors``. Starting again with the same run_dir resumes
exactly from the newest complete checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from training import checkpoint as ck
from training.config import ConfigError, TrainConfig, load_config
from training.data import DatasetError, StreamSampler, collate, make_dataset, shared_records
from training.distributed import Env, all_mean, broadcast_from_rank0, setup_distributed, shard_fsdp
from training.evaluation import evaluate, train_mode, validation_items, validation_loss  # noqa: F401 (re-exported)
from training.lora import export_lora
from training.modeling import (DTYPES, EMA, InitError, build_model, cast_frozen, enable_gradient_checkpointing,
                               export_safetensors)
from training.optim import lr_factor, make_optimizer
from training.run_log import Logger
from training.stages import StageError, StageSettings, apply_trainable, sample_generator, stage_loss, trainable_names
from training.state import resume, save

log = logging.getLogger("training")


class TrainStep(torch.nn.Module):
    """The model + the stage's loss as one module, so DDP/FSDP see a single forward."""

    def __init__(self, dc, settings: StageSettings, autocast):
        super().__init__()
        self.dc = dc
        self.settings = settings
        self.autocast = autocast

    def forward(self, batch):
        # The UNet's own randomness (dropout 0.1 in the temporal convolutions, as the official
        # model) is drawn from the global RNG: reseed it from the micro-batch's first stream index
        # so it depends only on which samples a micro-batch holds (exact resume; same result on
        # any number of processes for the same micro-batch size).
        torch.manual_seed(int(sample_generator(self.settings.seed, int(batch["index"][0]), tag=1).initial_seed()))
        return stage_loss(self.dc, batch, self.settings, self.autocast())


def names_to_train(dc, cfg: TrainConfig) -> list[str]:
    if cfg.run.lora:       # the adapters only: UNet, Resampler and encoders frozen
        return [n for n, _ in dc.named_parameters() if ".lora_" in n]
    return trainable_names(dc, cfg.run.stage, cfg.run.train_all, camera=cfg.run.camera)


# --------------------------------------------------------------------------------- phases

@dataclass
class Trainee:
    """The model as trained: `model` is what the loop calls (TrainStep, maybe DDP-wrapped), `named`
    the trainable (name, parameter) pairs after any FSDP sharding."""
    dc: torch.nn.Module
    model: torch.nn.Module
    named: list
    manual_sync: list          # parameters whose gradients we average ourselves (FSDP cannot shard 0-dim ones)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: Optional[EMA]

    @property
    def params(self) -> list:
        return [p for _, p in self.named]


def setup(cfg: TrainConfig) -> Env:
    """Processes and device; rank 0 prepares the run directory."""
    r = cfg.run
    rank, world, device = setup_distributed(r.device)
    os.makedirs(r.run_dir, exist_ok=True)
    if rank == 0:
        ck.remove_stale_temporaries(r.run_dir)
        with open(os.path.join(r.run_dir, "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=2)
    return Env(rank, world, device, r.precision == "bf16", cfg.accumulation(world))


def build_trainee(cfg: TrainConfig, env: Env) -> Trainee:
    """Model, trainable set, DDP or FSDP wrapping, optimizer, LR schedule and EMA."""
    r = cfg.run
    torch.manual_seed(r.seed)
    dc = build_model(cfg)
    apply_trainable(dc, names_to_train(dc, cfg))
    dc.to(env.device)
    if cfg.model.frozen_dtype != "fp32":
        cast_frozen(dc, DTYPES[cfg.model.frozen_dtype])
    if r.grad_checkpointing:
        enable_gradient_checkpointing(dc.unet)
    settings = StageSettings(stage=r.stage, seed=r.seed, uncond_prob=cfg.data.uncond_prob,
                             cond_frame=r.cond_frame, interp_prob=r.interp_prob, camera=r.camera)
    module = TrainStep(dc, settings, env.autocast)
    manual_sync = []
    if env.world > 1 and r.distributed == "fsdp":
        model, manual_sync = module, shard_fsdp(dc)    # the encoders stay whole (frozen, no gradients to share)
    elif env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[env.device.index] if env.device.type == "cuda" else None, broadcast_buffers=False)
    else:
        model = module
    named = [(n, p) for n, p in dc.named_parameters() if p.requires_grad]   # after FSDP swapped in its shards
    opt = make_optimizer([p for _, p in named], cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = EMA(named, r.ema_decay) if r.ema_decay > 0 else None
    return Trainee(dc, model, named, manual_sync, opt, sched, ema)


@dataclass
class Data:
    videos: torch.utils.data.Dataset   # decoded clips (eval samples take their first frames)
    batches: Iterator                  # this process's micro-batches from the resume step on
    val_items: list                    # held-out clips for the validation loss


def make_data(cfg: TrainConfig, env: Env, dc, step: int) -> Data:
    """The stream of micro-batches from `step` on (videos, or the latent cache), and the held-out clips."""
    r = cfg.run
    frames = 1 if r.stage == 1 else cfg.data.frames
    tokens_for = dc.image_proj_model.cfg.video_length
    if r.stage != 1 and frames != tokens_for and env.is_main:
        log.warning("data.frames=%d but the Resampler makes image tokens for %d frames: every frame will attend "
                    "to all image tokens instead of its own 16 (as the official model does at other lengths)",
                    frames, tokens_for)
    fs_meaning = cfg.data.fs_meaning or dc.variant.get("fs_meaning", "frame_stride")
    share = broadcast_from_rank0 if env.world > 1 else None
    records = shared_records(cfg.data.csv, cfg.data.video_dir, env.rank, share)
    if r.camera:
        check_camera_records(records, cfg.data.csv)
    data_kw = dict(frames=frames, height=cfg.data.height, width=cfg.data.width, max_stride=cfg.data.max_stride,
                   fs_meaning=fs_meaning, fps_max=cfg.data.fps_max, seed=r.seed)
    dataset = videos = make_dataset(cfg.data.csv, records=records, **data_kw)
    if cfg.data.cache_dir:
        from training.cache import Cache, CachedDataset
        cache = Cache(cfg.data.cache_dir, dc, cfg.data.height, cfg.data.width)
        dc.eval()
        built = cache.build(dc, records, env.rank, env.world)
        if env.world > 1:
            dist.barrier()
        if env.is_main:
            log.info("cache %s: %d videos encoded now, %d listed", cache.dir, built, len(records))
        dataset = CachedDataset(records, cache, source=cfg.data.csv, **data_kw)
    val_items = []
    if cfg.eval.val_every:
        val_records = shared_records(cfg.data.val_csv, cfg.data.video_dir, env.rank, share)
        if r.camera:
            check_camera_records(val_records, cfg.data.val_csv)
        val_items = validation_items(cfg, fs_meaning, val_records)
    sampler = StreamSampler(r.micro_batch, env.accum, env.rank, env.world, start_step=step)
    loader = torch.utils.data.DataLoader(dataset, batch_size=r.micro_batch, sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers,
                                         persistent_workers=cfg.data.num_workers > 0)
    return Data(videos, iter(loader), val_items)


def check_camera_records(records, source: str) -> None:
    without = [rec.path for rec in records if rec.poses is None]
    if without:
        raise DatasetError(f"{source}: run.camera trains on camera poses, but {len(without)} of {len(records)} rows "
                           f"name no pose file (first: {without[0]}); add a 'poses' column with one "
                           "RealEstate10K-style pose file per clip")


def train_step(cfg: TrainConfig, env: Env, t: Trainee, batches: Iterator) -> float:
    """One optimizer step over `accumulation` micro-batches; the loss averaged over all processes."""
    accum = env.accum
    loss_acc = torch.zeros((), device=env.device)
    for a in range(accum):
        batch = next(batches)
        sync = contextlib.nullcontext()
        if env.world > 1 and cfg.run.distributed == "ddp" and a < accum - 1:
            sync = t.model.no_sync()
        with sync:
            loss = t.model(batch)
            (loss / accum).backward()
        loss_acc += loss.detach() / accum
    for p in t.manual_sync:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= env.world
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(t.params, cfg.optim.grad_clip)
    t.opt.step()
    t.sched.step()
    t.opt.zero_grad(set_to_none=True)
    if t.ema is not None:
        t.ema.update()
    return all_mean(loss_acc, env.world)


def export(cfg: TrainConfig, env: Env, t: Trainee, step: int) -> tuple[Optional[str], str]:
    """model.safetensors (or lora.safetensors) in the run directory: (path, which weights)."""
    r = cfg.run
    use_ema = t.ema is not None and r.export_ema
    weights = t.ema.describe() if use_ema else f"raw weights after {step} steps"
    if not r.export_at_end:
        return None, weights
    path = os.path.join(r.run_dir, "lora.safetensors" if r.lora else "model.safetensors")
    with (t.ema.swapped_in() if use_ema else contextlib.nullcontext()):
        if r.lora:
            if env.is_main:
                export_lora(t.dc, path, r.lora, r.export_dtype, weights)
        elif r.distributed == "fsdp" and env.world > 1:
            full = {}
            for k, v in t.dc.state_dict().items():    # collective: every rank gathers, rank 0 keeps a CPU copy
                v = v.full_tensor() if hasattr(v, "full_tensor") else v
                if env.is_main:
                    full[k] = v.detach().cpu().clone()
            if env.is_main:
                export_safetensors(plain_copy(t.dc.cfg, full), path, r.export_dtype, weights)
        elif env.is_main:
            export_safetensors(t.dc, path, r.export_dtype, weights)
    return path, weights


def run(cfg: TrainConfig, allow_config_change: bool = False) -> dict:
    r = cfg.run
    env = setup(cfg)                                        # processes, device, run directory
    t = build_trainee(cfg, env)                             # model, trainable set, DDP/FSDP, optimizer, EMA
    step = resume(cfg, env, t, allow_config_change)         # newest complete checkpoint, if any
    data = make_data(cfg, env, t.dc, step)                  # the sample stream from that step on
    logger = Logger(cfg, env, t, step)
    train_mode(t.dc)
    loss = float("nan")
    while step < r.max_steps:
        loss = train_step(cfg, env, t, data.batches)        # one optimizer step (accumulated micro-batches)
        step += 1
        if ck.fault("kill_after_step", step):               # crash tests
            os.kill(os.getpid(), signal.SIGKILL)
        logger.step(step, loss, t.sched.get_last_lr()[0])   # log.jsonl, TensorBoard, progress bar
        if step % r.save_every == 0 or step == r.max_steps:
            save(cfg, env, t, step)                         # sharded, atomic checkpoint
        evaluate(cfg, env, t, data, step, logger)           # samples and validation loss, when due
    path, weights = export(cfg, env, t, step)               # model.safetensors / lora.safetensors
    logger.close()
    if env.world > 1:
        dist.barrier()
    return {"step": step, "loss": loss, "export": path, "weights": weights if path else None,
            "model": t.dc, "trainable": [n for n, _ in t.named]}


def plain_copy(model_cfg, state: dict):
    """A CPU DynamiCrafter holding `state` (gathered from FSDP shards) without a second init."""
    from dynamicrafter.model import DynamiCrafter
    with torch.device("meta"):
        m = DynamiCrafter(model_cfg)
    m.load_state_dict(state, strict=True, assign=True)
    return m


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="run config (.yaml/.yml/.toml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run.max_steps=100")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though lr, data, stage or model settings differ from the checkpoint's")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    with user_errors():
        cfg = load_config(a.config, a.overrides)
        result = run(cfg, allow_config_change=a.allow_config_change)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"step": result["step"], "loss": result["loss"], "export": result["export"],
                          "weights": result["weights"]}))
    if dist.is_initialized():
        dist.destroy_process_group()


USER_ERRORS = (ConfigError, DatasetError, StageError, InitError, ck.ResumeError, FileNotFoundError)


@contextlib.contextmanager
def user_errors():
    """A mistake in the config, data or run directory ends the run with one line on stderr and
    exit status 2, not a traceback (the message already says what to change)."""
    from dynamicrafter.config import CheckpointError
    try:
        yield
    except (*USER_ERRORS, CheckpointError) as err:
        msg = str(err).strip()
        if "Original Traceback" in msg:      # raised in a DataLoader worker: keep the original message
            msg = msg.splitlines()[-1].split(": ", 1)[-1]
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {msg}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
