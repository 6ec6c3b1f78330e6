"""DynamiCrafter Keyframes: one shot through N keyframes with an interpolation model.

Every consecutive pair of keyframes (an IMAGE batch, e.g. a storyboard) is in-betweened by the
512-interp model or ToonCrafter (the same node: the VAE the loader returns knows which decoder
it needs). Pair k's clip starts on keyframe k and ends on keyframe k+1; clip k+1 starts on that
same keyframe again, so its first frame is dropped when joining: N keyframes and T frames per
pair give 1 + (N-1)(T-1) frames, each keyframe appears once, nothing is cross-faded.
"""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from dynamicrafter.contract import FRAMINGS, check_size
from dynamicrafter.settings import Motion

from .clip_vision import encode_clip_vision
from .conditioning import build_conditioning
from .decode import decode_video
from .images import check_finite, fit_frames
from .inputs import (CATEGORY, MAX_FRAMES, Pipeline, SamplerSettings, VideoSettings, fs_input, pipeline_inputs,
                     sampler_inputs, size_inputs)
from .validation import validate_steps
from .resampler import resample_context
from .motion import mask_input
from .sampler import run_ddim

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


def keyframe_video(pipe: Pipeline, keyframes, video: VideoSettings, settings: SamplerSettings, clip=None,
                   prompts: str = "", frames_per_batch: int = 4, mask=None,
                   framing: str = "pad") -> torch.Tensor:
    """Pairs of keyframes in-betweened in video.frames frames each (width x height, fs; the keyframes fitted
    to that size as `framing` says, contract.FRAMINGS), joined."""
    model, clip_vision, vae, positive, negative = pipe.model, pipe.clip_vision, pipe.vae, pipe.positive, pipe.negative
    width, height, frames = video.width, video.height, video.frames
    if keyframes.ndim != 4 or not 2 <= keyframes.shape[0] <= MAX_KEYFRAMES:
        raise ValueError(f"keyframes must be an IMAGE batch of 2..{MAX_KEYFRAMES} images (e.g. 'Batch Images' or "
                         f"a folder loader), got shape {tuple(keyframes.shape)}")
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames per pair must be in 2..{MAX_FRAMES}, got {frames}")
    check_size(height, width)
    check_finite(keyframes, "keyframes")
    pairs = keyframes.shape[0] - 1
    texts = pair_prompts(prompts, pairs)
    if any(texts) and clip is None:
        raise ValueError("pair_prompts needs the clip input (the text encoder) to encode them")
    keys = fit_frames(keyframes, width, height, framing)   # every pair sees the same pixels of a shared keyframe
    pieces = []
    for k in range(pairs):
        start, end = keys[k:k + 1], keys[k + 1:k + 2]
        pos = positive if texts[k] is None else encode_prompt(clip, texts[k])
        context = resample_context(model, encode_clip_vision(clip_vision, start))
        p, n, _, latent = build_conditioning(pos, negative, vae, context, start, video, 1, "interpolation", end)
        out = run_ddim(model, p, n, latent, settings.shifted(k), motion=Motion(mask))
        clip_frames = decode_video(vae, out, frames_per_batch, "keep all frames")
        pieces.append(clip_frames if k == 0 else clip_frames[1:])   # keyframe k ended the previous clip
    return torch.cat(pieces)


class DynamiCrafterKeyframes(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterKeyframes",
            display_name="ToonCrafter / DynamiCrafter Keyframes (in-between N images)",
            category=CATEGORY,
            description="One shot through N keyframes (a storyboard): each pair in-betweened by an interpolation "
                        "model (DynamiCrafter 512_interp or ToonCrafter), joined without repeated or cross-faded "
                        "frames; optional prompt per pair. Pair k uses seed + k.",
            inputs=[
                *pipeline_inputs("an interpolation model: DynamiCrafter 512_interp or ToonCrafter",
                                 "prompt of every pair without its own line in pair_prompts",
                                 "CLIPTextEncode of an empty prompt"),
                io.Image.Input("keyframes", tooltip="N keyframes in order (an IMAGE batch); N-1 pairs are "
                                                    "in-betweened"),
                *size_inputs(),
                io.Int.Input("frames", default=16, min=2, max=MAX_FRAMES,
                             tooltip="frames per pair, both keyframes included (the models' 16)"),
                fs_input(10, "fps conditioning (official: 10)"),
                *sampler_inputs(),
                io.Clip.Input("clip", optional=True, tooltip="text encoder for pair_prompts"),
                io.String.Input("pair_prompts", optional=True, multiline=True, default="",
                                tooltip="one prompt per pair, line by line; a blank line (or no line) uses the "
                                        "positive input"),
                mask_input(),
                io.Combo.Input("framing", options=list(FRAMINGS), default="pad", optional=True,
                               tooltip="keyframes of another aspect ratio than width x height: pad keeps the whole "
                                       "picture on a grey border, crop covers and cuts the edges off (centre "
                                       "crop), stretch distorts it to the size"),
            ],
            outputs=[io.Image.Output(display_name="frames")])

    @classmethod
    def validate_inputs(cls, steps, spacing):    # at queue time: steps the spacing cannot make
        return validate_steps(cls, steps, spacing)

    @classmethod
    def execute(cls, model, clip_vision, vae, positive, negative, keyframes, width, height, frames, fs, seed, steps,
                cfg_text, cfg_img, eta, guidance_rescale, spacing, clip=None, pair_prompts="",
                mask=None, framing="pad") -> io.NodeOutput:
        settings = SamplerSettings.of(seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing)
        return io.NodeOutput(keyframe_video(Pipeline(model, clip_vision, vae, positive, negative), keyframes,
                                            VideoSettings(width, height, frames, fs), settings, clip, pair_prompts,
                                            mask=mask, framing=framing))


NODES = [DynamiCrafterKeyframes]
