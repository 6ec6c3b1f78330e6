"""Train a small KL-f8 autoencoder (the library's `AutoencoderKL`) on video frames, for tiny
models that cannot use the released VAE (e.g. the demo model).

    python -m training.vae --csv data/shapes/captions.csv --out runs/vae.safetensors --size 64 --steps 2000

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

import torch
import torch.nn.functional as F

from dynamicrafter.config import VAEConfig
from dynamicrafter.vae import AutoencoderKL, posterior_sample
from training.data import make_dataset

SCALE_FACTOR = 0.18215
TINY_VAE = dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


def frames_batch(dataset, start: int, n: int) -> torch.Tensor:
    return torch.stack([dataset[k]["video"][:, 0] for k in range(start, start + n)])


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


def train_vae(csv: str, out: str, *, size: int = 64, steps: int = 1000, batch: int = 16, lr: float = 2e-4,
              kl_weight: float = 1e-6, seed: int = 0, vae: dict | None = None, log_every: int = 100,
              video_dir: str | None = None) -> dict:
    torch.manual_seed(seed)
    cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in {**TINY_VAE, **(vae or {})}.items()})
    model = AutoencoderKL(cfg)
    ds = make_dataset(csv, video_dir, frames=1, height=size, width=size, max_stride=1, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    held_out = frames_batch(ds, 10 ** 9, min(batch, 16))     # far along the stream: other random frames

    def recon_error(m):
        with torch.no_grad():
            return float(F.mse_loss(m.decode(m.moments(held_out).chunk(2, dim=1)[0]), held_out))

    first = recon_error(model)
    history = []
    for step in range(steps):
        x = frames_batch(ds, step * batch, batch)
        moments = model.moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        rec = model.decode(posterior_sample(moments, generator=gen))
        kl = 0.5 * (mean.pow(2) + logvar.clamp(-30, 20).exp() - 1.0 - logvar.clamp(-30, 20)).sum(dim=(1, 2, 3)).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": loss.item(), "kl": kl.item()})
            print(json.dumps(history[-1]), file=sys.stderr)
    model.eval()
    before = recon_error(model)
    factor = calibrate(model, frames_batch(ds, 2 * 10 ** 9, 64))
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
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", type=json.loads, default=None, help='VAE sizes as JSON, e.g. {"ch": 32, "ch_mult": [1,2,2,2]}')
    a = p.parse_args(argv)
    result = train_vae(a.csv, a.out, size=a.size, steps=a.steps, batch=a.batch, lr=a.lr, kl_weight=a.kl_weight,
                       seed=a.seed, vae=a.vae, video_dir=a.video_dir)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return result


if __name__ == "__main__":
    main()
