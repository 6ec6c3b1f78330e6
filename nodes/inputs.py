"""Input groups that several nodes share, declared once (V3 schema).

Widget order is part of every saved workflow: a group's inputs keep their order, and nodes add
the group where their old widgets were."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from comfy_api.v0_0_2 import io

from dynamicrafter.contract import FRAMES, LONG_FRAMES, STEPS
from dynamicrafter.sampling.schedule import MAX_TRAILING_STEPS
from dynamicrafter.settings import Guidance, Schedule

CATEGORY = "DynamiCrafter"
SPACINGS = ["auto", "uniform_trailing", "uniform"]
MAX_STEPS = STEPS[1]      # the library's limit; a spacing may define fewer counts (contract.check_steps)
SIZE_STEP = 64
MAX_FRAMES = FRAMES[1]                # frames of one UNet pass
MAX_VIDEO_FRAMES = LONG_FRAMES[1]     # frames of a video sampled in context windows
MAX_BATCH = 16


# The clip_vision our loader outputs and our encoders take. The frontend fills a link dropped on empty
# canvas with the nodes whose input type equals the link's type string exactly, so the pack's own pair
# type lists only our encoders there, not core 'CLIP Vision Encode' (whose output the resampler cannot
# read). Both sides of a connection are split at commas (frontend and queue-time validation), so a
# CLIPVisionLoader's CLIP_VISION still feeds our inputs and core nodes still take our output.
ClipVision = io.Custom("CLIP_VISION,DYNAMICRAFTER_CLIP_VISION")


def prompt_inputs(positive_tooltip: str | None = None, negative_tooltip: str | None = None) -> list:
    """positive, negative: the prompts' CONDITIONING (CLIPTextEncode)."""
    return [io.Conditioning.Input("positive", tooltip=positive_tooltip),
            io.Conditioning.Input("negative", tooltip=negative_tooltip)]


AUTO = 0     # a width / height / frames / fs / cfg_text widget at 0: the loaded model's own value
FROM_MODEL = "0 = the loaded model's own (its metadata: what it was trained at)"


def trained_settings(variant: dict) -> dict:
    """width, height, frames, fs the model was trained at: its variant metadata."""
    h, w = variant.get("resolution", (320, 512))
    return {"width": int(w), "height": int(h), "frames": int(variant.get("frames", 16)),
            "fs": int(variant.get("default_fs", 24))}


def or_trained(variant: dict, **values) -> dict:
    """The given width / height / frames / fs widget values, each AUTO one replaced by the model's."""
    trained = trained_settings(variant)
    return {name: int(value) or trained[name] for name, value in values.items()}


def frames_input(name: str, tooltip: str, maximum: int, from_model: bool = False, default: int = 16):
    """A frame count; from_model: 0 (the default) = the model's trained frames."""
    if from_model:
        return io.Int.Input(name, default=AUTO, min=0, max=maximum, tooltip=f"{tooltip}; {FROM_MODEL}")
    return io.Int.Input(name, default=default, min=2, max=maximum, tooltip=tooltip)


def video_inputs(frames_tooltip: str, from_model: bool = False) -> list:
    """frames, batch_size: the empty video latent's length and batch."""
    return [frames_input("frames", frames_tooltip, MAX_VIDEO_FRAMES, from_model),
            io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH, tooltip="videos made at once")]


def size_inputs(default_width: int = 512, default_height: int = 320, from_model: bool = False) -> list:
    """width, height: the video size in pixels; from_model: 0 (the default) = the model's trained size."""
    note = "multiple of 64 (the UNet halves the 1/8-size latent three times)"
    if from_model:
        default_width = default_height = AUTO
        note += f"; {FROM_MODEL}"
    low = AUTO if from_model else 64
    return [io.Int.Input("width", default=default_width, min=low, max=2048, step=SIZE_STEP,
                         tooltip=f"video width in pixels, {note}"),
            io.Int.Input("height", default=default_height, min=low, max=2048, step=SIZE_STEP,
                         tooltip=f"video height in pixels, {note}")]


def pipeline_inputs(model_tooltip: str | None = None, positive_tooltip: str | None = None,
                    negative_tooltip: str | None = None) -> list:
    """model, clip_vision, vae, positive, negative: what the all-in-one long-shot nodes run on."""
    return [io.Model.Input("model", tooltip=model_tooltip), ClipVision.Input("clip_vision"),
            io.Vae.Input("vae"), *prompt_inputs(positive_tooltip, negative_tooltip)]


def fs_input(default: int = 24, tooltip: str | None = None, from_model: bool = False):
    """fs, the frame-rate conditioning; from_model: 0 (the default) = the model's own default fs."""
    tooltip = tooltip or ("frame-rate conditioning: fps for 512/1024/interp (512: 15-30, 1024: 5-15; smaller = "
                          "more motion), frame stride for 256 (1-6; larger = more motion)")
    if from_model:
        return io.Int.Input("fs", default=AUTO, min=0, max=60, tooltip=f"{tooltip}; {FROM_MODEL}")
    return io.Int.Input("fs", default=default, min=1, max=60, tooltip=tooltip)


def sampler_inputs() -> list:
    """seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing: the official DDIM settings."""
    return [
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                     tooltip="noise seed"),
        io.Int.Input("steps", default=50, min=1, max=MAX_STEPS,
                     tooltip=f"DDIM steps (official: 50); uniform_trailing spacing: any count up to "
                             f"{MAX_TRAILING_STEPS}, some above it are undefined"),
        io.Float.Input("cfg_text", default=float(AUTO), min=0.0, max=30.0, step=0.1,
                       tooltip="text guidance scale (1 = no guidance); 0 = the loaded model's own guidance, "
                               "its cfg_text and (cfg_img at 0) its cfg_img: 7.5 single CFG for the released "
                               "DynamiCrafter, 12 for VideoCrafter, text-only cfg 2 for the demo model"),
        io.Float.Input("cfg_img", default=0.0, min=0.0, max=30.0, step=0.1,
                       tooltip="image guidance scale of dual (multi-condition) CFG; 0 = off, i.e. single CFG "
                               "as the official default (the model's own when cfg_text is 0); 1 = text-only "
                               "guidance (the image in both branches)"),
        io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.05,
                       tooltip="DDIM eta (official scripts: 1.0; 0 = deterministic)"),
        io.Float.Input("guidance_rescale", default=0.7, min=0.0, max=1.0, step=0.05,
                       tooltip="official: 0.7 for 512/1024/interp, 0 for 256"),
        io.Combo.Input("spacing", options=SPACINGS, default="auto",
                       tooltip="DDIM timesteps; auto = the variant's (uniform_trailing for v models, uniform "
                               "for 256)"),
    ]


@dataclass(frozen=True)
class SamplerSettings:
    """The `sampler_inputs` widgets of a node, read once: seed, steps, cfg_text, cfg_img (0 = single
    CFG), eta, guidance_rescale, spacing ("auto" = the variant's); and the DDIM node's solver and
    cfg_camera (CamI2V camera CFG, 1 = off). The library's settings come from `guidance(variant)` and
    `schedule(variant)`."""
    seed: int
    steps: int
    cfg_text: float
    cfg_img: float
    eta: float
    guidance_rescale: float
    spacing: str
    solver: str = "ddim"
    cfg_camera: float = 1.0

    @classmethod
    def of(cls, seed, steps, cfg_text, cfg_img, eta, guidance_rescale, spacing) -> "SamplerSettings":
        return cls(int(seed), int(steps), float(cfg_text), float(cfg_img), float(eta), float(guidance_rescale), spacing)

    def shifted(self, k: int) -> "SamplerSettings":
        """The same settings with seed + k (segment / pair k of a long shot)."""
        return dataclasses.replace(self, seed=self.seed + k)

    def guidance(self, variant: dict) -> Guidance:
        """cfg_text AUTO (0): the model's own cfg_text, and its cfg_img unless cfg_img is set (> 0)."""
        cfg_img = self.cfg_img if self.cfg_img > 0 else None
        if self.cfg_text == AUTO:
            own = Guidance.of_model(variant)
            return Guidance(own.cfg_text, cfg_img or own.cfg_img, self.guidance_rescale, camera=float(self.cfg_camera))
        return Guidance(self.cfg_text, cfg_img, self.guidance_rescale, camera=float(self.cfg_camera))

    def schedule(self, variant) -> Schedule:
        spacing = variant.get("spacing", "uniform_trailing") if self.spacing == "auto" else self.spacing
        return Schedule(self.steps, spacing, self.eta if self.solver == "ddim" else 0.0, self.solver)


@dataclass(frozen=True)
class Pipeline:
    """The `pipeline_inputs` of an all-in-one node: model, clip_vision, vae, positive, negative."""
    model: object
    clip_vision: object
    vae: object
    positive: object
    negative: object


@dataclass(frozen=True)
class VideoSettings:
    """The video a node makes: the `size_inputs` (width x height pixels), its frames and `fs_input`."""
    width: int
    height: int
    frames: int
    fs: int
