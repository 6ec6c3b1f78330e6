"""Headless DynamiCrafter training: ``python -m training.train CONFIG [section.key=value ...]``.

Single process, or ``torchrun --nproc_per_node=N -m training.train CONFIG`` (DDP, or FSDP
with run.distributed=fsdp). A run directory holds everything: the resolved config,
``log.jsonl``, TensorBoard events, ``checkpoints/step_*.pt`` (atomic, keep-last-K), sample
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

import torch
import torch.distributed as dist

from training import checkpoint as ck
from training.config import ConfigError, TrainConfig, config_changes, guarded, load_config
from training.lora import add_lora, export_lora
from training.data import DatasetError, StreamSampler, collate, make_dataset, shared_records
from training.modeling import (DTYPES, EMA, InitError, build_tiny, cast_frozen, enable_gradient_checkpointing,
                               export_safetensors, load_init, overlay_extras, set_resblock_dropout, sync_config)
from training.stages import (StageError, StageSettings, apply_trainable, prepare_model_for_stage,
                             sample_generator, stage_loss, trainable_names)

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
           "frozen_weights": frozen_b / gb, "ema": train_n * 4 / gb if cfg.run.ema_decay > 0 else 0.0}
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


def build_model(cfg: TrainConfig):
    r, m = cfg.run, cfg.model
    frames = cfg.data.frames
    if m.tiny:
        overrides = {k: dict(v) for k, v in (m.tiny_overrides or {}).items()}
        if m.variant:
            overrides["variant"] = {**overrides.get("variant", {}), **m.variant}
        dc = build_tiny(frames, r.seed, overrides)
        if m.init_extra:
            overlay_extras(dc, m.init_extra, tuple(m.init_extra_prefixes))
    else:
        dc = load_init(m.init, m.init_extra, m.variant, seed=r.seed, frames=frames, image_kv_init=m.image_kv_init,
                       extra_prefixes=tuple(m.init_extra_prefixes))
    prepare_model_for_stage(dc, r.stage)
    sync_config(dc)
    set_resblock_dropout(dc.unet, m.dropout)
    cfg.check_sizes(8 * 2 ** (len(dc.unet.cfg.channel_mult) - 1))   # a .ckpt init is only known now
    if r.lora:
        add_lora(dc, r.lora)
    return dc


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
    from dynamicrafter.video import load_image, save_video
    from dynamicrafter.pipeline import cover_crop

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
        text = dc.encode_text([prompt])
        ctx_img = dc.image_context(dc.encode_clip_image(img))
        un_text = dc.encode_text([""])
        un_img = dc.image_context(dc.encode_clip_image(torch.zeros_like(img)))
        if stage == 1:
            ctx_img, un_img = ctx_img[:, :16], un_img[:, :16]
        cond = torch.cat([text, ctx_img], 1)
        uncond = torch.cat([un_text, un_img], 1)
        g = torch.Generator().manual_seed(e.seed + i)
        c = dc.unet.cfg.out_channels
        x_T = torch.randn(1, c, frames, H // 8, W // 8, generator=g).to(device)
        concat = None
        if stage == 3:
            z = dc.encode_first_stage(img, sample=False)
            concat = z[:, :, None].expand(-1, -1, frames, -1, -1)
        v = dc.variant
        sampler_model = _ImageOnly(dc) if stage == 1 else dc
        lat = dynamicrafter.sample_ddim(sampler_model, x_T, cond, uncond, concat=concat, fs=e.fs or v["default_fs"],
                                        steps=e.steps, cfg_text=e.cfg_text, cfg_img=e.cfg_img,
                                        guidance_rescale=v.get("guidance_rescale", 0.0), spacing=v["spacing"],
                                        generator=g)
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


def run(cfg: TrainConfig, allow_config_change: bool = False) -> dict:
    r = cfg.run
    rank, world, device = setup_distributed(r.device)
    is_main = rank == 0
    accum = cfg.accumulation(world)
    os.makedirs(r.run_dir, exist_ok=True)
    if is_main:
        ck.remove_stale_temporaries(r.run_dir)
        with open(os.path.join(r.run_dir, "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=2)

    torch.manual_seed(r.seed)
    dc = build_model(cfg)
    names = names_to_train(dc, cfg)
    apply_trainable(dc, names)
    dc.to(device)
    if cfg.model.frozen_dtype != "fp32":
        cast_frozen(dc, DTYPES[cfg.model.frozen_dtype])
    if r.grad_checkpointing:
        enable_gradient_checkpointing(dc.unet)
    use_bf16 = r.precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    settings = StageSettings(stage=r.stage, seed=r.seed, uncond_prob=cfg.data.uncond_prob,
                             cond_frame=r.cond_frame, interp_prob=r.interp_prob)
    module = TrainStep(dc, settings, autocast)
    manual_sync = []   # parameters whose gradients we average ourselves (FSDP cannot shard 0-dim ones)
    if world > 1 and r.distributed == "fsdp":
        import inspect
        from torch.distributed.fsdp import fully_shard
        unet = dc.unet
        scalars = {p for p in unet.parameters() if p.ndim == 0}
        manual_sync = [p for p in scalars if p.requires_grad]
        kw = {"ignored_params": scalars} if scalars and "ignored_params" in inspect.signature(fully_shard).parameters else {}
        if scalars and not kw:
            raise RuntimeError("this torch's fully_shard cannot skip the 0-dim gate parameters; use run.distributed=ddp")
        for block in list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks):
            fully_shard(block, **kw)
        fully_shard(unet, **kw)
        if dc.image_proj_model is not None:
            fully_shard(dc.image_proj_model)
        model = module     # the encoders stay whole (frozen, no gradients to share)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    else:
        model = module

    # after any FSDP wrapping, which swaps the parameters for sharded ones
    named = [(n, p) for n, p in dc.named_parameters() if p.requires_grad]
    opt = make_optimizer([p for _, p in named], cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    ema = EMA(named, r.ema_decay) if r.ema_decay > 0 else None

    step = 0
    state = ck.load_latest(r.run_dir)
    if world > 1:   # every process must resume from the same checkpoint
        found = [None] * world
        dist.all_gather_object(found, None if state is None else state["step"])
        if len(set(found)) != 1:
            raise ck.ResumeError(f"processes see different checkpoints in {r.run_dir} (steps {found}): run_dir "
                                 "must be on a filesystem shared by every node")
    if state is not None:
        check_resume(state, cfg, allow_config_change, is_main)
        restore(state, named, opt, sched, ema, rank, world, cfg)
        step = state["step"]
        if is_main:
            log.info("resumed from %s (step %d)", state["path"], step)
        del state

    frames = 1 if r.stage == 1 else cfg.data.frames
    tokens_for = dc.image_proj_model.cfg.video_length
    if r.stage != 1 and frames != tokens_for and is_main:
        log.warning("data.frames=%d but the Resampler makes image tokens for %d frames: every frame will attend "
                    "to all image tokens instead of its own 16 (as the official model does at other lengths)",
                    frames, tokens_for)
    fs_meaning = cfg.data.fs_meaning or dc.variant.get("fs_meaning", "frame_stride")
    records = shared_records(cfg.data.csv, cfg.data.video_dir, rank, broadcast_from_rank0 if world > 1 else None)
    data_kw = dict(frames=frames, height=cfg.data.height, width=cfg.data.width, max_stride=cfg.data.max_stride,
                   fs_meaning=fs_meaning, fps_max=cfg.data.fps_max, seed=r.seed)
    dataset = videos = make_dataset(cfg.data.csv, records=records, **data_kw)
    if cfg.data.cache_dir:
        from training.cache import Cache, CachedDataset
        cache = Cache(cfg.data.cache_dir, dc, cfg.data.height, cfg.data.width)
        dc.eval()
        built = cache.build(dc, records, rank, world)
        if world > 1:
            dist.barrier()
        if is_main:
            log.info("cache %s: %d videos encoded now, %d listed", cache.dir, built, len(records))
        dataset = CachedDataset(records, cache, source=cfg.data.csv, **data_kw)
    val_items = []
    if cfg.eval.val_every:
        val_records = shared_records(cfg.data.val_csv, cfg.data.video_dir, rank,
                                     broadcast_from_rank0 if world > 1 else None)
        val_items = validation_items(cfg, fs_meaning, val_records)
    sampler = StreamSampler(r.micro_batch, accum, rank, world, start_step=step)
    loader = torch.utils.data.DataLoader(dataset, batch_size=r.micro_batch, sampler=sampler, collate_fn=collate,
                                         num_workers=cfg.data.num_workers,
                                         persistent_workers=cfg.data.num_workers > 0)
    batches = iter(loader)

    jsonl = JsonlLog(os.path.join(r.run_dir, "log.jsonl"), step) if is_main else None
    tb = make_tensorboard(r.run_dir, r.tensorboard) if is_main else None
    bar = None
    if is_main and r.progress:
        from tqdm import tqdm
        bar = tqdm(total=r.max_steps, initial=step, desc=f"stage {r.stage}", dynamic_ncols=True)
    if is_main:
        n_train = sum(p.numel() for _, p in named)
        log.info("stage %d: %d trainable tensors, %.2fM parameters; world %d, micro-batch %d, accumulation %d",
                 r.stage, len(named), n_train / 1e6, world, r.micro_batch, accum)
        log.info("static memory estimate per process: %s", json.dumps(memory_estimate(dc, cfg, world)))

    train_mode(dc)
    last_loss = float("nan")
    window_t, window_samples = time.time(), 0
    while step < r.max_steps:
        loss_acc = torch.zeros((), device=device)
        for a in range(accum):
            batch = next(batches)
            sync = contextlib.nullcontext()
            if world > 1 and r.distributed == "ddp" and a < accum - 1:
                sync = model.no_sync()
            with sync:
                loss = model(batch)
                (loss / accum).backward()
            loss_acc += loss.detach() / accum
        for p in manual_sync:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update()
        step += 1
        window_samples += r.global_batch
        last_loss = all_mean(loss_acc, world)
        if ck.fault("kill_after_step", step):
            os.kill(os.getpid(), signal.SIGKILL)

        if is_main:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}",
                                clips_per_s=f"{window_samples / max(time.time() - window_t, 1e-9):.2f}")
            if step % r.log_every == 0 or step == r.max_steps:
                now = time.time()
                rec = {"step": step, "loss": last_loss, "lr": sched.get_last_lr()[0],
                       "samples_per_s": window_samples / max(now - window_t, 1e-9),
                       "samples_seen": step * r.global_batch, "time": now}
                jsonl.write(rec)
                if tb is not None:
                    tb.add_scalar("train/loss", last_loss, step)
                    tb.add_scalar("train/lr", rec["lr"], step)
                    tb.add_scalar("train/samples_per_s", rec["samples_per_s"], step)
                window_t, window_samples = now, 0
        if step % r.save_every == 0 or step == r.max_steps:
            save(cfg, dc, named, opt, sched, ema, step, rank, world)
        sharded = world > 1 and r.distributed == "fsdp"
        if cfg.eval.every and cfg.eval.prompts and step % cfg.eval.every == 0 and (is_main or sharded):
            # under FSDP every rank runs the sampler (the UNet's shards are gathered collectively)
            dc.eval()
            with (ema.swapped_in() if ema is not None else contextlib.nullcontext()):
                paths = sample_videos(dc, cfg, videos, step, device, write=is_main)
            train_mode(dc)
            if is_main:
                jsonl.write({"step": step, "samples": paths})
        if val_items and step % cfg.eval.val_every == 0:
            val = validation_loss(dc, val_items, cfg, autocast)
            if is_main:
                jsonl.write({"step": step, **val})
                if tb is not None:
                    tb.add_scalar("val/loss", val["val_loss"], step)

    export_path = None
    use_ema = ema is not None and r.export_ema
    weights = ema.describe() if use_ema else f"raw weights after {step} steps"
    if r.export_at_end:
        export_path = os.path.join(r.run_dir, "lora.safetensors" if r.lora else "model.safetensors")
        with (ema.swapped_in() if use_ema else contextlib.nullcontext()):
            if r.lora:
                if is_main:
                    export_lora(dc, export_path, r.lora, r.export_dtype, weights)
            elif r.distributed == "fsdp" and world > 1:
                full = {k: _full(v) for k, v in dc.state_dict().items()}    # collective: every rank gathers
                if is_main:
                    export_safetensors(plain_copy(dc.cfg, full), export_path, r.export_dtype, weights)
            elif is_main:
                export_safetensors(dc, export_path, r.export_dtype, weights)
    if bar is not None:
        bar.close()
    if jsonl is not None:
        jsonl.close()
    if tb is not None:
        tb.close()
    if world > 1:
        dist.barrier()
    return {"step": step, "loss": last_loss, "export": export_path, "weights": weights if export_path else None,
            "model": dc, "trainable": [n for n, _ in named]}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor of a parameter/state, gathering FSDP shards (DTensor) first."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def plain_copy(model_cfg, state: dict):
    """A CPU DynamiCrafter holding `state` (gathered from FSDP shards) without a second init."""
    from dynamicrafter.model import DynamiCrafter
    with torch.device("meta"):
        m = DynamiCrafter(model_cfg)
    m.load_state_dict(state, strict=True, assign=True)
    return m


def save(cfg, dc, named, opt, sched, ema, step, rank, world) -> None:
    r = cfg.run
    trainable = {n: _full(p) for n, p in named}
    opt_state = opt.state_dict()
    opt_state["state"] = {i: {k: (_full(v) if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
                          for i, s in opt_state["state"].items()}
    ema_state = None
    if ema is not None:   # gathered on every rank (a collective under FSDP)
        ema_state = {"decay": ema.decay, "num_updates": ema.num_updates,
                     "shadow": {n: _full(v) for n, v in ema.shadow.items()}}
    rngs = [None] * world
    if world > 1:
        dist.all_gather_object(rngs, ck.rng_state())
    else:
        rngs = [ck.rng_state()]
    if rank == 0:
        state = {"step": step, "samples_seen": step * r.global_batch, "global_batch": r.global_batch,
                 "stage": r.stage, "trainable": trainable, "optimizer": opt_state, "scheduler": sched.state_dict(),
                 "ema": ema_state, "rng": rngs,
                 "config": json.dumps(cfg.to_dict()), "model_config": json.dumps(dc.cfg.to_dict())}
        ck.atomic_save(state, ck.checkpoint_path(r.run_dir, step), step=step)
        ck.prune(r.run_dir, r.keep_last)
    if world > 1:
        dist.barrier()


def restore(state, named, opt, sched, ema, rank, world, cfg: TrainConfig) -> None:
    stored = state["trainable"]
    names = [n for n, _ in named]
    if set(stored) != set(names):
        raise ck.ResumeError(f"{state['path']} trained a different parameter set ({len(stored)} tensors vs {len(names)}); "
                         "the stage or train_all setting changed. Use a new run_dir for a new stage.")
    with torch.no_grad():
        for n, p in named:
            src = stored[n]
            if hasattr(p, "full_tensor"):   # FSDP shard: take this rank's slice
                from torch.distributed.tensor import distribute_tensor
                src = distribute_tensor(src.to(p.dtype), p.device_mesh, p.placements)
                p.copy_(src)
            else:
                p.copy_(src.to(p.device, p.dtype))
    opt_state = state["optimizer"]
    params = [p for _, p in named]
    for i, s in opt_state["state"].items():
        p = params[int(i)]
        for k, v in list(s.items()):
            if isinstance(v, torch.Tensor) and hasattr(p, "full_tensor") and v.shape == p.shape:
                from torch.distributed.tensor import distribute_tensor
                s[k] = distribute_tensor(v, p.device_mesh, p.placements)
    opt.load_state_dict(opt_state)
    sched.load_state_dict(state["scheduler"])
    # the optimizer and scheduler states carry the old hyperparameters: the config's rule
    o = cfg.optim
    sched.base_lrs = [o.lr] * len(opt.param_groups)
    for g in opt.param_groups:
        g.update(initial_lr=o.lr, lr=o.lr * lr_factor(state["step"], cfg), betas=tuple(o.betas), eps=o.eps,
                 weight_decay=o.weight_decay)
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    if ema is not None:
        if state["ema"] is None:
            raise ck.ResumeError("EMA is on but the checkpoint has none; it was written with run.ema_decay=0")
        shadow = {}
        for n, v in state["ema"]["shadow"].items():
            target = ema.shadow[n]
            if hasattr(target, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor
                v = distribute_tensor(v.to(target.dtype), target.device_mesh, target.placements)
            shadow[n] = v
        # checkpoints from before the EMA warm-up: it had run one update per step
        ema.load_state_dict({"decay": state["ema"]["decay"], "shadow": shadow,
                             "num_updates": state["ema"].get("num_updates", state["step"])})
    rngs = state["rng"]
    ck.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])


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
