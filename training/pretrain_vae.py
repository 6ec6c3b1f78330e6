"""Train a small KL-f8 autoencoder (the library's `AutoencoderKL`) on video frames, for tiny
models that cannot use the released VAE (e.g. the demo model).

    python -m training.pretrain_vae --csv data/shapes/captions.csv --out runs/vae.safetensors --size 64 --steps 2000

Loss: L1 + L2 reconstruction of the posterior sample plus a small KL term. After training
the latent is recalibrated exactly (the encoder's mean output and the decoder's input conv
rescaled together, which changes nothing the pair computes) so that 0.18215 * z has unit
standard deviation, the scale every DynamiCrafter model assumes. The file holds
``first_stage_model.*`` tensors in the official names: put it in a run with
``model.init_extra: [vae.safetensors]`` and ``model.init_extra_prefixes: [first_stage_model.]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dynamicrafter.config import VAEConfig
from dynamicrafter.models.vae import AutoencoderKL, posterior_sample
from dynamicrafter.pipeline import cover_crop
from training.data import decode_frames, probe_video, read_annotations

SCALE_FACTOR = 0.18215
TINY_VAE = dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


def load_frames(csv: str, video_dir: str | None, size: int, max_frames: int = 200_000) -> torch.Tensor:
    """Every frame of every clip in the CSV (up to max_frames), as uint8 (N, 3, size, size).
    Small datasets fit in memory (2000 clips x 8 frames at 64x64 = 200 MB), and then each
    training step costs the model's time only, not a video decode per image."""
    out, n = [], 0
    for rec in read_annotations(csv, video_dir):
        frames = torch.from_numpy(decode_frames(rec.path, list(range(probe_video(rec.path)[0]))))
        frames = cover_crop(frames.permute(0, 3, 1, 2).float(), size, size)
        out.append(frames.round().clamp(0, 255).to(torch.uint8))
        n += len(frames)
        if n >= max_frames:
            break
    return torch.cat(out)[:max_frames]


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    return frames.float().div(127.5).sub(1.0)


@torch.no_grad()
def calibrate(vae: AutoencoderKL, images: torch.Tensor, scale_factor: float = SCALE_FACTOR) -> float:
    """Rescale the latent so std(scale_factor * mean) == 1 on `images`; returns the factor applied."""
    mean = vae.moments(images).chunk(2, dim=1)[0]
    s = 1.0 / (scale_factor * float(mean.std()))
    e = vae.cfg.embed_dim
    qc, pq = vae.quant_conv, vae.post_quant_conv
    qc.weight[:e] *= s
    qc.bias[:e] *= s
    qc.bias[e:] += 2.0 * math.log(s)     # std scales with the mean: logvar + 2 ln s
    pq.weight /= s                       # the decoder sees z / s: identical output
    return s


@dataclass(frozen=True)
class Optim:
    """A pretraining run's optimisation: `steps` AdamW steps on batches of `batch` at learning rate `lr`,
    the loss recorded every `log_every` steps (and at the last)."""
    steps: int
    batch: int
    lr: float
    log_every: int = 100

    def add_arguments(self, parser) -> None:
        """--steps, --batch, --lr on a command line, defaulting to this run's."""
        parser.add_argument("--steps", type=int, default=self.steps)
        parser.add_argument("--batch", type=int, default=self.batch)
        parser.add_argument("--lr", type=float, default=self.lr)

    @classmethod
    def from_args(cls, args) -> "Optim":
        return cls(args.steps, args.batch, args.lr)


VAE_OPTIM = Optim(1000, 16, 2e-4)      # train_vae's default run


def train_vae(csv: str, out: str, *, size: int = 64, optim: Optim = VAE_OPTIM, kl_weight: float = 1e-6,
              seed: int = 0, vae: dict | None = None, video_dir: str | None = None) -> dict:
    """AdamW with a cosine decay to 10% of `lr`; batches drawn at random from all frames but
    the last clip's 16 or so, which are held out to report the reconstruction error."""
    steps, batch, lr, log_every = optim.steps, optim.batch, optim.lr, optim.log_every
    torch.manual_seed(seed)
    cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in {**TINY_VAE, **(vae or {})}.items()})
    model = AutoencoderKL(cfg)
    pool = load_frames(csv, video_dir, size)
    n_held = min(16, len(pool) // 4)
    pool, held_out = pool[:len(pool) - n_held], to_unit(pool[len(pool) - n_held:])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)

    def recon_error(m):
        with torch.no_grad():
            return float(F.mse_loss(m.decode(m.moments(held_out).chunk(2, dim=1)[0]), held_out))

    first = recon_error(model)
    history = []
    for step in range(steps):
        x = to_unit(pool[torch.randint(len(pool), (batch,), generator=gen)])
        moments = model.moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        rec = model.decode(posterior_sample(moments, generator=gen))
        kl = 0.5 * (mean.pow(2) + logvar.clamp(-30, 20).exp() - 1.0 - logvar.clamp(-30, 20)).sum(dim=(1, 2, 3)).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": loss.item(), "kl": kl.item()})
            print(json.dumps(history[-1]), file=sys.stderr)
    model.eval()
    before = recon_error(model)
    factor = calibrate(model, to_unit(pool[torch.randperm(len(pool), generator=gen)[:64]]))
    after = recon_error(model)
    with torch.no_grad():
        latent_std = float(SCALE_FACTOR * model.moments(held_out).chunk(2, dim=1)[0].std())
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sd = {f"first_stage_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tmp = out + ".tmp"
    save_file(sd, tmp, metadata={"vae_config": json.dumps(cfg.__dict__, default=list), "size": str(size)})
    os.replace(tmp, out)
    return {"path": out, "mse_untrained": first, "mse": after, "mse_before_calibration": before,
            "calibration": factor, "held_out_latent_std": latent_std, "history": history}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True)
    p.add_argument("--video-dir")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64)
    VAE_OPTIM.add_arguments(p)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", type=json.loads, default=None,
                   help='VAE sizes as JSON, e.g. {"ch": 32, "ch_mult": [1,2,2,2]}')
    a = p.parse_args(argv)
    result = train_vae(a.csv, a.out, size=a.size, optim=Optim.from_args(a), kl_weight=a.kl_weight,
                       seed=a.seed, vae=a.vae, video_dir=a.video_dir)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return result


if __name__ == "__main__":
    main()
