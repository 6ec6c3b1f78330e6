"""Directing the motion in ComfyUI (``dynamicrafter.sampling.motion``): the optional inputs the DDIM
sampler, Long Video and Keyframes nodes share (a motion-brush MASK, denoise from a video latent,
the motion knob, a prompt schedule), and DynamiCrafter Video Latent, which lays a core VAEEncode
latent of a clip's frames ((T, 4, h, w): frames as the batch) out as our video latent (1, 4, T, h, w)
so core KSampler's denoise (and our DDIM node's) can start from the clip; DynamiCrafter Hold Image,
the motion brush's paste-back after decoding (``dynamicrafter.sampling.motion.paste_back``).
"""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from dynamicrafter.config import TEXT_CONTEXT_LEN
from dynamicrafter.sampling.motion import PromptSchedule, paste_back, parse_prompt_schedule

from .images import check_finite, resize_center
from .inputs import CATEGORY

__all__ = ["mask_input", "motion_inputs", "schedule_input", "video_latent", "mask_frames", "encode_schedule",
           "hold_image"]


def mask_input():
    return io.Mask.Input("mask", optional=True,
                         tooltip="motion brush (core MASK: mask editor, LoadImage's mask, SolidMask...): 1 = free "
                                 "to move, 0 = hold the input image still; one mask, or one per frame")


def motion_inputs() -> list:
    """The widgets after every older one (saved workflows keep their order): mask_feather, motion."""
    return [
        io.Float.Input("mask_feather", default=1.0, min=0.0, max=8.0, step=0.25, optional=True,
                       tooltip="soft edge of the mask, in latent pixels (1 = 8 image pixels); 0 = hard edge"),
        io.Float.Input("motion", default=1.0, min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip="motion amount: 1 = the model's own (today's sampler); lower starts later in the "
                               "schedule from the input image (CIL analytic init): less motion, closer to the "
                               "image; 0 = the still image"),
    ]


def video_latent(samples: torch.Tensor) -> torch.Tensor:
    """A LATENT's samples as our video layout: (T, 4, h, w) frames (core VAEEncode of a clip's
    frames) -> (1, 4, T, h, w); a video latent (b, 4, T, h, w) unchanged."""
    if samples.ndim == 4 and samples.shape[1] == 4:
        return samples.transpose(0, 1)[None]
    if samples.ndim == 5:
        return samples
    raise ValueError(f"the latent must be a video latent (b, 4, T, h, w) or a clip's frames from core VAEEncode "
                     f"(T, 4, h, w); got {tuple(samples.shape)}")


def mask_frames(mask: torch.Tensor) -> torch.Tensor:
    """A core MASK ((H, W) or (B, H, W): one mask or one per frame) as the library's motion mask."""
    if mask.ndim == 3 and mask.shape[0] == 1:
        return mask[0]
    return mask


def schedule_input():
    return io.String.Input("prompt_schedule", optional=True, multiline=True, default="",
                           tooltip="prompts along the video, e.g. '0: a boat on a calm lake | 24: a storm rises' "
                                   "(frame: prompt, separated by |); each window / segment gets the prompts "
                                   "interpolated at its centre frame. Empty = the positive input. Needs clip")


def encode_schedule(clip, text: str) -> PromptSchedule | None:
    """The prompt schedule's prompts encoded by core CLIP (as CLIPTextEncode); None for an empty text."""
    if not (text or "").strip():
        return None
    if clip is None:
        raise ValueError("prompt_schedule needs the clip input (the text encoder) to encode its prompts")
    entries = parse_prompt_schedule(text)
    texts = [clip.encode_from_tokens_scheduled(clip.tokenize(p))[0][0][:, :TEXT_CONTEXT_LEN] for _, p in entries]
    return PromptSchedule([f for f, _ in entries], torch.cat(texts))


class DynamiCrafterVideoLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterVideoLatent",
            display_name="DynamiCrafter Video Latent (from VAEEncode frames)",
            category=CATEGORY,
            description="Video to video: lays the VAEEncode latent of a clip's frames (LoadVideo -> "
                        "GetVideoComponents -> VAEEncode, frames as the batch) out as a DynamiCrafter video latent, "
                        "for the latent_image of KSampler or the DDIM sampler with denoise < 1.",
            inputs=[io.Latent.Input("frames", tooltip="VAEEncode of the clip's frames, at the video's size")],
            outputs=[io.Latent.Output(display_name="latent")])

    @classmethod
    def execute(cls, frames) -> io.NodeOutput:
        return io.NodeOutput({**frames, "samples": video_latent(frames["samples"])})


def hold_image(frames: torch.Tensor, start_image: torch.Tensor, mask: torch.Tensor, feather: float) -> torch.Tensor:
    """Decoded IMAGE frames (T, H, W, 3) with the motion brush's held part pasted back from the start
    image (covered and centre-cropped to the frames' size, as the conditioning does)."""
    check_finite(frames, "images")
    check_finite(start_image, "start_image")
    height, width = frames.shape[1:3]
    image = resize_center(start_image[:1], width, height).movedim(-1, 1).to(frames)         # (1, 3, H, W)
    video = frames[..., :3].permute(3, 0, 1, 2)[None]                                       # (1, 3, T, H, W)
    return paste_back(video, image, mask_frames(mask), float(feather))[0].permute(1, 2, 3, 0)


class DynamiCrafterHoldImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterHoldImage",
            display_name="DynamiCrafter Hold Image (motion brush)",
            category=CATEGORY,
            description="The motion brush in pixels: where the mask holds (0), the decoded frames take the start "
                        "image's pixels, blended over the mask's soft edge (frames = m decoded + (1 - m) image). "
                        "The sampler holds the latent; this keeps the VAE decoder from carrying the motion of the "
                        "free part into the held one. Give it the sampler's mask and mask_feather.",
            inputs=[
                io.Image.Input("images", tooltip="the decoded frames (DynamiCrafter Video Decode)"),
                io.Image.Input("start_image", tooltip="the image the video starts from (the conditioning's "
                                                      "start_image); covered and centre-cropped to the frames' size"),
                io.Mask.Input("mask", tooltip="the motion brush mask given to the sampler: 1 = moves, 0 = holds "
                                              "the start image; one mask, or one per frame"),
                io.Float.Input("mask_feather", default=1.0, min=0.0, max=8.0, step=0.25,
                               tooltip="the sampler's mask_feather: the soft edge in latent pixels (1 = 8 image "
                                       "pixels); 0 = hard edge"),
            ],
            outputs=[io.Image.Output(display_name="images")])

    @classmethod
    def execute(cls, images, start_image, mask, mask_feather) -> io.NodeOutput:
        return io.NodeOutput(hold_image(images, start_image, mask, mask_feather))


NODES = [DynamiCrafterVideoLatent, DynamiCrafterHoldImage]
