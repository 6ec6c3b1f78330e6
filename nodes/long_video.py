"""DynamiCrafter Long Video: videos longer than one segment, chained or in context windows.

method "chained": segment k+1 is generated from the last decoded frame of segment k
(image-to-video), so every segment starts exactly where the previous one ended; the repeated
first frame of each later segment is dropped when joining (`dynamicrafter.sampling.long_shots.chain_segments`).
method "windows": one video of total_frames sampled in context windows of segment_frames frames
overlapping by half a window (`sample_ddim(window=...)`, blended at every step). README "Long
shots" measures both; the default is the one that won there.
"""
from __future__ import annotations

import dataclasses

import torch
from comfy_api.v0_0_2 import io

from dynamicrafter.contract import check_size
from dynamicrafter.sampling.long_shots import (DEFAULT_LONG_VIDEO_METHOD, LONG_VIDEO_METHODS, chain_segments,
                                               window_overlap)
from dynamicrafter.settings import Motion, Windows

from .clip_vision import encode_clip_vision
from .conditioning import build_conditioning
from .decode import decode_video
from .images import check_finite
from .comfy_model import require_dynamicrafter_model
from .inputs import (CATEGORY, MAX_FRAMES, MAX_VIDEO_FRAMES, Pipeline, SamplerSettings, VideoSettings, frames_input,
                     fs_input, or_trained,
                     pipeline_inputs, sampler_inputs, size_inputs)
from .validation import validate_steps
from .resampler import resample_context
from .motion import encode_schedule, mask_input, schedule_input
from .sampler import run_ddim

METHODS = list(LONG_VIDEO_METHODS)


def chained_video(pipe: Pipeline, start_image, video: VideoSettings, segment_frames, settings: SamplerSettings,
                  frames_per_batch=4, mask=None, schedule=None) -> torch.Tensor:
    """`video.frames` frames in segments of segment_frames; `schedule` (a PromptSchedule): segment k's
    text is the schedule's at its centre frame."""
    model, vae, positive, negative = pipe.model, pipe.vae, pipe.positive, pipe.negative
    check_long_video(start_image, video.width, video.height, video.frames, segment_frames)
    segment = dataclasses.replace(video, frames=segment_frames)

    def animate_from(k, image):
        context = resample_context(model, encode_clip_vision(pipe.clip_vision, image))
        prompt = positive
        if schedule is not None:
            centre = k * (segment_frames - 1) + (segment_frames - 1) / 2
            prompt = [[schedule.text_at(centre), dict(positive[0][1])]]
        pos, neg, _, latent = build_conditioning(prompt, negative, vae, context, image, segment, 1, "image-to-video")
        out = run_ddim(model, pos, neg, latent, settings.shifted(k), motion=Motion(mask))
        return decode_video(vae, out, frames_per_batch, "keep all frames")

    return chain_segments(animate_from, start_image[:1], video.frames, segment_frames)


def check_long_video(start_image, width, height, total_frames, segment_frames) -> None:
    if segment_frames < 2:
        raise ValueError(f"segment_frames must be at least 2, got {segment_frames}")
    if not 2 <= total_frames <= MAX_VIDEO_FRAMES:
        raise ValueError(f"total_frames must be in 2..{MAX_VIDEO_FRAMES}, got {total_frames}")
    check_size(height, width)
    check_finite(start_image, "start_image")


def windowed_video(pipe: Pipeline, start_image, video: VideoSettings, segment_frames, settings: SamplerSettings,
                   frames_per_batch=4, mask=None, schedule=None) -> torch.Tensor:
    """`video.frames` frames in context windows of segment_frames; `schedule`: each window's text."""
    model, vae = pipe.model, pipe.vae
    check_long_video(start_image, video.width, video.height, video.frames, segment_frames)
    image = start_image[:1]
    context = resample_context(model, encode_clip_vision(pipe.clip_vision, image))
    pos, neg, _, latent = build_conditioning(pipe.positive, pipe.negative, vae, context, image, video, 1,
                                             "image-to-video")
    out = run_ddim(model, pos, neg, latent, settings,
                   windows=Windows(segment_frames, window_overlap(segment_frames)),
                   motion=Motion(mask, prompt_schedule=schedule))
    return decode_video(vae, out, frames_per_batch, "keep all frames")


def long_video(method, *args, **kwargs) -> torch.Tensor:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return (chained_video if method == "chained" else windowed_video)(*args, **kwargs)


class DynamiCrafterLongVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterLongVideo",
            display_name="DynamiCrafter Long Video (chained segments or context windows)",
            category=CATEGORY,
            description="Videos longer than one segment: 'chained' animates each segment from the previous "
                        "segment's last frame (positions join, motion restarts at each join); 'windows' samples "
                        "the whole video in overlapping context windows of segment_frames, blended at every step.",
            inputs=[
                *pipeline_inputs(),
                io.Image.Input("start_image", tooltip="the first frame of the whole video"),
                *size_inputs(from_model=True),
                io.Int.Input("total_frames", default=48, min=2, max=MAX_VIDEO_FRAMES,
                             tooltip="frames of the whole video"),
                frames_input("segment_frames", "frames per generated segment (the model's 16)", MAX_FRAMES,
                             from_model=True),
                fs_input(from_model=True),
                *sampler_inputs(),
                # after every older widget: saved workflows keep their widget order (and chain, as before)
                io.Combo.Input("method", options=METHODS, default=DEFAULT_LONG_VIDEO_METHOD, optional=True,
                               tooltip="chained: segments from the previous one's last frame; windows: one video in "
                                       "context windows of segment_frames (README: Long shots says which wins when)"),
                schedule_input(),
                io.Clip.Input("clip", optional=True, tooltip="text encoder for prompt_schedule"),
                mask_input(),
            ],
            outputs=[io.Image.Output(display_name="frames")])

    @classmethod
    def validate_inputs(cls, steps, spacing):    # at queue time: steps the spacing cannot make
        return validate_steps(cls, steps, spacing)

    @classmethod
    def execute(cls, model, clip_vision, vae, positive, negative, start_image, width, height, total_frames,
                segment_frames, fs, seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing,
                method="chained", prompt_schedule="", clip=None, mask=None) -> io.NodeOutput:
        schedule = encode_schedule(clip, prompt_schedule)
        s = or_trained(require_dynamicrafter_model(model).variant, width=width, height=height,
                       frames=segment_frames, fs=fs)
        settings = SamplerSettings.of(seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing)
        return io.NodeOutput(long_video(method, Pipeline(model, clip_vision, vae, positive, negative), start_image,
                                        VideoSettings(s["width"], s["height"], total_frames, s["fs"]), s["frames"],
                                        settings, mask=mask, schedule=schedule))


NODES = [DynamiCrafterLongVideo]
