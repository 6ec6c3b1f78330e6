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
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from training import checkpoint as ck
from training.config import ConfigError, TrainConfig, config_changes, guarded, load_config
from training.lora import export_lora
from training.data import DatasetError, StreamSampler, collate, make_dataset, shared_records
from training.modeling import (DTYPES, EMA, InitError, build_model, cast_frozen, enable_gradient_checkpointing,
                               export_safetensors)
from training.stages import StageError, StageSettings, apply_trainable, sample_generator, stage_loss, trainable_names

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


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise RuntimeError("optim.name=adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                               "or use optim.name=adamw") from err
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def train_mode(dc) -> None:
    """UNet and Resampler in training mode (dropout as the official model); frozen encoders in eval."""
    dc.train()
    for frozen in (dc.first_stage_model, dc.cond_stage_model, dc.embedder):
        if frozen is not None:
            frozen.eval()


def lr_factor(step: int, cfg: TrainConfig) -> float:
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        span = max(1, cfg.run.max_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def setup_distributed(device_pref: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def all_mean(x: torch.Tensor, world: int) -> float:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return float(x)


def names_to_train(dc, cfg: TrainConfig) -> list[str]:
    if cfg.run.lora:       # the adapters only: UNet, Resampler and encoders frozen
        return [n for n, _ in dc.named_parameters() if ".lora_" in n]
    return trainable_names(dc, cfg.run.stage, cfg.run.train_all)


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


class _ImageOnly:
    """The model as stage 1 trains it: every UNet call with the temporal path bypassed."""

    def __init__(self, dc):
        self._dc = dc

    def __getattr__(self, name):
        return getattr(self._dc, name)

    def denoise(self, *args, **kwargs):
        return self._dc.denoise(*args, temporal=False, **kwargs)


@torch.no_grad()
def sample_videos(dc, cfg: TrainConfig, dataset, step: int, device, write: bool = True) -> list[str]:
    """Fixed prompts (+ images, or the first frames of the first clips) -> mp4s under samples/."""
    import dynamicrafter
    from dynamicrafter.schedule import randn
    from dynamicrafter.settings import Guidance, Schedule
    from dynamicrafter.video import load_image, save_video
    from dynamicrafter.config import QUERIES_PER_FRAME, TEXT_CONTEXT_LEN
    from dynamicrafter.pipeline import cover_crop, image_conditioning, video_latent_shape

    e = cfg.eval
    out = []
    stage = cfg.run.stage
    frames = 1 if stage == 1 else cfg.data.frames
    H, W = cfg.data.height, cfg.data.width
    for i, prompt in enumerate(e.prompts):
        if i < len(e.images):
            img = cover_crop(load_image(e.images[i]), H, W)
        else:
            img = dataset[i]["video"][:, 0][None]
        img = img.to(device)
        # zero VAE noise: the concat latent is the posterior mean, so samples do not vary with it
        n = max(frames, 2)     # (stage 1 samples stills and drops the concat)
        c = image_conditioning(dc, img, [prompt], n, vae_noise=torch.zeros(n, 4, H // 8, W // 8, device=device))
        cond, uncond, concat = c.cond, c.uncond, c.concat
        if stage == 1:      # single frames: the first frame's image tokens, no concat
            keep = TEXT_CONTEXT_LEN + QUERIES_PER_FRAME
            cond, uncond = cond[:, :keep], uncond[:, :keep]
        if stage != 3:
            concat = None
        g = torch.Generator().manual_seed(e.seed + i)
        x_T = randn(video_latent_shape(1, frames, H, W), g, device)
        v = dc.variant
        sampler_model = _ImageOnly(dc) if stage == 1 else dc
        lat = dynamicrafter.sample_ddim(sampler_model, x_T, cond, uncond, concat=concat, fs=e.fs or v["default_fs"],
                                        guidance=Guidance(e.cfg_text, e.cfg_img, v.get("guidance_rescale", 0.0)),
                                        schedule=Schedule(e.steps, v["spacing"]), generator=g)
        video = dc.decode(lat)[0]
        path = os.path.join(cfg.run.run_dir, "samples", f"step_{step:08d}_{i}.mp4")
        if write:
            save_video(video.cpu(), path, fps=e.fps)
            out.append(path)
    return out


def broadcast_from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def validation_items(cfg: TrainConfig, fs_meaning: str, records=None) -> list[dict]:
    """The held-out clips, decoded once: stream indices 0..val_clips-1 of data.val_csv with the
    clip choice seeded by eval.seed (not the run's seed), so every run sees the same clips."""
    frames = 1 if cfg.run.stage == 1 else cfg.data.frames
    ds = make_dataset(cfg.data.val_csv, cfg.data.video_dir, records=records, frames=frames, height=cfg.data.height,
                      width=cfg.data.width, max_stride=cfg.data.max_stride, fs_meaning=fs_meaning,
                      fps_max=cfg.data.fps_max, seed=cfg.eval.seed)
    return [ds[k] for k in range(cfg.eval.val_clips)]


@torch.no_grad()
def validation_loss(dc, items: list[dict], cfg: TrainConfig, autocast=contextlib.nullcontext) -> dict:
    """Diffusion loss of the held-out clips at each of eval.val_timesteps, with noise keyed by
    (eval.seed, clip), no dropout and nothing dropped from the conditioning (the first frame
    conditions, no interpolation layout): the same weights give the same number in any run.
    Every process computes it (under FSDP the UNet's shards are gathered collectively)."""
    was_training = dc.training
    dc.eval()
    per_t = {}
    try:
        for t in cfg.eval.val_timesteps:
            st = StageSettings(stage=cfg.run.stage, seed=cfg.eval.seed, uncond_prob=0.0, cond_frame="first",
                               interp_prob=0.0, fixed_t=int(t))
            total = 0.0
            for i in range(0, len(items), cfg.run.micro_batch):
                chunk = items[i:i + cfg.run.micro_batch]
                total += float(stage_loss(dc, collate(chunk), st, autocast())) * len(chunk)
            per_t[int(t)] = total / len(items)
    finally:
        if was_training:
            train_mode(dc)
    return {"val_loss": sum(per_t.values()) / len(per_t), "val_loss_t": per_t}


# --------------------------------------------------------------------------------- phases

@dataclass
class Env:
    """Where this process runs: rank, world size, device, bf16 autocast or not."""
    rank: int
    world: int
    device: torch.device
    bf16: bool
    accum: int                 # micro-batches per optimizer step on each process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


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
                             cond_frame=r.cond_frame, interp_prob=r.interp_prob)
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


def shard_fsdp(dc) -> list:
    """FSDP2 over the UNet blocks, the UNet and the Resampler. Returns the 0-dim trainable
    parameters (the gates), which FSDP leaves whole: their gradients are averaged by hand."""
    import inspect
    from torch.distributed.fsdp import fully_shard
    unet = dc.unet
    scalars = {p for p in unet.parameters() if p.ndim == 0}
    kw = {"ignored_params": scalars} if scalars and "ignored_params" in inspect.signature(fully_shard).parameters else {}
    if scalars and not kw:
        raise RuntimeError("this torch's fully_shard cannot skip the 0-dim gate parameters; use run.distributed=ddp")
    for block in list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks):
        fully_shard(block, **kw)
    fully_shard(unet, **kw)
    if dc.image_proj_model is not None:
        fully_shard(dc.image_proj_model)
    return [p for p in scalars if p.requires_grad]


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
        val_items = validation_items(cfg, fs_meaning, shared_records(cfg.data.val_csv, cfg.data.video_dir, env.rank,
                                                                     share))
    sampler = StreamSampler(r.micro_batch, env.accum, env.rank, env.world, start_step=step)
    loader = torch.utils.data.DataLoader(dataset, batch_size=r.micro_batch, sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers,
                                         persistent_workers=cfg.data.num_workers > 0)
    return Data(videos, iter(loader), val_items)


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


def evaluate(cfg: TrainConfig, env: Env, t: Trainee, data: Data, step: int, logger: Logger) -> None:
    """Samples from the fixed prompts (EMA weights when on) and the validation loss, when due."""
    e = cfg.eval
    sharded = env.world > 1 and cfg.run.distributed == "fsdp"
    if e.every and e.prompts and step % e.every == 0 and (env.is_main or sharded):
        # under FSDP every rank runs the sampler (the UNet's shards are gathered collectively)
        t.dc.eval()
        with (t.ema.swapped_in() if t.ema is not None else contextlib.nullcontext()):
            paths = sample_videos(t.dc, cfg, data.videos, step, env.device, write=env.is_main)
        train_mode(t.dc)
        logger.write({"step": step, "samples": paths})
    if data.val_items and step % e.val_every == 0:
        val = validation_loss(t.dc, data.val_items, cfg, env.autocast)
        logger.write({"step": step, **val}, {"val/loss": val["val_loss"]})


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


# --------------------------------------------------------------------------------- checkpoints

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
