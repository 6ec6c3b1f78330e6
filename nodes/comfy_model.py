"""DynamiCrafter as ComfyUI model objects.

* ``MODEL``: a ``comfy.model_patcher.ModelPatcher`` around :class:`DynamiCrafterBaseModel`, a
  ``comfy.model_base.BaseModel`` whose ``diffusion_model`` is the library's UNet (ComfyUI's
  memory management, weight patches and interrupts apply).  Its ``model_sampling`` is ComfyUI's
  ``ModelSamplingDiscrete`` with the scaled-linear betas, eps or v prediction and zero-terminal
  SNR per the variant, so core KSampler / SamplerCustomAdvanced can drive it; the exact official
  DDIM runs through :func:`dynamicrafter.sample_ddim` on the same UNet (``sampler.py``).
* ``CLIP``, ``CLIP_VISION``, ``VAE``: ComfyUI's own classes (SD2-style OpenCLIP text model,
  ``ClipVisionModel``, ``comfy.sd.VAE``) sized from the checkpoint's tensors and filled with its
  weights, so they behave exactly like the objects ComfyUI's loaders return.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile

import torch

import comfy.clip_vision
import comfy.conds
import comfy.ldm.modules.attention
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import comfy.utils
from comfy.text_encoders import sd2_clip

from comfy.cli_args import args as comfy_args

from dynamicrafter.models.attention import attention_function
from dynamicrafter.config import TEXT_CONTEXT_LEN, WEIGHT_DTYPES
from dynamicrafter.models.speed import compiled
from dynamicrafter.sampling.windows import take_context, take_frames

# the time axis of our (b, C, T, h, w) latents: core 'Context Windows (Manual)' needs dim = 2
TIME_DIM = 2


class DynamiCrafterLatent(comfy.latent_formats.SD15):
    """SD 1.x/2.x KL-f8 latents (scale 0.18215) laid out as video: (b, 4, T, h, w). Core's step
    previews of a 5-D x0 (KSampler, SamplerCustom): latent2rgb with SD's factors shows the first
    frame; core's TAESD previewer decodes 4-D latents only, so TAESD is named on `frame_format`,
    which the pack's samplers preview the first frame with (sampler.progress_callback; a model
    with a VAE of its own, `previews_by_own_vae`, previews by that VAE instead)."""
    latent_dimensions = 3

    def __init__(self, scale_factor: float = 0.18215):
        super().__init__(scale_factor)
        self.taesd_decoder_name = None     # core would hand SD's TAESD the 5-D x0 (an error mid-sampling)

    def frame_format(self) -> comfy.latent_formats.LatentFormat:
        """One frame's format, (b, 4, h, w): SD's, with its latent2rgb factors and TAESD decoder."""
        return comfy.latent_formats.SD15(self.scale_factor)


class DynamiCrafterConfig(comfy.supported_models_base.BASE):
    """ComfyUI model config for a DynamiCrafter/VideoCrafter UNet built by our library."""
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = DynamiCrafterLatent
    # ComfyUI plans sampling with area x dtype bytes x 0.01 MiB x this factor (area = batch x frames
    # x h x w of the latent). Counted live activations of a full-width UNet forward, 16 frames,
    # 3 guidance branches: factor 0.382 at 256x256, 0.290 at 512x320, 0.286 at 1024x576
    # (`benchmarks/memory_estimate.py`); the largest, plus 10 %. Small latents (<= 24x24, below the
    # released sizes) need relatively more, up to 1.1 at 8x8, which ComfyUI's fixed reserve covers.
    memory_usage_factor = 0.42
    # preference order when ComfyUI picks the weight dtype ("auto"): bf16 where it is fast, else fp16
    supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

    def __init__(self, variant: dict, scale_factor: float = 0.18215):
        self.sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012,
                                  "timesteps": 1000, "zsnr": bool(variant.get("zero_snr", False))}
        super().__init__({"disable_unet_model_creation": True})
        self.latent_format = DynamiCrafterLatent(scale_factor)
        self.variant = dict(variant)


def previews_by_own_vae(dc) -> bool:
    """Whether `dc`'s step previews decode with its own VAE: a per-frame VAE whose latents are not
    SD's (the demo model's), which SD's latent2rgb factors and TAESD would show in wrong colours.
    The released VAEs' latents are SD's: ComfyUI's previewers fit them."""
    return dc.vae is not None and dc.vae.cfg.decoder == "image" and not dc.vae.cfg.sd_latents


class DynamiCrafterBaseModel(comfy.model_base.BaseModel):
    """BaseModel with the library UNet as ``diffusion_model`` and the Resampler beside it."""

    def __init__(self, dc, device=None, manual_cast_dtype=None):
        """`manual_cast_dtype`: the compute dtype when the UNet's weights are stored in another
        (ComfyUI's name for it; None when they compute in their own dtype)."""
        variant = dict(dc.variant)
        config = DynamiCrafterConfig(variant, float(getattr(dc, "scale_factor", 0.18215)))
        config.set_inference_dtype(dc.unet.time_embed[0].weight.dtype, manual_cast_dtype)
        mtype = comfy.model_base.ModelType.V_PREDICTION if variant.get("parameterization") == "v" \
            else comfy.model_base.ModelType.EPS
        super().__init__(config, model_type=mtype, device=device)
        self.diffusion_model = dc.unet
        self.image_proj_model = dc.resampler            # may be None for text-to-video models
        self.variant = variant
        # The library object (schedule buffers, denoise()) without registering it as a submodule:
        # its UNet and resampler are the very modules above, so patches and device moves apply.
        # Its VAE, kept only when it is a small one of its own (previews_by_own_vae), stays out of
        # ComfyUI's loading: the previews move it to the sampling device.
        self.__dict__["dc"] = dc
        self.concat_keys = ()

    def get_dtype(self):
        return self.diffusion_model.time_embed[0].weight.dtype

    @property
    def dc_model(self):
        return self.__dict__["dc"]

    @property
    def needs_concat(self) -> bool:
        unet = self.diffusion_model
        cin = getattr(getattr(unet, "cfg", None), "in_channels", None)
        return cin is not None and cin > 4

    def window_conds(self, x, c_concat, c_crossattn, transformer_options):
        """Under core context windows (comfy.context_windows: x holds the window's frames) the
        conds still hold the whole video's: cut the concat latent and the per-frame image tokens
        to the window's frames (dynamicrafter.sampling.windows, as the library sampler does)."""
        window = transformer_options.get("context_window")
        if window is None:
            return c_concat, c_crossattn
        if getattr(window, "dim", TIME_DIM) != TIME_DIM:
            raise ValueError(f"context windows along dim {window.dim}: DynamiCrafter latents are (batch, channels, "
                             f"frames, height, width): set 'Context Windows (Manual)' dim to {TIME_DIM}")
        if c_concat is None or c_concat.shape[TIME_DIM] == x.shape[TIME_DIM]:
            return c_concat, c_crossattn     # text-to-video (text only), or already cut to the window
        idx, frames = list(window.index_list), c_concat.shape[TIME_DIM]
        context = None if c_crossattn is None else take_context(c_crossattn, idx, frames)
        return take_frames(c_concat, idx, TIME_DIM), context

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        sigma = t
        c_concat, c_crossattn = self.window_conds(x, c_concat, c_crossattn, transformer_options)
        xc = self.model_sampling.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, comfy.model_management.cast_to_device(c_concat, xc.device, xc.dtype)], dim=1)
        elif self.needs_concat:
            raise ValueError("This DynamiCrafter model needs the image latent: feed the sampler the positive/"
                             "negative outputs of 'Animate Image to Video / Interpolation (DynamiCrafter)'")
        dtype = self.manual_cast_dtype or self.get_dtype()
        timestep = self.model_sampling.timestep(t).float()
        context = None if c_crossattn is None else comfy.model_management.cast_to_device(c_crossattn, xc.device, dtype)
        fs = kwargs.get("fs")
        if fs is not None:
            fs = fs.to(xc.device).reshape(-1).round().long()
        camera = kwargs.get("dc_camera")
        if camera is not None:      # CamI2V (nodes/camera.py): the same move for every branch in the batch
            from .camera import camera_condition
            camera = camera_condition(self, camera, x.shape).to(xc.device, dtype)
        # core DIFFUSION_MODEL wrappers (EasyCache) see (x, timesteps, context, fs, transformer_options)
        # as around core UNets' forward; the attention is ComfyUI's, as its flags chose it
        out = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self._diffusion_forward, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                     transformer_options)
        ).execute(xc.to(dtype), timestep, context, fs, transformer_options, camera=camera)
        return self.model_sampling.calculate_denoised(sigma, out.float(), x)

    def _diffusion_forward(self, x, timestep, context, fs, transformer_options, camera=None):
        with speed_switches(transformer_options):
            return self.diffusion_model(x, timestep, context, fs=fs, camera=camera)

    def extra_conds(self, **kwargs):
        out = {}
        concat = kwargs.get("concat_latent_image", None)
        if concat is not None:
            concat = self.process_latent_in(concat)
            noise = kwargs.get("noise", None)
            if noise is not None and concat.shape[2:] != noise.shape[2:]:
                raise ValueError(f"image latent {tuple(concat.shape)} does not match the latent being sampled "
                                 f"{tuple(noise.shape)}: use the LATENT from the same conditioning node")
            out["c_concat"] = comfy.conds.CONDNoiseShape(concat)
        cross = kwargs.get("cross_attn", None)
        img = kwargs.get("dc_image_context", None)
        if cross is not None:
            if img is not None:
                img = img.to(cross)
                if img.shape[0] != cross.shape[0]:
                    img = comfy.utils.repeat_to_batch_size(img, cross.shape[0])
                cross = torch.cat([cross[:, :TEXT_CONTEXT_LEN], img], dim=1)
            out["c_crossattn"] = comfy.conds.CONDCrossAttn(cross)
        fs = kwargs.get("dc_fs", None)
        if fs is not None:
            out["fs"] = comfy.conds.CONDRegular(torch.tensor([float(fs)]))
        if kwargs.get("dc_camera") is not None:
            out["dc_camera"] = comfy.conds.CONDConstant(kwargs["dc_camera"])
        return out


def comfy_attention(transformer_options: dict):
    """ComfyUI's attention as its flags chose it (--use-sage-attention, --use-flash-attention,
    xformers, --use-pytorch-cross-attention, --use-split/quad-cross-attention; an
    `optimized_attention_override` in transformer_options applies too), or None (the library's
    SDPA) where ComfyUI only fell back to its sub-quadratic attention because no flag was given
    and the device is not one it enables SDPA on by default (the CPU): the library's SDPA is exact
    and faster there."""
    attn = comfy.ldm.modules.attention
    fn = attn.optimized_attention
    if fn is attn.attention_sub_quad and not comfy_args.use_quad_cross_attention:
        return None
    if "optimized_attention_override" in transformer_options:
        return functools.partial(fn, transformer_options=transformer_options)
    return fn   # the same object every step: a compiled UNet guards on it without recompiling


# transformer_options key of the UNet's compiled blocks (nodes/speed.py: DynamiCrafter Compile UNet)
COMPILED_REGIONS = "dynamicrafter_compiled_regions"


@contextlib.contextmanager
def speed_switches(transformer_options: dict):
    """What ComfyUI's settings ask of our UNet while it runs: ComfyUI's attention, and the compiled
    blocks a 'Compile UNet' node attached to this MODEL. Used by the core sampler path
    (apply_model) and the pack's own samplers alike."""
    with attention_function(comfy_attention(transformer_options)), \
            compiled(transformer_options.get(COMPILED_REGIONS)):
        yield


def model_speed_switches(model):
    """`speed_switches` for a MODEL (ModelPatcher) outside apply_model (the pack's DDIM sampler)."""
    return speed_switches(model.model_options.get("transformer_options", {}))


def make_model_patcher(dc, manual_cast_dtype=None) -> comfy.model_patcher.ModelPatcher:
    model = DynamiCrafterBaseModel(dc, manual_cast_dtype=manual_cast_dtype)
    load = comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=offload)


def require_dynamicrafter_model(model, node: str | None = None) -> DynamiCrafterBaseModel:
    """The DynamiCrafter model inside a MODEL. Inside a node's execute the error names the node
    already (validation.name_run_errors); `node` names the caller elsewhere."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, DynamiCrafterBaseModel):
        raise ValueError(f"{node + ': ' if node else ''}the MODEL input is not a DynamiCrafter/VideoCrafter model "
                         f"({type(inner).__name__}); load it with 'DynamiCrafter Checkpoint Loader'")
    return inner


# ------------------------------------------------------------------------- CLIP (text)
def _text_config(cfg, sd_open_clip: dict) -> dict:
    """transformers-style config of the text tower: sizes from the library's ClipConfig."""
    proj = sd_open_clip.get("text_projection")          # open_clip Parameter (width, embed)
    if proj is None and "text_projection.weight" in sd_open_clip:   # or nn.Linear weight (embed, width)
        proj = sd_open_clip["text_projection.weight"].t()
    return {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 49407, "hidden_act": "gelu", "hidden_size": cfg.text_width, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": int(round(cfg.text_width * cfg.mlp_ratio)),
            "layer_norm_eps": 1e-05, "max_position_embeddings": cfg.context_length,
            "model_type": "clip_text_model", "num_attention_heads": cfg.text_heads,
            "num_hidden_layers": cfg.text_layers, "pad_token_id": 1,
            "projection_dim": proj.shape[1] if proj is not None else cfg.text_width,
            "torch_dtype": "float32", "vocab_size": cfg.vocab_size}


def load_in_parts(load, sd: dict, pages=None, part_bytes: int = 256 << 20) -> list:
    """`load(part)` (a ComfyUI `load_sd`, strict=False) over parts of about `part_bytes` of `sd`,
    each part's source pages given back (`pages`: dynamicrafter.checkpoints.mapped.MappedPages) as soon as it
    is copied, so our tower and ComfyUI's copy never both exist whole. Returns the model keys that
    no part set."""
    parts, part, size = [], [], 0
    for k, v in sd.items():
        part.append(k)
        size += v.numel() * v.element_size()
        if size >= part_bytes:
            parts.append(part)
            part, size = [], 0
    parts += [part] if part else []
    missing = None
    for keys in parts:
        left = set(load({k: sd[k] for k in keys})[0])
        missing = left if missing is None else missing & left
        for k in keys if pages is not None else ():
            pages.release(sd[k])
    return sorted(missing or ())


def make_comfy_clip(text_encoder, dtype: torch.dtype, pages=None) -> comfy.sd.CLIP:
    """ComfyUI CLIP (SD2-style OpenCLIP text model, penultimate layer + final norm) from the
    library's open_clip text tower (its file pages given back part by part: `load_in_parts`)."""
    sd = {k: v.detach() for k, v in text_encoder.model.state_dict().items()}
    config = _text_config(text_encoder.cfg, sd)

    class TextModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", max_length=77, freeze=True, layer="penultimate", layer_idx=None,
                     dtype=None, model_options=None):
            model_options = {} if model_options is None else model_options
            super().__init__(device=device, freeze=freeze, layer="hidden", layer_idx=-2,
                             textmodel_json_config=config, dtype=dtype,
                             special_tokens={"start": 49406, "end": 49407, "pad": 0},
                             return_projected_pooled=True, model_options=model_options)

    class ClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
            model_options = {} if model_options is None else model_options
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_name="h",
                             clip_model=TextModel, **kwargs)

    target = comfy.supported_models_base.ClipTarget(sd2_clip.SD2Tokenizer, ClipModel)
    params = sum(v.numel() for v in sd.values())
    clip = comfy.sd.CLIP(target, parameters=params, model_options={"dtype": dtype})
    csd = comfy.utils.clip_text_transformers_convert({"clip_h." + k: v for k, v in sd.items()},
                                                     "clip_h.", "clip_h.transformer.")
    proj_key = "clip_h.transformer.text_projection.weight"
    square = proj_key in csd and csd[proj_key].shape[0] == csd[proj_key].shape[1]
    if not square:   # ComfyUI's CLIP text model assumes a square projection (only the unused pooled output)
        csd.pop(proj_key, None)
    missing = load_in_parts(lambda part: clip.load_sd(part, full_model=True), csd, pages)
    if not square:
        with torch.no_grad():
            clip.cond_stage_model.clip_h.transformer.text_projection.weight.zero_()
    missing = [m for m in missing if not m.endswith(("position_ids", "logit_scale", "text_projection.weight"))]
    if missing:
        raise ValueError(f"text encoder conversion left {len(missing)} weights unset, e.g. {missing[:3]}")
    return clip


# ------------------------------------------------------------------------- CLIP vision
_VISION_CONFIG_DIR = None


def make_comfy_clip_vision(image_encoder, dtype: torch.dtype, pages=None) -> comfy.clip_vision.ClipVisionModel:
    """ComfyUI ClipVisionModel from the library's open_clip vision tower (sizes from its ClipConfig)."""
    global _VISION_CONFIG_DIR
    visual = {k: v.detach() for k, v in image_encoder.model.visual.state_dict().items()}
    cfg = image_encoder.cfg
    width, patch, layers, image_size = cfg.vision_width, cfg.patch_size, cfg.vision_layers, cfg.image_size
    proj = visual.get("proj")
    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": width,
              "image_size": image_size, "initializer_factor": 1.0, "initializer_range": 0.02,
              "intermediate_size": visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
              "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
              "num_attention_heads": cfg.vision_heads,
              "num_channels": 3, "num_hidden_layers": layers, "patch_size": patch,
              "projection_dim": proj.shape[1] if proj is not None else width, "torch_dtype": "float32"}
    if _VISION_CONFIG_DIR is None:
        _VISION_CONFIG_DIR = tempfile.mkdtemp(prefix="dynamicrafter_clip_vision_")
    path = os.path.join(_VISION_CONFIG_DIR, "config_{}_{}_{}_{}.json".format(width, layers, patch, image_size))
    with open(path, "w") as f:
        json.dump(config, f)
    cv = comfy.clip_vision.ClipVisionModel(path)
    cv.model.to(dtype)   # before loading: ComfyUI builds it in its text-encoder dtype (fp16 on CPU)
    cv.dtype = dtype
    sd = comfy.clip_vision.convert_to_transformers({"visual." + k: v for k, v in visual.items()}, "visual.")
    missing = load_in_parts(cv.load_sd, sd, pages)
    missing = [m for m in missing if "position_ids" not in m and "visual_projection" not in m]
    if missing:
        raise ValueError(f"CLIP vision conversion left {len(missing)} weights unset, e.g. {missing[:3]}")
    return cv


# ------------------------------------------------------------------------- VAE
def make_comfy_vae(vae, dtype: torch.dtype) -> comfy.sd.VAE:
    """comfy.sd.VAE (ComfyUI's KL-f8 AutoencoderKL) sized from the library VAE's config."""
    cfg = vae.cfg
    ddconfig = {"double_z": True, "z_channels": cfg.z_channels, "resolution": 256, "in_channels": cfg.in_channels,
                "out_ch": cfg.out_ch, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult),
                "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": [], "dropout": 0.0}
    sd = {k: v.detach() for k, v in vae.state_dict().items()}
    out = comfy.sd.VAE(sd=sd, config={"params": {"embed_dim": cfg.embed_dim, "ddconfig": ddconfig}}, dtype=dtype)
    if cfg.norm_groups != 32:    # ComfyUI's AutoencoderKL builds every GroupNorm with 32 groups
        for m in out.first_stage_model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.num_groups = cfg.norm_groups
    return out


def comfy_dtype(choice: str, default: torch.dtype = torch.float32) -> torch.dtype:
    return WEIGHT_DTYPES.get(choice, default)


# ------------------------------------------------------------------------- UNet layers
def unet_dtypes(choice: str, parameters: int, file_dtype=None) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, manual-cast compute dtype or None) for the UNet, chosen as ComfyUI chooses
    them for its core models: "auto" honours --fp16-unet / --bf16-unet / --fp8_e4m3fn-unet ... and
    the device's abilities; the compute dtype is ComfyUI's manual cast for that weight dtype."""
    load_device = comfy.model_management.get_torch_device()
    supported = DynamiCrafterConfig.supported_inference_dtypes
    if choice == "auto":
        weight = comfy.model_management.unet_dtype(model_params=parameters, supported_dtypes=supported,
                                                   weight_dtype=file_dtype)
    else:
        weight = comfy_dtype(choice)
    return weight, comfy.model_management.unet_manual_cast(weight, load_device, supported)


def comfy_operations(weight_dtype: torch.dtype, manual_cast_dtype: torch.dtype | None):
    """The comfy.ops namespace core models get for these dtypes, plus the float32 GroupNorm of our ResBlocks."""
    load_device = comfy.model_management.get_torch_device()
    return _with_float32_group_norm(comfy.ops.pick_operations(weight_dtype, manual_cast_dtype, load_device=load_device))


@functools.lru_cache(maxsize=None)
def _with_float32_group_norm(base):
    class GroupNorm32(base.GroupNorm):
        """Always casts (weight and bias to the float32 input, on its device), whatever the rest does."""
        comfy_cast_weights = True

        def forward(self, x):
            return super().forward(x.float()).to(x.dtype)

    return type(f"DynamiCrafter_{base.__name__}", (base,), {"GroupNorm32": GroupNorm32})
