"""OpenCLIP towers as DynamiCrafter uses them (design §2-3), built by open_clip with the
checkpoint's sizes and no pretrained download; weights come from our checkpoint.

- text (`cond_stage_model`): all 77 token states after the penultimate block, then ln_final.
- image (`embedder`): all 257 tokens of the last vision block, no ln_post / proj, after the
  official preprocessing (kornia bicubic 224x224 with its antialias, in [-1, 1] space).
"""
from __future__ import annotations

import kornia
import torch
from torch import nn

from ..config import ClipConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_open_clip(cfg: ClipConfig, keep: str):
    """An open_clip CLIP of these sizes; keep='text' drops the vision tower (official text
    encoder), keep='vision' drops the text transformer (official image embedder)."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg   # imported when first needed (~5 s)
    vision = CLIPVisionCfg(layers=max(cfg.vision_layers, 1), width=cfg.vision_width,
                           head_width=cfg.vision_width // cfg.vision_heads, patch_size=cfg.patch_size,
                           image_size=cfg.image_size, mlp_ratio=cfg.mlp_ratio)
    text = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
                       heads=cfg.text_heads, layers=max(cfg.text_layers, 1), mlp_ratio=cfg.mlp_ratio)
    if keep == "text":   # don't build a full-size vision tower only to throw it away
        vision = CLIPVisionCfg(layers=1, width=64, head_width=64, patch_size=14, image_size=14)
    model = CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)
    if keep == "text":
        del model.visual
    else:
        del model.transformer
    model._buffers.pop("attn_mask", None)   # we build the causal mask where it is used
    return model


class TextEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.model = build_open_clip(cfg, keep="text")

    @staticmethod
    def tokenize(prompts: list[str]) -> torch.Tensor:
        import open_clip
        return open_clip.tokenize(prompts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding
        mask = open_clip_causal_mask(tokens.shape[1], x)
        for block in m.transformer.resblocks[:-1]:      # penultimate layer
            x = block(x, attn_mask=mask)
        return m.ln_final(x)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        device = self.model.token_embedding.weight.device
        return self(self.tokenize(list(prompts)).to(device))


def clip_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1] -> normalised (n, 3, size, size), as the official image embedder:
    kornia bicubic resize with its antialias (aspect ratio not kept) in [-1, 1] space, then
    (x + 1) / 2 and CLIP's mean/std (design §3)."""
    x = kornia.geometry.resize(images, (size, size), interpolation="bicubic", align_corners=True, antialias=True)
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype)
    return kornia.enhance.normalize(x, mean, std)


def open_clip_causal_mask(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device=like.device, dtype=like.dtype).triu_(1)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.model = build_open_clip(cfg, keep="vision")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return clip_preprocess(images, self.cfg.image_size)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> (n, 1 + grid^2, width): CLS + patch tokens of the last block."""
        v = self.model.visual
        x = v.conv1(pixels).flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        return v.transformer(v.ln_pre(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.preprocess(images))
