"""CamI2V camera-control fine-tuning (``run.camera: true``; training/README.md §10).

What trains is exactly what the official CamI2V trainer trains: the pose encoder, and in the UNet's
temporal blocks the `pluker_projection` and `epipolar` attention modules; everything else (UNet,
Resampler, encoders) is frozen. A DynamiCrafter start gets these modules fresh, initialised as the
official code does: pluker_projection and the epipolar output layer zero (so training starts from the
DynamiCrafter model exactly), register tokens N(0, 1), every other layer PyTorch's default.

The camera condition of a training sample is made by the library (`dc.encode_camera`) from the clip's
world-to-camera poses and pixel intrinsics, relative to the sample's conditioning frame (the official
trainer draws it at random too); the zero-translation perturbation draws come from the sample's own
generator, so a step depends only on which samples it holds.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from dynamicrafter.config import with_camera
from dynamicrafter.model import DynamiCrafter
from dynamicrafter.models.camera import CameraCondition, CameraPoseEncoder, add_camera_modules

log = logging.getLogger("training.camera")

POSE_ENCODER = "pose_encoder."
UNET_CAMERA = (".pluker_projection.", ".epipolar.")
PERTURBATION_TAG = 2    # sample_generator tag of the zero-translation draws (0: Draws, 1: dropout masks)


def is_camera_parameter(name: str) -> bool:
    """A parameter of CamI2V's camera modules (official key layout)."""
    return name.startswith(POSE_ENCODER) or any(k in name for k in UNET_CAMERA)


def camera_names(dc) -> list[str]:
    return [n for n, _ in dc.named_parameters() if is_camera_parameter(n)]


def add_camera_control(dc: DynamiCrafter, origin_hw: tuple) -> DynamiCrafter:
    """A CamI2V model holding `dc`'s weights (unchanged) plus fresh camera modules (official init),
    epipolar masks made for `origin_hw` = the training size. A CamI2V `dc` is returned as it is."""
    if dc.cfg.camera is not None:
        return dc
    cfg = with_camera(dc.cfg, origin_hw)
    with torch.device("meta"):     # the base weights are taken over, not copied
        model = DynamiCrafter(cfg)
    model.pose_encoder = CameraPoseEncoder(cfg.camera)
    for block in model.unet.modules():
        if hasattr(block, "pluker_projection"):
            add_camera_modules(block, block.attn1.to_k.in_features, block.attn1.heads, cfg.camera.registers)
    missing, unexpected = model.load_state_dict(dc.state_dict(), strict=False, assign=True)
    stray = [k for k in missing if not k.endswith(".pos_encoder.pe") and not is_camera_parameter(k)]
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if stray or unexpected or still_meta:    # the camera config changed something else: a bug, not a user error
        raise RuntimeError(f"adding camera modules changed other tensors: {(stray + unexpected + still_meta)[:3]}")
    init_camera_modules(model)
    model.to(dc.sqrt_alphas_cumprod.device)
    log.info("added CamI2V camera modules to the DynamiCrafter model: %d tensors, %.2fM parameters",
             len(missing), sum(p.numel() for n, p in model.named_parameters() if is_camera_parameter(n)) / 1e6)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_camera_modules(dc: DynamiCrafter) -> None:
    """The official CamI2V initialisation (cami2v.py / epipolar.py): zero pluker_projection and epipolar
    output layer, N(0, 1) register tokens; the pose encoder and q/k/v keep PyTorch's default init."""
    for module in dc.unet.modules():
        if hasattr(module, "pluker_projection"):
            module.pluker_projection.weight.zero_()
            module.pluker_projection.bias.zero_()
            attn = module.epipolar.epipolar_attn
            attn.to_out[0].weight.zero_()
            attn.to_out[0].bias.zero_()
            attn.register_tokens.normal_()


def camera_condition(dc, RT: torch.Tensor, K: torch.Tensor, size: tuple, cond_frame: torch.Tensor,
                     generators: list) -> CameraCondition:
    """The camera condition of a micro-batch, each sample's poses taken relative to its own
    conditioning frame (one `encode_camera` per sample; the pose encoder keeps its gradients)."""
    cfg = dc.cfg.camera
    if cfg is None:
        raise ValueError("run.camera needs a model with camera control; build_model adds it")
    if size[0] != cfg.origin_h:
        raise ValueError(f"the epipolar masks are looked up for {cfg.origin_h}-pixel-high frames "
                         f"(camera origin_h) but the clips are {size[0]} high: set data.height={cfg.origin_h}")
    T = RT.shape[1]
    conds = []
    for i in range(RT.shape[0]):
        noise = torch.randn(1, T, T, 3, 1, generator=generators[i])
        conds.append(dc.encode_camera(RT[i:i + 1], K[i:i + 1], size=size, noise=noise,
                                      cond_frame=int(cond_frame[i])))
    if len(conds) == 1:
        return conds[0]
    features = [torch.cat(level, dim=0) for level in zip(*(c.pose_features for c in conds))]
    masks = {d: torch.cat([c.masks[d] for c in conds], dim=0) for d in conds[0].masks}
    return dataclasses.replace(conds[0], pose_features=features, masks=masks)
