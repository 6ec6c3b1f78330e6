"""DynamiCrafter Camera (CamI2V): a camera move (a preset of the official demo, a simple pan / zoom / orbit,
or a RealEstate10K-style pose file) attached to the positive and negative conditioning, which our DDIM
sampler and the core samplers (KSampler ...) give to a CamI2V model; plus a top view of the path."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

import folder_paths
from comfy_api.v0_0_2 import io

from dynamicrafter import camera as geometry

from .inputs import CATEGORY

CUSTOM = "custom move (pan / zoom / orbit below)"
KEY = "dc_camera"


@dataclasses.dataclass(frozen=True, eq=False)
class CameraMove:
    """A trajectory (N, 4, 4) float64 world-to-camera, resampled to the clip's frames when sampling."""
    w2c: torch.Tensor
    extract_ratio: float = 1.0
    trace_scale: float = 1.0

    def condition(self, dc, frames: int, height: int, width: int, generator=None):
        RT = geometry.resample_trajectory(self.w2c, frames, self.extract_ratio)[None]
        K = geometry.intrinsics(height, width, frames=frames)
        return dc.encode_camera(RT, K, (height, width), self.trace_scale, generator=generator)


def camera_condition(inner, move, latent_shape, seed: int = 0):
    """The CamI2V condition of `move` for a latent (b, 4, T, h, w), cached on the model per move and size."""
    dc = inner.dc_model
    if dc.cfg.camera is None:
        raise ValueError("the conditioning carries a camera move but this model has no camera control: load a "
                         "CamI2V checkpoint, or remove the 'DynamiCrafter Camera' node")
    t, h, w = int(latent_shape[2]), int(latent_shape[3]), int(latent_shape[4])
    cache = inner.__dict__.setdefault("_camera_cache", {})
    key = (id(move), t, h, w, seed)
    if key not in cache:
        cache.clear()
        with torch.no_grad():
            cache[key] = (move, move.condition(dc, t, 8 * h, 8 * w, torch.Generator().manual_seed(seed)))
    return cache[key][1]


def with_camera(conditioning, move):
    return [[c[0], {**c[1], KEY: move}] for c in conditioning]


class DynamiCrafterCamera(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterCamera",
            display_name="DynamiCrafter Camera (CamI2V)",
            category=CATEGORY,
            description="A camera move for a CamI2V checkpoint: one of the 16 moves of the official demo, a simple "
                        "pan / zoom / orbit, or a RealEstate10K-style pose file. Put it between the conditioning "
                        "and the sampler; the preview shows the camera path from above.",
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Combo.Input("preset", options=[*geometry.PRESET_NAMES, CUSTOM], default="orbit left",
                               tooltip="the official demo's camera moves, or a custom move from the numbers below"),
                io.Float.Input("speed", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="part of the preset's path covered by the clip (official trace_extract_ratio; "
                                       "the demo's UI uses 0.1: a slow start of the move)"),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="scale of the camera's translation (official trace_scale_factor)"),
                io.Float.Input("pan_right", default=0.0, min=-5.0, max=5.0, step=0.05, optional=True,
                               tooltip="custom move: sideways travel over the clip (negative: left)"),
                io.Float.Input("pan_down", default=0.0, min=-5.0, max=5.0, step=0.05, optional=True,
                               tooltip="custom move: vertical travel over the clip (negative: up)"),
                io.Float.Input("zoom", default=0.0, min=-5.0, max=5.0, step=0.05, optional=True,
                               tooltip="custom move: forward travel over the clip (negative: backwards)"),
                io.Float.Input("orbit", default=0.0, min=-180.0, max=180.0, step=1.0, optional=True,
                               tooltip="custom move: degrees the camera orbits around a point 3 units ahead "
                                       "(positive: to the left)"),
                io.String.Input("pose_file", default="", optional=True,
                                tooltip="a RealEstate10K-style pose file (one 'id fx fy cx cy k1 k2' + 3x4 "
                                        "world-to-camera row per pose) in ComfyUI's input folder; overrides preset"),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Image.Output(display_name="path preview")])

    @classmethod
    def execute(cls, positive, negative, preset, speed, strength, pan_right=0.0, pan_down=0.0, zoom=0.0,
                orbit=0.0, pose_file="") -> io.NodeOutput:
        if pose_file:
            path = Path(folder_paths.get_input_directory()) / pose_file
            if not path.resolve().is_relative_to(Path(folder_paths.get_input_directory()).resolve()):
                raise ValueError(f"pose_file {pose_file!r} must lie inside ComfyUI's input folder")
            if not path.is_file():
                raise ValueError(f"pose_file {pose_file!r} not found in ComfyUI's input folder")
            w2c = geometry.read_pose_file(path)
        elif preset == CUSTOM:
            w2c = geometry.simple_trajectory(16, pan=(pan_right, pan_down), zoom=zoom, orbit=orbit)
        else:
            w2c = geometry.preset_poses(preset)
        move = CameraMove(w2c, float(speed), float(strength))
        shown = geometry.resample_trajectory(w2c, 16, float(speed))
        shown_c2w = torch.linalg.inv(shown)
        shown_c2w[:, :3, 3] *= float(strength)
        preview = geometry.top_view(torch.linalg.inv(shown_c2w))[None].float()
        return io.NodeOutput(with_camera(positive, move), with_camera(negative, move), preview)


NODES = [DynamiCrafterCamera]
