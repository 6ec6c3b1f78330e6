"""Train small CLIP towers (text + image) contrastively on a dataset's frames and captions, for
tiny models that cannot use the released OpenCLIP ViT-H/14 (e.g. the demo model).

    python -m training.pretrain_clip --csv data/demo/train/captions.csv --out runs/demo/clip.safetensors --steps 800

The towers are the library's own `TextEncoder` and `ImageEncoder` (open_clip's architecture at
the sizes of the tiny model config, `model.tiny_overrides` given as --overrides), so what is
trained here is exactly what the diffusion model reads: the text tower's penultimate token
states and the image tower's last-block token grid. The contrastive objective uses the full
towers as CLIP does: the text's end-of-text state after the last block, ln_final and
text_projection; the image's CLS token after ln_post and proj.

Loss: CLIP's symmetric cross-entropy over a batch of (frame, caption) pairs, with every pair
whose caption is identical counted as a positive (soft targets), since a small captioned world
repeats captions. A frame cannot show where its object is going, so captions that differ only
in motion stay apart in the text tower and meet halfway in the image tower; that floor is what
the loss cannot go below, and the reported held-out loss is measured against it.

The file holds ``cond_stage_model.*`` and ``embedder.*`` tensors in the official names: put it
in a run with ``model.init_extra: [clip.safetensors]`` and ``model.init_extra_prefixes:
[cond_stage_model., embedder.]`` (the towers stay frozen in all three stages, as in the paper).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from dynamicrafter.models.clip import ImageEncoder, TextEncoder, open_clip_causal_mask
from dynamicrafter.pipeline import cover_crop
from training.pretrain_vae import Optim
from training.data import decode_frames, probe_video, read_annotations
from training.modeling import tiny_model_config
from training.pretrain_vae import to_unit


def load_pairs(csv: str, video_dir: str | None, size: int,
               per_clip: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """`per_clip` evenly spaced frames of every clip as uint8 (N, 3, size, size), the distinct
    captions, and each frame's caption index (N,)."""
    frames, caption_of, captions = [], [], {}
    for rec in read_annotations(csv, video_dir):
        n = probe_video(rec.path)[0]
        idx = sorted({round(i * (n - 1) / max(per_clip - 1, 1)) for i in range(per_clip)})
        x = torch.from_numpy(decode_frames(rec.path, idx)).permute(0, 3, 1, 2).float()
        frames.append(cover_crop(x, size, size).round().clamp(0, 255).to(torch.uint8))
        caption_of += [captions.setdefault(rec.caption, len(captions))] * len(idx)
    return torch.cat(frames), list(captions), torch.tensor(caption_of)


def text_features(enc: TextEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's pooled text embedding: every block, ln_final, the end-of-text state, the projection."""
    m = enc.model
    x = m.token_embedding(tokens) + m.positional_embedding
    mask = open_clip_causal_mask(tokens.shape[1], x)
    for block in m.transformer.resblocks:
        x = block(x, attn_mask=mask)
    x = m.ln_final(x)[torch.arange(tokens.shape[0]), tokens.argmax(dim=-1)]
    proj = m.text_projection
    return proj(x) if isinstance(proj, torch.nn.Module) else x @ proj


def image_features(enc: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
    """CLIP's pooled image embedding (open_clip's VisionTransformer forward: CLS, ln_post, proj)."""
    return enc.model.visual(enc.preprocess(images))


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, same: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: `same` (B, B) marks the pairs with identical captions."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = same.float() / same.float().sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


CLIP_OPTIM = Optim(800, 128, 1e-3)     # train_clip's default run


def train_clip(csv: str, out: str, *, size: int = 64, optim: Optim = CLIP_OPTIM, per_clip: int = 4,
               seed: int = 0, overrides: dict | None = None, video_dir: str | None = None) -> dict:
    """AdamW (weight decay 0.1 off norms, biases, embeddings) with a cosine decay to 10 % of `lr`;
    the last 5 % of the clips are held out to report the loss on frames the towers never saw."""
    steps, batch, lr, log_every = optim.steps, optim.batch, optim.lr, optim.log_every
    torch.manual_seed(seed)
    cfg = tiny_model_config(frames=2, overrides=overrides)
    text, image = TextEncoder(cfg.text), ImageEncoder(cfg.vision)
    pool, captions, caption_of = load_pairs(csv, video_dir, size, per_clip)
    tokens = TextEncoder.tokenize(captions)
    n_held = max(per_clip, (len(pool) // per_clip // 20) * per_clip)
    held = slice(len(pool) - n_held, len(pool))
    train_n = len(pool) - n_held
    params = [p for m in (text, image) for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2 and p is not text.model.token_embedding.weight]
    rest = [p for p in params if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    gen = torch.Generator().manual_seed(seed)
    logit_scale = text.model.logit_scale

    def batch_loss(rows: torch.Tensor) -> torch.Tensor:
        cap = caption_of[rows]
        return contrastive_loss(image_features(image, to_unit(pool[rows])), text_features(text, tokens[cap]),
                                cap[:, None] == cap[None, :], logit_scale)

    def held_out_loss() -> float:
        with torch.no_grad():
            rows = torch.arange(len(pool))[held][:batch]
            return float(batch_loss(rows))

    first = held_out_loss()
    history = []
    for step in range(steps):
        loss = batch_loss(torch.randint(train_n, (batch,), generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": loss.item(), "logit_scale": logit_scale.exp().item()})
            print(json.dumps(history[-1]), file=sys.stderr)
    held_loss = held_out_loss()
    # the image tower's logit_scale is the same trained value (open_clip keeps one per model)
    image.model.logit_scale.data.copy_(logit_scale.data)
    sd = {f"cond_stage_model.{k}": v.contiguous() for k, v in text.state_dict().items()}
    sd.update({f"embedder.{k}": v.contiguous() for k, v in image.state_dict().items()})
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    save_file(sd, tmp, metadata={"text_config": json.dumps(cfg.text.__dict__, default=list),
                                 "vision_config": json.dumps(cfg.vision.__dict__, default=list)})
    os.replace(tmp, out)
    return {"path": out, "pairs": len(pool), "captions": len(captions), "held_out_loss_untrained": first,
            "held_out_loss": held_loss, "chance_loss": math.log(batch), "history": history}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", required=True)
    p.add_argument("--video-dir")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=64, help="frames are cover-cropped to size x size first")
    CLIP_OPTIM.add_arguments(p)
    p.add_argument("--per-clip", type=int, default=4, help="evenly spaced frames taken from each clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overrides", type=json.loads, default=None,
                   help='tiny model sizes as in model.tiny_overrides, e.g. {"vision": {"vision_width": 48}}')
    a = p.parse_args(argv)
    result = train_clip(a.csv, a.out, size=a.size, optim=Optim.from_args(a), per_clip=a.per_clip,
                        seed=a.seed, overrides=a.overrides, video_dir=a.video_dir)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return result


if __name__ == "__main__":
    main()
