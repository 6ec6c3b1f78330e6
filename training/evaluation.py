"""Evaluation during training: sample videos from the fixed prompts and the validation loss on
held-out clips (the same number for the same weights in any run)."""
from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import torch

from training.config import TrainConfig
from training.data import collate, make_dataset
from training.stages import StageSettings, stage_loss

if TYPE_CHECKING:
    from training.distributed import Env
    from training.run_log import Logger
    from training.train import Data, Trainee


def train_mode(dc) -> None:
    """UNet and Resampler in training mode (dropout as the official model); frozen encoders in eval."""
    dc.train()
    for frozen in (dc.first_stage_model, dc.cond_stage_model, dc.embedder):
        if frozen is not None:
            frozen.eval()


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
    from dynamicrafter.sampling.schedule import randn
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
        lat = dynamicrafter.sample_ddim(sampler_model, x_T,
                                        dynamicrafter.Conditioning(cond, uncond, concat=concat,
                                                                   fs=e.fs or v["default_fs"]),
                                        guidance=Guidance(e.cfg_text, e.cfg_img, v.get("guidance_rescale", 0.0)),
                                        schedule=Schedule(e.steps, v["spacing"]), generator=g)
        video = dc.decode(lat)[0]
        path = os.path.join(cfg.run.run_dir, "samples", f"step_{step:08d}_{i}.mp4")
        if write:
            save_video(video.cpu(), path, fps=e.fps)
            out.append(path)
    return out


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
                               interp_prob=0.0, camera=cfg.run.camera, fixed_t=int(t))
            total = 0.0
            for i in range(0, len(items), cfg.run.micro_batch):
                chunk = items[i:i + cfg.run.micro_batch]
                total += float(stage_loss(dc, collate(chunk), st, autocast())) * len(chunk)
            per_t[int(t)] = total / len(items)
    finally:
        if was_training:
            train_mode(dc)
    return {"val_loss": sum(per_t.values()) / len(per_t), "val_loss_t": per_t}


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
