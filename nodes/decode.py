"""DynamiCrafter Video Decode: VAE + video LATENT (b, 4, T, h, w) -> IMAGE frames, a few frames at a time."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils
from comfy_api.v0_0_2 import io

from .inputs import CATEGORY

from dynamicrafter.models.tiling import TILE, should_tile, tiled_decode

from .tooncrafter_vae import REFERENCES_KEY, decode_video_latent, is_dualref_vae

TRIM = ["auto", "keep all frames", "drop last frame"]
TILING = ["auto", "off", "on"]


def tiles_needed(vae, part: torch.Tensor, tiling: str) -> bool:
    """auto: frames over 512x512 pixels, or a batch whose decode ComfyUI estimates larger than the
    free memory of the VAE's device."""
    if tiling != "auto":
        return tiling == "on" and should_tile(*part.shape[-2:], TILE // 2)
    if should_tile(*part.shape[-2:], None):
        return True
    need = vae.memory_used_decode(part.shape, vae.vae_dtype)
    return need > comfy.model_management.get_free_memory(vae.device)


def decode_frames(vae, part: torch.Tensor, tiling: str = "auto") -> torch.Tensor:
    """ComfyUI IMAGE frames (n, H, W, 3) of latent frames (n, 4, h, w), spatially tiled if needed."""
    if not tiles_needed(vae, part, tiling):
        return vae.decode(part)
    tile = TILE if max(part.shape[-2:]) > TILE else TILE // 2
    return tiled_decode(lambda z: vae.decode(z).movedim(-1, 1), part, tile=tile, overlap=tile // 4).movedim(1, -1)


@torch.no_grad()
def decode_video(vae, latent: dict, frames_per_batch: int = 4, trim: str = "auto",
                 tiling: str = "auto") -> torch.Tensor:
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
            frames.append(decode_frames(vae, part, tiling).float().to(comfy.model_management.intermediate_device()))
            pbar.update_absolute(min(start + frames_per_batch, flat.shape[0]), flat.shape[0])
        images = torch.cat(frames).reshape(b, t, *frames[0].shape[1:])     # (b, T, H, W, C)
    drop = trim == "drop last frame" or (trim == "auto" and latent.get("dc_mode") == "loop")
    if drop and t > 1:
        images = images[:, :-1]          # a loop's last frame repeats its first (official saving)
    return images.flatten(0, 1)


class DynamiCrafterVideoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DynamiCrafterVideoDecode",
            display_name="DynamiCrafter Video Decode",
            category=CATEGORY,
            description="Decodes every frame of a video latent (video after video) into an IMAGE batch for "
                        "CreateVideo / SaveWEBM / VideoHelperSuite, in overlapping tiles when frames are large.",
            inputs=[
                io.Vae.Input("vae"),
                io.Latent.Input("latent", tooltip="a video latent (b, 4, T, h, w) from a sampler"),
                io.Int.Input("frames_per_batch", default=4, min=1, max=64,
                             tooltip="frames decoded at once; lower = less memory"),
                io.Combo.Input("trim", options=TRIM, default="auto",
                               tooltip="auto drops a loop video's duplicate last frame"),
                # optional: graphs saved before it existed still load
                io.Combo.Input("tiling", options=TILING, default="auto", optional=True,
                               tooltip="decode each frame in overlapping tiles (less memory, near-identical "
                                       "frames); auto = frames over 512x512 px or when memory is short"),
            ],
            outputs=[io.Image.Output(display_name="frames")])

    @classmethod
    def execute(cls, vae, latent, frames_per_batch, trim="auto", tiling="auto") -> io.NodeOutput:
        return io.NodeOutput(decode_video(vae, latent, frames_per_batch, trim, tiling))


NODES = [DynamiCrafterVideoDecode]
