"""training.pretrain_clip: the tiny CLIP towers' contrastive run (the demo model's context stream)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training.pretrain_clip import contrastive_loss, train_clip
from training.pretrain_vae import Optim
from training.modeling import build_tiny, overlay_extras
from training.synthetic import generate_dataset


def test_loss_is_open_clips_when_every_caption_differs_and_shares_repeated_captions():
    from open_clip.loss import ClipLoss
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    scale = torch.tensor(2.0)
    unique = torch.eye(6, dtype=torch.bool)
    ours = contrastive_loss(img, txt, unique, scale)
    theirs = ClipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale.exp())
    torch.testing.assert_close(ours, theirs)
    # two rows with one caption: each is a positive of the other, half the target mass each
    same = unique.clone()
    same[0, 1] = same[1, 0] = True
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    row0 = -(logits[0].log_softmax(-1)[:2].mean())
    manual_rows = torch.stack([row0, -(logits[1].log_softmax(-1)[:2].mean())]
                              + [-logits[i].log_softmax(-1)[i] for i in range(2, 6)]).mean()
    manual_cols = torch.stack([-(logits[:, 0].log_softmax(-1)[:2].mean()), -(logits[:, 1].log_softmax(-1)[:2].mean())]
                              + [-logits[:, i].log_softmax(-1)[i] for i in range(2, 6)]).mean()
    torch.testing.assert_close(contrastive_loss(img, txt, same, scale), 0.5 * (manual_rows + manual_cols))


def test_towers_learn_the_captions_and_load_into_the_tiny_model(tmp_path):
    data = tmp_path / "clips"
    generate_dataset(str(data), 24, height=32, width=32, frames=4, fps=8, seed=5)
    out = tmp_path / "clip.safetensors"
    r = train_clip(str(data / "captions.csv"), str(out), size=32, optim=Optim(30, 32, 2e-3, log_every=10),
                   per_clip=2)
    first, last = r["history"][0]["loss"], r["history"][-1]["loss"]
    assert last < 0.8 * first, r["history"]                 # the towers fit their pairs
    dc = build_tiny(4, 0)
    before = {k: v.clone() for k, v in dc.state_dict().items()}
    n = overlay_extras(dc, [str(out)], ("cond_stage_model.", "embedder."))
    towers = [k for k in before if k.startswith(("cond_stage_model.", "embedder."))]
    assert n == len(towers)                                 # every tower tensor, nothing else
    assert all(torch.equal(before[k], v) for k, v in dc.state_dict().items() if k not in towers)
    assert not torch.equal(before["embedder.model.visual.conv1.weight"],
                           dc.state_dict()["embedder.model.visual.conv1.weight"])
