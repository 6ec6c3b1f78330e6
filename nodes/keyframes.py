"""DynamiCrafter Keyframes: one shot through N keyframes with an interpolation model.

Every consecutive pair of keyframes (an IMAGE batch, e.g. a storyboard) is in-betweened by the
512-interp model or ToonCrafter (the same node: the VAE the loader returns knows which decoder
it needs). Pair k's clip starts on keyframe k and ends on keyframe k+1; clip k+1 starts on that
same keyframe again, so its first frame is dropped when joining: N keyframes and T frames per
pair give 1 + (N-1)(T-1) frames, each keyframe appears once, nothing is cross-faded.
"""
from __future__ import annotations

import torch

from .clip_vision import encode_clip_vision
from .conditioning import MAX_FRAMES, build_conditioning, check_size
from .decode import decode_video
from .images import check_finite, resize_center
from .resampler import resample_context
from .sampler import MAX_STEPS, SPACINGS, run_ddim

MAX_KEYFRAMES = 64


def pair_prompts(text: str, pairs: int) -> list[str | None]:
    """One line per pair (blank line = the positive prompt); fewer lines than pairs: the rest use it."""
    lines = [ln.strip() for ln in (text or "").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) > pairs:
        raise ValueError(f"pair_prompts has {len(lines)} lines but {pairs + 1} keyframes make {pairs} pairs: "
                         f"give at most one line per pair")
    return [(lines[k] or None) if k < len(lines) else None for k in range(pairs)]


def encode_prompt(clip, text: str):
    """CONDITIONING of a prompt, as core CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def keyframe_video(model, clip_vision, vae, positive, negative, keyframes, width, height, frames, fs, seed, steps,
                   cfg_text, cfg_img, eta, guidance_rescale, spacing, clip=None, prompts: str = "",
                   frames_per_batch: int = 4) -> torch.Tensor:
    if keyframes.ndim != 4 or not 2 <= keyframes.shape[0] <= MAX_KEYFRAMES:
        raise ValueError(f"keyframes must be an IMAGE batch of 2..{MAX_KEYFRAMES} images (e.g. 'Batch Images' or "
                         f"a folder loader), got shape {tuple(keyframes.shape)}")
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames per pair must be in 2..{MAX_FRAMES}, got {frames}")
    check_size(width, height)
    check_finite(keyframes, "keyframes")
    pairs = keyframes.shape[0] - 1
    texts = pair_prompts(prompts, pairs)
    if any(texts) and clip is None:
        raise ValueError("pair_prompts needs the clip input (the text encoder) to encode them")
    keys = resize_center(keyframes, width, height)     # every pair sees the same pixels of a shared keyframe
    pieces = []
    for k in range(pairs):
        start, end = keys[k:k + 1], keys[k + 1:k + 2]
        pos = positive if texts[k] is None else encode_prompt(clip, texts[k])
        context = resample_context(model, encode_clip_vision(clip_vision, start))
        p, n, _, latent = build_conditioning(pos, negative, vae, context, start, width, height, frames, 1, fs,
                                             "interpolation", end)
        out = run_ddim(model, p, n, latent, seed + k, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing)
        clip_frames = decode_video(vae, out, frames_per_batch, "keep all frames")
        pieces.append(clip_frames if k == 0 else clip_frames[1:])   # keyframe k ended the previous clip
    return torch.cat(pieces)


class DynamiCrafterKeyframes:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "an interpolation model: DynamiCrafter 512_interp or ToonCrafter"}),
            "clip_vision": ("CLIP_VISION",),
            "vae": ("VAE",),
            "positive": ("CONDITIONING", {"tooltip": "prompt of every pair without its own line in pair_prompts"}),
            "negative": ("CONDITIONING", {"tooltip": "CLIPTextEncode of an empty prompt"}),
            "keyframes": ("IMAGE", {"tooltip": "N keyframes in order (an IMAGE batch); N-1 pairs are in-betweened"}),
            "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64}),
            "height": ("INT", {"default": 320, "min": 64, "max": 2048, "step": 64}),
            "frames": ("INT", {"default": 16, "min": 2, "max": MAX_FRAMES,
                               "tooltip": "frames per pair, both keyframes included (the models' 16)"}),
            "fs": ("INT", {"default": 10, "min": 1, "max": 60, "tooltip": "fps conditioning (official: 10)"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "pair k uses seed + k"}),
            "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS}),
            "cfg_text": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1}),
            "cfg_img": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "> 0: dual CFG with this image scale"}),
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05}),
            "guidance_rescale": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.05}),
            "spacing": (SPACINGS, {"default": "auto"}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "text encoder for pair_prompts"}),
            "pair_prompts": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "one prompt per pair, line by line; a blank line (or no line) "
                                                   "uses the positive input"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "generate"
    CATEGORY = "DynamiCrafter"
    DESCRIPTION = ("One shot through N keyframes: each pair in-betweened by the interpolation model "
                   "(512_interp or ToonCrafter), joined without repeated or cross-faded frames.")

    def generate(self, model, clip_vision, vae, positive, negative, keyframes, width, height, frames, fs, seed,
                 steps, cfg_text, cfg_img, eta, guidance_rescale, spacing, clip=None, pair_prompts=""):
        return (keyframe_video(model, clip_vision, vae, positive, negative, keyframes, width, height, frames, fs,
                               seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing, clip, pair_prompts),)


NODE_CLASS_MAPPINGS = {"DynamiCrafterKeyframes": DynamiCrafterKeyframes}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamiCrafterKeyframes": "DynamiCrafter Keyframes (in-between N images)"}
