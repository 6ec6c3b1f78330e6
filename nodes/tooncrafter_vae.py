"""ToonCrafter's dual-reference VAE as a ComfyUI ``VAE``.

A ``comfy.sd.VAE`` whose ``first_stage_model`` is the library's dual-reference autoencoder, so
ComfyUI's device management, dtype handling, VAEEncode and VAEDecode work unchanged:

* encode: posterior mean per frame, like every ComfyUI VAE;
* decode of a video latent (b, 4, T, h, w): the video decoder, each video as clips of the
  model's temporal length. ``vae_options={"references": refs}`` (what
  :func:`keyframe_references` returns, carried by the LATENT of 'DynamiCrafter Image
  Conditioning' in interpolation mode) lets it look back at the keyframes; a core ``VAEDecode``
  passes none and gets the official decoder's output without references (a warning says so).
"""
from __future__ import annotations

import warnings

import torch

import comfy.ldm.models.autoencoder
import comfy.model_management
import comfy.model_patcher
import comfy.sd

from dynamicrafter.models.tooncrafter import with_middle_redecode
from dynamicrafter.models.vae_dualref import DEFAULT_CHUNK, NO_REFERENCES_WARNING, decode_videos

REFERENCES_KEY = "dc_references"


class DualrefModule(torch.nn.Module):
    """ComfyUI's view of the library VAE: encode(x) -> latent mean, decode(z, references)."""

    def __init__(self, vae, clip_frames: int):
        super().__init__()
        self.vae = vae
        self.clip_frames = clip_frames

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.moments(x).chunk(2, dim=1)[0]

    def decode(self, z: torch.Tensor, references=None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
        video = z.ndim == 5
        if not video:                      # a batch of single latents: one clip
            z = z.transpose(0, 1)[None]
        if references is None:
            warnings.warn(NO_REFERENCES_WARNING, stacklevel=2)
        else:
            references = [r.to(z) for r in references]
        with torch.no_grad():
            out = decode_videos(self.vae, z, references, self.clip_frames, chunk)
        return out if video else out[0].transpose(0, 1)


def make_dualref_vae(vae, clip_frames: int, dtype: torch.dtype) -> comfy.sd.VAE:
    """A ComfyUI VAE around the library's dual-reference autoencoder."""
    # ComfyUI's VAE set-up for a KL-f8 model (sizes, dtypes, devices) around a placeholder, then our module
    params = {"embed_dim": vae.cfg.embed_dim, "ddconfig": {
        "double_z": True, "z_channels": vae.cfg.z_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1], "num_res_blocks": 0, "attn_resolutions": [], "dropout": 0.0}}
    placeholder = comfy.ldm.models.autoencoder.AutoencoderKL(**params).state_dict()
    out = comfy.sd.VAE(sd=placeholder, config={"params": params}, dtype=dtype)
    out.first_stage_model = DualrefModule(vae.to(dtype), clip_frames).eval()
    out.size = None
    out.model_size()
    # the video decoder keeps about two clip-sized activations alive (see the library)
    out.memory_used_decode = lambda shape, dt: (
        3 * 128 * 64 * shape[-2] * shape[-1] * (shape[2] if len(shape) == 5 else shape[0])
        * comfy.model_management.dtype_size(dt))
    out.patcher = comfy.model_patcher.ModelPatcher(out.first_stage_model, load_device=out.device,
                                                   offload_device=comfy.model_management.vae_offload_device())
    return out


def is_dualref_vae(vae) -> bool:
    return isinstance(getattr(vae, "first_stage_model", None), DualrefModule)


@torch.no_grad()
def keyframe_references(vae, start: torch.Tensor, end: torch.Tensor) -> list:
    """References of the start/end IMAGEs (b, H, W, 3) in [0, 1] (same size): per level (b, C, 2, h, w)."""
    comfy.model_management.load_models_gpu([vae.patcher])
    module = vae.first_stage_model
    to = lambda img: vae.process_input(img.movedim(-1, 1)).to(vae.device, vae.vae_dtype)  # noqa: E731
    refs = module.vae.references(to(start), to(end))
    return [r.to(comfy.model_management.intermediate_device()).float() for r in refs]


def decode_video_latent(vae, samples: torch.Tensor, references, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Frames (b, T, H, W, 3) in [0, 1] of a video latent (b, 4, T, h, w). With references: as the
    official ToonCrafter inference returns them (its re-decode of the two middle frames
    included); without: the official decoder without references (and a warning). `chunk`:
    frames per per-frame operation (memory only)."""
    if references is None:
        return vae.decode(samples, vae_options={"chunk": chunk})
    options = {"references": references, "chunk": chunk}
    decode = lambda z: vae.decode(z, vae_options=options).movedim(-1, 1)  # noqa: E731
    return with_middle_redecode(decode, samples).movedim(1, -1)
