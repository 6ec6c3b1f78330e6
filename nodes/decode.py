"""DynamiCrafter Video Decode: VAE + video LATENT (b, 4, T, h, w) -> IMAGE frames, a few frames at a time."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils

from .tooncrafter_vae import REFERENCES_KEY, decode_video_latent, is_dualref_vae

TRIM = ["auto", "keep all frames", "drop last frame"]


@torch.no_grad()
def decode_video(vae, latent: dict, frames_per_batch: int = 4, trim: str = "auto") -> torch.Tensor:
    if vae is None:
        raise ValueError("no VAE connected: this checkpoint has none (pruned file); load the SD KL-f8 VAE "
                         "with VAELoader")
    samples = latent["samples"]
    if samples.ndim == 4:               # an image latent batch: decode as single frames
        samples = samples.unsqueeze(2)
    if samples.ndim != 5 or samples.shape[1] != 4:
        raise ValueError(f"expected a 4-channel video latent (b, 4, T, h, w), got {tuple(samples.shape)}")
    if not torch.isfinite(samples).all():
        raise ValueError("the latent contains NaN/inf values (sampling diverged: lower the guidance scales or "
                         "use fp32)")
    b, _, t = samples.shape[:3]
    if is_dualref_vae(vae):     # ToonCrafter: whole clips, with the keyframes' references when the latent has them
        images = decode_video_latent(vae, samples, latent.get(REFERENCES_KEY), frames_per_batch)
    else:
        flat = samples.transpose(1, 2).flatten(0, 1)        # (b*T, 4, h, w), video-major
        pbar = comfy.utils.ProgressBar(flat.shape[0])
        frames = []
        for start in range(0, flat.shape[0], frames_per_batch):
            comfy.model_management.throw_exception_if_processing_interrupted()
            part = flat[start:start + frames_per_batch]
            frames.append(vae.decode(part).float().to(comfy.model_management.intermediate_device()))
            pbar.update_absolute(min(start + frames_per_batch, flat.shape[0]), flat.shape[0])
        images = torch.cat(frames).reshape(b, t, *frames[0].shape[1:])     # (b, T, H, W, C)
    drop = trim == "drop last frame" or (trim == "auto" and latent.get("dc_mode") == "loop")
    if drop and t > 1:
        images = images[:, :-1]          # a loop's last frame repeats its first (official saving)
    return images.flatten(0, 1)


class DynamiCrafterVideoDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE",),
            "latent": ("LATENT",),
            "frames_per_batch": ("INT", {"default": 4, "min": 1, "max": 64,
                                         "tooltip": "frames decoded at once; lower = less memory"}),
            "trim": (TRIM, {"default": "auto", "tooltip": "auto drops a loop video's duplicate last frame"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    FUNCTION = "decode"
    CATEGORY = "DynamiCrafter"
    DESCRIPTION = "Decodes every frame (video after video) into an IMAGE batch for SaveWEBM / CreateVideo / VHS."

    def decode(self, vae, latent, frames_per_batch, trim="auto"):
        return (decode_video(vae, latent, frames_per_batch, trim),)


NODE_CLASS_MAPPINGS = {"DynamiCrafterVideoDecode": DynamiCrafterVideoDecode}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamiCrafterVideoDecode": "DynamiCrafter Video Decode"}
