"""A tiny SD 1.5-layout checkpoint with random weights that ComfyUI's own CheckpointLoaderSimple
accepts (its model detection needs model_channels 320 and a 768-wide CLIP-L; everything else is
cut to one UNet level), for running the text-to-image -> animation workflow in tests.

Built from ComfyUI's own module classes so the key layout is exactly what its loader expects."""
from __future__ import annotations

from pathlib import Path

import torch


def _random_like(sd: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.ndim >= 2:                                   # linear / conv / embedding weights
            out[k] = (torch.randn(v.shape, generator=g) / max(1, v[0].numel()) ** 0.5).half()
        elif k.endswith("weight"):                        # norm scales
            out[k] = torch.ones(v.shape, dtype=torch.float16)
        else:                                             # biases
            out[k] = torch.zeros(v.shape, dtype=torch.float16)
    return out


def write_tiny_sd15(path: Path, seed: int = 0) -> Path:
    """Write the checkpoint (~470 MB fp16: CLIP-L and the SD VAE keep their real sizes) once."""
    path = Path(path)
    if path.is_file():
        return path
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    ops = comfy.ops.disable_weight_init
    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=1,
                     channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                     transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
                     use_linear_in_transformer=False, operations=ops)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float16)
    sd = {}
    for prefix, module, s in (("model.diffusion_model.", unet, seed), ("first_stage_model.", vae, seed + 1),
                              ("cond_stage_model.", clip, seed + 2)):
        for k, v in _random_like(module.state_dict(), s).items():
            if "position_ids" not in k:
                sd[prefix + k] = v
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp))
    tmp.replace(path)
    return path
