"""The whole model: UNet, VAE, text and image encoders, resampler, schedule buffers.

Submodules carry the official names (`model.diffusion_model`, `first_stage_model`,
`cond_stage_model`, `embedder`, `image_proj_model`), so `state_dict()` is exactly the official
checkpoint layout and loads/saves with no key mapping. Pruned files leave parts as None.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import torch
from torch import nn

from .models.clip import ImageEncoder, TextEncoder
from .config import ModelConfig
from .contract import check_image, check_prompts
from .models.resampler import Resampler
from .sampling.schedule import variant_schedule
from .models.tiling import TILE, should_tile, tiled_decode
from .models.camera import CameraCondition, CameraPoseEncoder, encode_camera, mask_cell
from .models.ops import building_with
from .models.unet import UNet3D, grow_input_channels
from .models.vae import AutoencoderKL, posterior_sample
from .models.vae_dualref import DEFAULT_CHUNK, NO_REFERENCES_WARNING, AutoencoderKLDualref, decode_videos


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNet3D):
        super().__init__()
        self.diffusion_model = unet


class MissingComponentError(RuntimeError):
    pass


class DynamiCrafter(nn.Module):
    def __init__(self, cfg: ModelConfig, operations=None):
        """`operations`: the layer namespace of the UNet and resampler (`ops.py`; default torch.nn)."""
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNet3D(cfg.unet, operations))
        self.first_stage_model = make_vae(cfg.vae) if cfg.vae else None
        self.cond_stage_model = TextEncoder(cfg.text) if cfg.text else None
        self.embedder = ImageEncoder(cfg.vision) if cfg.vision else None
        self.image_proj_model = Resampler(cfg.resampler, operations) if cfg.resampler else None
        if cfg.camera:      # CamI2V
            with building_with(operations):
                self.pose_encoder = CameraPoseEncoder(cfg.camera)
        for name, value in variant_schedule(cfg.variant).items():
            self.register_buffer(name, value)
        self.scale_factor = cfg.scale_factor

    # ------------------------------------------------------------------ parts
    unet = property(lambda self: self.model.diffusion_model)
    vae = property(lambda self: self.first_stage_model)
    text_encoder = property(lambda self: self.cond_stage_model)
    image_encoder = property(lambda self: self.embedder)
    resampler = property(lambda self: self.image_proj_model)

    @property
    def variant(self) -> dict:
        return self.cfg.variant.as_dict()

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's compute dtype: biases are kept in it even when the matrices are stored in fp8."""
        return self.unet.time_embed[0].bias.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.time_embed[0].weight.device

    def _need(self, part, what):
        if part is None:
            raise MissingComponentError(
                f"this checkpoint has no {what} (a pruned UNet-only file?); load a full DynamiCrafter "
                f"checkpoint, or supply the {what} separately (in ComfyUI: the core loader for it)")
        return part

    def _dtype_of(self, module) -> torch.dtype:
        return next(module.parameters()).dtype

    # ------------------------------------------------------------------ conditioning
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (a str or a list of str) -> (b, 77, C): penultimate OpenCLIP layer + ln_final."""
        return self._need(self.cond_stage_model, "text encoder").encode(check_prompts(prompts)).float()

    def encode_clip_image(self, images: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) in [-1, 1] -> (b, 257, D) tokens of the last vision block."""
        enc = self._need(self.embedder, "CLIP image encoder")
        check_image(images, "images")
        return enc(images.to(self.device, self._dtype_of(enc))).float()

    def image_context(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """(b, 257, D) -> (b, 16*T, C) per-frame image context tokens."""
        res = self._need(self.image_proj_model, "context resampler")
        return res(clip_tokens.to(self.device, self._dtype_of(res))).float()

    # ------------------------------------------------------------------ VAE
    def vae_moments(self, images: torch.Tensor, frames_per_batch: int = 1) -> torch.Tensor:
        """(n, 3, H, W) in [-1, 1] -> (n, 8, H/8, W/8) = mean | logvar, a few images at a time."""
        vae = self._need(self.first_stage_model, "VAE")
        check_image(images, "images")
        check_vae_size(images.shape[-2:])
        dt = self._dtype_of(vae)
        return torch.cat([vae.moments(x.to(self.device, dt)).float() for x in images.split(frames_per_batch)])

    def encode_first_stage(self, images: torch.Tensor, noise: Optional[torch.Tensor] = None,
                           generator: Optional[torch.Generator] = None, sample: bool = True,
                           frames_per_batch: int = 1) -> torch.Tensor:
        """Scaled latents 0.18215 * z with z sampled from the posterior (as the official encode),
        or its mean with sample=False."""
        moments = self.vae_moments(images, frames_per_batch)
        z = posterior_sample(moments, noise, generator) if sample else moments.chunk(2, dim=1)[0]
        return self.scale_factor * z

    def decode(self, latents: torch.Tensor, frames_per_batch: Optional[int] = None,
               references: Optional[list] = None, tile: Optional[int] = None) -> torch.Tensor:
        """(b, 4, T, h, w) scaled latents -> (b, 3, T, H, W), not clamped. The SD VAE decodes
        frame by frame (`frames_per_batch` at a time, default 1); `tile`: latent tile side for
        spatial tiling (tiling.py), None tiles frames larger than 512x512 pixels, 0 never tiles.
        ToonCrafter's video decoder decodes each video as clips of the model's temporal length (as
        the official code), with `references` from `encode_references` (batch 1 or b);
        `frames_per_batch` is then only the chunk of its per-frame operations (memory, not the result)."""
        vae = self._need(self.first_stage_model, "VAE")
        b, _, t = latents.shape[:3]
        dt = self._dtype_of(vae)
        if isinstance(vae, AutoencoderKLDualref):
            return self._decode_dualref(vae, latents, references, frames_per_batch or DEFAULT_CHUNK)
        if references is not None:
            raise ValueError("references are for ToonCrafter's dual-reference decoder; this VAE decodes frames "
                             "on their own: call decode(latents) without them")
        z = (latents / self.scale_factor).transpose(1, 2).flatten(0, 1)
        run = vae.decode
        if should_tile(*z.shape[-2:], tile):
            run = functools.partial(tiled_decode, vae.decode, tile=tile or TILE, overlap=(tile or TILE) // 4)
        frames = torch.cat([run(part.to(self.device, dt)).float() for part in z.split(frames_per_batch or 1)])
        return frames.unflatten(0, (b, t)).transpose(1, 2)

    def _decode_dualref(self, vae, latents, references, chunk: int) -> torch.Tensor:
        if references is None:
            warnings.warn(NO_REFERENCES_WARNING, stacklevel=3)
        else:
            references = check_references(references, latents.shape[0], latents.shape[-2:], vae)
            references = [r.to(self.device, self._dtype_of(vae)) for r in references]
        z = (latents / self.scale_factor).to(self.device, self._dtype_of(vae))
        with torch.no_grad():
            return decode_videos(vae, z, references, self.cfg.variant.frames, chunk).float()

    def encode_references(self, start: torch.Tensor, end: torch.Tensor) -> list:
        """What ToonCrafter's decoder refers to, from the start and end images (b, 3, H, W) in
        [-1, 1]: the encoder's feature maps of levels 0..L-1, then of its input conv, each
        (b, C, 2, h, w) with [:, :, 0] the start image's and [:, :, 1] the end image's."""
        vae = self._need(self.first_stage_model, "VAE")
        if not isinstance(vae, AutoencoderKLDualref):
            raise ValueError("this model's VAE has no dual-reference decoder (not ToonCrafter): "
                             "decode without references")
        if start.shape != end.shape:
            raise ValueError(f"start {tuple(start.shape)} and end {tuple(end.shape)} images differ in shape")
        check_vae_size(start.shape[-2:])
        dt = self._dtype_of(vae)
        with torch.no_grad():
            return [r.float() for r in vae.references(start.to(self.device, dt), end.to(self.device, dt))]

    def grow_input_channels(self, in_channels: int) -> None:
        """Widen the UNet input (4 -> 8 for the image-concat stage), new weights zero."""
        grow_input_channels(self.unet, in_channels)
        self.cfg = dataclasses.replace(self.cfg, unet=self.unet.cfg)

    # ------------------------------------------------------------------ camera (CamI2V)
    def encode_camera(self, RT: torch.Tensor, K: torch.Tensor, size=None, trace_scale: float = 1.0,
                      noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                      cond_frame: int = 0) -> CameraCondition:
        """The camera condition of a CamI2V model: RT (b, T, 4, 4) world-to-camera poses, K (b, T, 3, 3)
        pixel intrinsics of the video, `size` (H, W) its pixel size (default: the model's resolution).
        Relative poses are taken to frame `cond_frame`, translations scaled by `trace_scale`; `noise`
        (b, T, T, 3, 1) or `generator` gives the N(0,1) draws of the zero-translation perturbation."""
        if self.cfg.camera is None:
            raise ValueError("this model has no camera control (not a CamI2V checkpoint): sample without camera")
        H, W = size or self.cfg.variant.resolution
        if H % 8 or W % 8:
            raise ValueError(f"camera size {W}x{H} must be a multiple of 8 (the latent's pixel size)")
        if not 0 <= cond_frame < RT.shape[1]:
            raise ValueError(f"cond_frame {cond_frame} is outside the {RT.shape[1]} camera poses")
        self.check_camera_height(H)
        return encode_camera(self.pose_encoder, self.cfg.camera, RT, K, H, W, trace_scale, noise, generator, cond_frame)

    def check_camera_height(self, H: int) -> None:
        """A temporal block of feature height h' looks its epipolar mask up as origin_h // h' (official
        rule, design: CamI2V); at a pixel height other than origin_h that lookup can find a mask made for
        another feature size, which the official code fails on with a shape error: say so plainly. (A
        lookup that finds no mask is unmasked attention, as officially: allowed.)"""
        cam = self.cfg.camera
        cells = {8 * r for r in cam.mask_resolutions}
        for level in range(len(self.cfg.unet.channel_mult)):
            h = H // 8 >> level
            d = mask_cell(cam.origin_h, h)
            if d in cells and d * h != H:
                raise ValueError(f"this CamI2V model's epipolar masks are made for videos {cam.origin_h} px high "
                                 f"(its config's origin_h); at {H} px they do not fit its features: sample at "
                                 f"height {cam.origin_h} (in ComfyUI, width/height 0 = the model's own size)")

    # ------------------------------------------------------------------ UNet
    def denoise(self, x_t: torch.Tensor, t, context: torch.Tensor, concat: Optional[torch.Tensor] = None,
                fs=None, temporal: bool = True, camera: Optional[CameraCondition] = None) -> torch.Tensor:
        """Raw UNet output (eps or v) for x_t (b, 4, T, h, w), with [x_t, concat] as input.
        `camera`: a CamI2V condition from encode_camera (None: the plain DynamiCrafter path)."""
        unet = self.unet
        x = x_t if concat is None else torch.cat([x_t, concat.to(x_t)], dim=1)
        if x.shape[1] != unet.cfg.in_channels:
            raise ValueError(f"the UNet takes {unet.cfg.in_channels} input channels, got {x.shape[1]} "
                             f"(latent {x_t.shape[1]} + concat {0 if concat is None else concat.shape[1]}); "
                             + ("this model needs the image latent (concat)" if concat is None else
                                "this is a text-to-video model: pass concat=None"))
        t = torch.as_tensor(t, device=x.device)
        fs = None if fs is None else torch.as_tensor(fs, device=x.device).long()
        dt = self.dtype
        if camera is not None:
            check_camera_condition(camera, self, x_t)
            camera = camera.to(x.device, dt)
        out = unet(x.to(dt), t, context.to(x.device, dt), fs, temporal=temporal, camera=camera)
        return out.to(x_t.dtype)


def check_camera_condition(camera, dc, x_t) -> None:
    if not isinstance(camera, CameraCondition):
        raise ValueError(f"camera must be the condition dc.encode_camera() returns, got {type(camera).__name__}")
    if dc.cfg.camera is None:
        raise ValueError("this model has no camera control (not a CamI2V checkpoint): pass camera=None")
    b, _, t, h, w = x_t.shape
    if camera.frames != t or camera.batch not in (1, b) or tuple(camera.pose_features[0].shape[-2:]) != (h, w):
        raise ValueError(f"the camera condition (batch {camera.batch}, {camera.frames} frames, latent "
                         f"{tuple(camera.pose_features[0].shape[-2:])}) does not fit the latent {tuple(x_t.shape)}: "
                         "encode the camera at the video's size with one pose per frame")


def make_vae(cfg) -> AutoencoderKL:
    return AutoencoderKLDualref(cfg) if cfg.decoder == "dualref" else AutoencoderKL(cfg)


def check_references(references, b: int, latent_hw, vae) -> list:
    """The reference list's length, batch and sizes against the latents it decodes."""
    levels = len(vae.cfg.ch_mult)
    if not isinstance(references, (list, tuple)) or len(references) != levels + 1:
        raise ValueError(f"references must be the list encode_references() returns ({levels + 1} tensors), "
                         f"got {type(references).__name__} of length "
                         f"{len(references) if hasattr(references, '__len__') else '?'}")
    h, w = int(latent_hw[0]) * 8, int(latent_hw[1]) * 8
    sizes = [(h >> i, w >> i) for i in range(levels)] + [(h, w)]
    for i, (r, hw) in enumerate(zip(references, sizes)):
        if r.ndim != 5 or r.shape[2] != 2 or tuple(r.shape[-2:]) != hw or r.shape[0] not in (1, b):
            raise ValueError(f"reference {i} has shape {tuple(r.shape)}, expected (1 or {b}, C, 2, {hw[0]}, "
                             f"{hw[1]}): encode the start/end images at the video's size ({w}x{h})")
    return list(references)


def check_vae_size(hw) -> None:
    h, w = int(hw[0]), int(hw[1])
    if h % 8 or w % 8:
        raise ValueError(f"image size {w}x{h} is not a multiple of 8; the VAE needs width and height "
                         f"divisible by 8 (e.g. {w // 8 * 8}x{h // 8 * 8})")
