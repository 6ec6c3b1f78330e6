"""Model sizes and variants, read from a state dict's keys and shapes.

The official checkpoints carry no config. Sizes come from tensor shapes; the few numbers
that shapes cannot tell (attention head widths) come from the released models' values when
the widths match them, from metadata we write ourselves, or from the tiny-model convention
(head width 16). The variant (eps/v, zero-SNR, dynamic rescale, fs meaning) comes from the
keys and the schedule buffers, never from the file name, and can be overridden.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Mapping, Optional

import torch

TEXT_CONTEXT_LEN = 77   # hard-coded in the official attention and UNet
LATENT_CHANNELS, LATENT_SCALE = 4, 8     # the KL-f8 VAE: 4 latent channels at 1/8 of the pixel size
QUERIES_PER_FRAME = 16  # Resampler num_queries in every released config
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}   # dtype names users pick
# ... and for stored weights only (computed in a compute dtype), fp8 too
WEIGHT_DTYPES = {**DTYPES, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}

# Head widths of the released models, keyed by the width they belong to.
_RELEASED_UNET_HEAD_CHANNELS = {320: 64}      # model_channels -> num_head_channels
_RELEASED_CLIP_TEXT_HEADS = {1024: 16}        # text width -> heads (ViT-H-14)
_RELEASED_CLIP_VISION_HEADS = {1280: 16}      # vision width -> heads (ViT-H-14, head width 80)
_RELEASED_RESAMPLER_DIM_HEAD = {768: 64}      # resampler inner width -> dim_head
TINY_HEAD_WIDTH = 16


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 8
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)     # levels (downsample factor 2**level) with transformers
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    use_linear: bool = True
    temporal_conv: bool = True
    temporal_attention: bool = True
    addition_attention: bool = True           # init_attn after the input conv
    init_attn_heads: int = 8
    image_cross_attention: bool = True        # to_k_ip / to_v_ip
    image_gate: bool = False                  # learnable tanh gate `attn2.alpha` (256 model)
    fs_condition: bool = True                 # fps_embedding
    default_fs: int = 24
    relative_position: bool = False           # VideoCrafter1: relative frame positions in temporal attention
    temporal_length: int = 16                 # ... with distances clamped to +-temporal_length
    camera_modules: bool = False              # CamI2V: temporal blocks carry pluker_projection + epipolar
    camera_registers: int = 0                 # ... with this many epipolar register tokens (CamI2V: 4)


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    # GroupNorm groups. 32 in every released VAE; not stored in the weights, so a small VAE
    # (ch 32, where 32 groups would normalise each channel alone and erase its colour) keeps
    # its own count in the checkpoint's config metadata.
    norm_groups: int = 32
    # "image": the per-frame SD decoder; "dualref": ToonCrafter's video decoder that refers to
    # the start/end keyframes (cross-attention at ref_attn_levels, ref_attn_inner = heads x 64)
    decoder: str = "image"
    ref_attn_levels: tuple = ()
    ref_attn_inner: int = 512

    @property
    def sd_latents(self) -> bool:
        """Whether its latents are SD 1.x/2.x KL-f8's, as every released model's (ToonCrafter's decoder
        differs, not its encoder): the encoder's sizes are the released ones. Hosts' SD latent
        previews (latent2rgb factors, TAESD) fit them; a VAE of its own (the demo model's) has its own."""
        released = VAEConfig()
        return tuple(self.ch_mult) == released.ch_mult and all(getattr(self, f) == getattr(released, f) for f in
                                                               ("ch", "num_res_blocks", "z_channels", "embed_dim",
                                                                "in_channels", "norm_groups"))


@dataclass(frozen=True)
class ClipConfig:
    """One OpenCLIP tower pair (text width/layers and vision width/layers)."""
    embed_dim: int = 1024
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    vocab_size: int = 49408
    context_length: int = 77
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class ResamplerConfig:
    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = QUERIES_PER_FRAME
    embedding_dim: int = 1280
    output_dim: int = 1024
    ff_mult: int = 4
    video_length: int = 16


@dataclass(frozen=True)
class CameraConfig:
    """CamI2V's camera pose encoder and epipolar attention (MODEL-SPEC-CAMI2V §0, §5, §7). Shapes give the
    widths; heads and the epipolar settings come from the official YAML, our metadata or the released values."""
    channels: tuple = (320, 640, 1280, 1280)    # pose-encoder level widths (= the UNet's)
    num_res_blocks: int = 2
    cin: int = 384                              # 6 Plücker channels x downscale**2
    downscale: int = 8
    heads: int = 8                              # pose-encoder temporal attention heads
    max_frames: int = 16                        # length of its sinusoidal frame positions
    registers: int = 4                          # epipolar register tokens
    origin_h: int = 256                         # pixel height the epipolar masks are looked up for
    origin_w: int = 256
    mask_resolutions: tuple = (8, 4, 2, 1)      # masks built for cells of 8*r pixels
    perturb_zero_translation: bool = True


@dataclass(frozen=True)
class Variant:
    family: str = "dynamicrafter"          # or "videocrafter", "cami2v" (DynamiCrafter + camera control)
    name: str = "512"                      # 256 | 512 | 1024 | 512_interp | vc2 | vc1 | vc1_1024 | custom
    parameterization: str = "v"            # eps | v
    zero_snr: bool = True
    dynamic_rescale_base: Optional[float] = 0.7   # DynamiCrafter x0 rescale (scale_arr), None = off
    use_scale: bool = False                # VideoCrafter-style x0 scale (divide by scale_arr[t])
    scale_b: float = 0.7                   # ... its scale_arr goes 1 -> scale_b over t < 400
    fix_scale_bug: bool = False            # ... 1000 scale_arr entries instead of 1400 (same values)
    default_fs: int = 24
    fs_meaning: str = "fps"                # fps | frame_stride
    spacing: str = "uniform_trailing"      # DDIM spacing of the official scripts
    guidance_rescale: float = 0.7
    cfg_text: float = 7.5
    cfg_img: Optional[float] = None        # dual CFG's image scale by default; None: single CFG (official)
    resolution: tuple = (320, 512)         # (H, W) the model was trained at
    frames: int = 16
    fs_range: tuple = (1, 60)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["image_cross_attention"] = self.family != "videocrafter"
        return d


PRESETS = {
    "256": Variant(name="256", parameterization="eps", zero_snr=False, dynamic_rescale_base=None,
                   default_fs=3, fs_meaning="frame_stride", spacing="uniform", guidance_rescale=0.0,
                   resolution=(256, 256), fs_range=(1, 6)),
    "512": Variant(name="512", default_fs=24, resolution=(320, 512), fs_range=(5, 30)),
    "1024": Variant(name="1024", dynamic_rescale_base=0.3, default_fs=10, resolution=(576, 1024),
                    fs_range=(1, 15)),
    "512_interp": Variant(name="512_interp", default_fs=10, resolution=(320, 512), fs_range=(1, 30)),
    "vc2": Variant(family="videocrafter", name="vc2", parameterization="eps", zero_snr=False,
                   dynamic_rescale_base=None, use_scale=True, default_fs=28, fs_meaning="fps",
                   spacing="uniform", guidance_rescale=0.0, cfg_text=12.0, resolution=(320, 512),
                   fs_range=(1, 60)),
    "tooncrafter": Variant(name="tooncrafter", default_fs=10, resolution=(320, 512), fs_range=(1, 30)),
    # VideoCrafter1 512: no fps embedding (fps is ignored), plain DDIM (no scale_arr)
    "vc1": Variant(family="videocrafter", name="vc1", parameterization="eps", zero_snr=False,
                   dynamic_rescale_base=None, use_scale=False, default_fs=24, fs_meaning="fps",
                   spacing="uniform", guidance_rescale=0.0, cfg_text=12.0, resolution=(320, 512),
                   fs_range=(1, 60)),
    # VideoCrafter1 1024: fps embedding, use_scale with the default end value 0.3 and fix_scale_bug
    "vc1_1024": Variant(family="videocrafter", name="vc1_1024", parameterization="eps", zero_snr=False,
                        dynamic_rescale_base=None, use_scale=True, scale_b=0.3, fix_scale_bug=True,
                        default_fs=28, fs_meaning="fps", spacing="uniform", guidance_rescale=0.0,
                        cfg_text=12.0, resolution=(576, 1024), fs_range=(1, 60)),
    # CamI2V (camera control on DynamiCrafter 256 / 512): the official demo's sampling settings
    "cami2v_256": Variant(family="cami2v", name="cami2v_256", parameterization="eps", zero_snr=False,
                          dynamic_rescale_base=None, default_fs=3, fs_meaning="frame_stride",
                          spacing="uniform_trailing", guidance_rescale=0.7, cfg_text=5.5,
                          resolution=(256, 256), fs_range=(1, 10)),
    "cami2v_512": Variant(family="cami2v", name="cami2v_512", default_fs=10, spacing="uniform_trailing",
                          guidance_rescale=0.7, cfg_text=5.5, resolution=(320, 512), fs_range=(1, 30)),
}
# the epipolar settings of the released CamI2V configs (003_cami2v_{256x256,512x320}.yaml)
CAMI2V_EPIPOLAR = {"cami2v_256": dict(origin_h=256, origin_w=256, mask_resolutions=(8, 4, 2, 1)),
                   "cami2v_512": dict(origin_h=320, origin_w=512, mask_resolutions=(8, 4, 2))}


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: Optional[VAEConfig] = field(default_factory=VAEConfig)
    text: Optional[ClipConfig] = field(default_factory=ClipConfig)      # cond_stage_model
    vision: Optional[ClipConfig] = field(default_factory=ClipConfig)    # embedder
    resampler: Optional[ResamplerConfig] = field(default_factory=ResamplerConfig)
    variant: Variant = field(default_factory=Variant)
    scale_factor: float = 0.18215
    camera: Optional[CameraConfig] = None                                # CamI2V's camera modules

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping) -> "ModelConfig":
        def build(cls, v):
            if v is None:
                return None
            names = {f.name for f in fields(cls)}
            return cls(**{k: (tuple(x) if isinstance(x, list) else x) for k, x in v.items() if k in names})
        return ModelConfig(unet=build(UNetConfig, d["unet"]), vae=build(VAEConfig, d.get("vae")),
                           text=build(ClipConfig, d.get("text")), vision=build(ClipConfig, d.get("vision")),
                           resampler=build(ResamplerConfig, d.get("resampler")),
                           variant=build(Variant, d.get("variant") or {}),
                           scale_factor=d.get("scale_factor", 0.18215), camera=build(CameraConfig, d.get("camera")))


class CheckpointError(ValueError):
    """A file that is not a checkpoint we can load, with a message saying what to do."""


# --------------------------------------------------------------------------- inference

def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def infer_unet_config(sd: Mapping[str, torch.Tensor], prefix: str = "model.diffusion_model.",
                      head_channels: Optional[int] = None) -> UNetConfig:
    p = prefix
    if p + "input_blocks.0.0.weight" not in sd:
        raise CheckpointError("no DynamiCrafter/VideoCrafter UNet in this file "
                              f"(expected '{p}input_blocks.0.0.weight')")
    conv_in = sd[p + "input_blocks.0.0.weight"]
    mc = conv_in.shape[0]
    keys = {k[len(p):] for k in sd if k.startswith(p)}
    n_in = _count(keys, r"input_blocks\.(\d+)\.")
    # walk the input blocks: ResBlocks per level, a Downsample ('op') between levels
    levels, current, attn_levels = [], [], set()
    for i in range(1, n_in):
        if f"input_blocks.{i}.0.op.weight" in keys:
            levels.append(current)
            current = []
            continue
        current.append(i)
        if f"input_blocks.{i}.1.norm.weight" in keys:
            attn_levels.add(len(levels))
    levels.append(current)
    num_res = len(levels[0])
    mult = tuple(sd[f"{p}input_blocks.{blocks[0]}.0.emb_layers.1.weight"].shape[0] // mc for blocks in levels)
    first_attn = next((f"input_blocks.{i}.1" for i in range(1, n_in) if f"input_blocks.{i}.1.norm.weight" in keys),
                      "middle_block.1")
    depth = _count(keys, re.escape(first_attn) + r"\.transformer_blocks\.(\d+)\.")
    ctx_dim = sd[f"{p}{first_attn}.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    use_linear = sd[f"{p}{first_attn}.proj_in.weight"].ndim == 2
    # VideoCrafter1 relative positions: a (2*temporal_length + 1, head width) table per temporal attention
    table = next((k for k in keys if k.endswith("relative_position_k.embeddings_table")), None)
    temporal_length, table_hc = 16, None
    if table is not None:
        rows, table_hc = sd[p + table].shape
        temporal_length = (rows - 1) // 2
        if head_channels and head_channels != table_hc:
            raise CheckpointError(f"head width {head_channels} was given, but the relative-position tables "
                                  f"('{table}') are {table_hc} wide: the temporal attention heads are {table_hc} wide")
    hc = head_channels or table_hc or _RELEASED_UNET_HEAD_CHANNELS.get(mc, TINY_HEAD_WIDTH)

    def has(s):
        return any(s in k for k in keys)

    init_heads = sd[p + "init_attn.0.proj_in.weight"].shape[0] // hc if p + "init_attn.0.proj_in.weight" in sd else 8
    return UNetConfig(
        in_channels=conv_in.shape[1], out_channels=sd[p + "out.2.weight"].shape[0], model_channels=mc,
        channel_mult=mult, num_res_blocks=num_res, attention_levels=tuple(sorted(attn_levels)),
        num_head_channels=hc, transformer_depth=depth, context_dim=ctx_dim, use_linear=use_linear,
        temporal_conv=has("temopral_conv."), temporal_attention=f"{first_attn[:-1]}2.norm.weight" in keys,
        addition_attention=p + "init_attn.0.norm.weight" in sd, init_attn_heads=init_heads,
        image_cross_attention=has("attn2.to_k_ip."), image_gate=has("attn2.alpha"),
        fs_condition=p + "fps_embedding.0.weight" in sd, relative_position=table is not None,
        temporal_length=temporal_length, camera_modules=has(".pluker_projection."),
        camera_registers=next((sd[p + k].shape[1] for k in keys if k.endswith("epipolar_attn.register_tokens")), 0))


def infer_vae_config(sd, prefix="first_stage_model.") -> Optional[VAEConfig]:
    p = prefix
    if p + "encoder.conv_in.weight" not in sd:
        return None
    ch = sd[p + "encoder.conv_in.weight"].shape[0]
    keys = [k[len(p):] for k in sd if k.startswith(p)]
    n_levels = _count(keys, r"encoder\.down\.(\d+)\.")
    mult = tuple(sd[f"{p}encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(n_levels))
    dualref = {}
    if p + "decoder.mid.block_1.mix_factor" in sd:     # ToonCrafter's dual-reference video decoder
        levels = tuple(i for i in range(n_levels) if f"{p}decoder.attn_refinement.{i}.to_q.weight" in sd)
        inner = sd[f"{p}decoder.attn_refinement.{levels[0]}.to_q.weight"].shape[0] if levels else 512
        dualref = dict(decoder="dualref", ref_attn_levels=levels, ref_attn_inner=inner)
    return VAEConfig(**dualref, ch=ch, ch_mult=mult, num_res_blocks=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
                     z_channels=sd[p + "decoder.conv_in.weight"].shape[1],
                     embed_dim=sd[p + "post_quant_conv.weight"].shape[1],
                     in_channels=sd[p + "encoder.conv_in.weight"].shape[1],
                     out_ch=sd[p + "decoder.conv_out.weight"].shape[0])


def infer_clip_config(sd, prefix: str, text_heads=None, vision_heads=None) -> Optional[ClipConfig]:
    """Sizes of an OpenCLIP tower pair stored under `prefix` (text side, vision side, or both)."""
    p = prefix
    if p + "token_embedding.weight" not in sd and p + "visual.conv1.weight" not in sd:
        return None
    keys = [k[len(p):] for k in sd if k.startswith(p)]
    cfg = {}
    if p + "token_embedding.weight" in sd:
        vocab, tw = sd[p + "token_embedding.weight"].shape
        cfg.update(vocab_size=vocab, text_width=tw, context_length=sd[p + "positional_embedding"].shape[0],
                   text_layers=_count(keys, r"transformer\.resblocks\.(\d+)\."),
                   text_heads=text_heads or _RELEASED_CLIP_TEXT_HEADS.get(tw, max(1, tw // TINY_HEAD_WIDTH)))
        if p + "text_projection" in sd:
            cfg["embed_dim"] = sd[p + "text_projection"].shape[1]
        if cfg["text_layers"]:
            cfg["mlp_ratio"] = sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tw
    if p + "visual.conv1.weight" in sd:
        vw, _, ps, _ = sd[p + "visual.conv1.weight"].shape
        n_tok = sd[p + "visual.positional_embedding"].shape[0]
        grid = int(round((n_tok - 1) ** 0.5))
        cfg.update(vision_width=vw, patch_size=ps, image_size=grid * ps,
                   vision_layers=_count(keys, r"visual\.transformer\.resblocks\.(\d+)\."),
                   vision_heads=vision_heads or _RELEASED_CLIP_VISION_HEADS.get(vw, max(1, vw // TINY_HEAD_WIDTH)))
        if p + "visual.proj" in sd:
            cfg["embed_dim"] = sd[p + "visual.proj"].shape[1]
        if "text_layers" not in cfg:
            cfg.update(text_layers=0)
    return ClipConfig(**cfg)


def infer_resampler_config(sd, prefix="image_proj_model.", dim_head=None) -> Optional[ResamplerConfig]:
    p = prefix
    if p + "latents" not in sd:
        return None
    keys = [k[len(p):] for k in sd if k.startswith(p)]
    _, n_latents, dim = sd[p + "latents"].shape
    inner = sd[p + "layers.0.0.to_q.weight"].shape[0]
    dh = dim_head or _RELEASED_RESAMPLER_DIM_HEAD.get(inner, TINY_HEAD_WIDTH)
    return ResamplerConfig(dim=dim, depth=_count(keys, r"layers\.(\d+)\."), dim_head=dh, heads=inner // dh,
                           num_queries=QUERIES_PER_FRAME, embedding_dim=sd[p + "proj_in.weight"].shape[1],
                           output_dim=sd[p + "proj_out.weight"].shape[0],
                           ff_mult=sd[p + "layers.0.1.1.weight"].shape[0] // dim,
                           video_length=n_latents // QUERIES_PER_FRAME)


def infer_variant(sd, unet: UNetConfig) -> Variant:
    """Which released model these weights behave like: from keys and schedule buffers only."""
    family = "dynamicrafter" if unet.image_cross_attention else "videocrafter"
    recip = sd.get("sqrt_recip_alphas_cumprod")
    ac = sd.get("alphas_cumprod")
    scale_arr = sd.get("scale_arr")
    if unet.camera_modules:     # CamI2V: the 256 model has the image gates, the 512 model not
        base = PRESETS["cami2v_256" if unet.image_gate else "cami2v_512"]
    elif family == "videocrafter" and unet.relative_position:     # VideoCrafter1: 1024 has fps + scale_arr
        base = PRESETS["vc1_1024" if unet.fs_condition or scale_arr is not None else "vc1"]
    elif family == "videocrafter":
        base = PRESETS["vc2"]
    elif unet.image_gate:
        base = PRESETS["256"]
    elif scale_arr is not None and abs(float(scale_arr[-1]) - 0.3) < 1e-4:
        base = PRESETS["1024"]
    elif any(k.startswith("first_stage_model.decoder.") and k.endswith(".mix_factor") for k in sd):
        base = PRESETS["tooncrafter"]    # the 512-interp UNet with the dual-reference video decoder
    else:
        base = PRESETS["512"]
    param = base.parameterization
    if recip is not None:   # v-models store zeros here (the values would be infinite at t=999)
        param = "v" if float(recip.abs().max()) == 0.0 else "eps"
    zero_snr = base.zero_snr if ac is None else float(ac[-1]) == 0.0
    rescale = base.dynamic_rescale_base
    use_scale, scale_b, fix_scale_bug = base.use_scale, base.scale_b, base.fix_scale_bug
    if scale_arr is not None:
        if family == "videocrafter":
            use_scale, scale_b = True, round(float(scale_arr[-1]), 6)
            fix_scale_bug = scale_arr.shape[0] == 1000    # 1400 entries otherwise (the values agree)
        else:
            rescale = round(float(scale_arr[-1]), 6)
    elif ac is not None:    # schedule buffers present but no scale_arr: no x0 rescale
        rescale, use_scale = None, False
    name = base.name
    if unet.model_channels != 320 and name != "tooncrafter":
        name = "custom"
    changes = dict(name=name, parameterization=param, zero_snr=zero_snr, dynamic_rescale_base=rescale,
                   use_scale=use_scale, scale_b=scale_b, fix_scale_bug=fix_scale_bug, default_fs=base.default_fs)
    if family == "dynamicrafter" and not unet.image_gate and param == "eps" and not zero_snr:
        # an eps DynamiCrafter without gates (e.g. a stage-3 run of our trainer): frame-stride like 256
        changes.update(fs_meaning="frame_stride", default_fs=3, spacing="uniform", guidance_rescale=0.0)
    return replace(base, **changes)


def apply_variant_overrides(variant: Variant, overrides: Optional[Mapping]) -> Variant:
    if not overrides:
        return variant
    overrides = dict(overrides)
    if "name" in overrides and overrides["name"] in PRESETS:
        preset = PRESETS[overrides["name"]]
        keep = dict(parameterization=variant.parameterization, zero_snr=variant.zero_snr,
                    dynamic_rescale_base=variant.dynamic_rescale_base, use_scale=variant.use_scale,
                    scale_b=variant.scale_b, fix_scale_bug=variant.fix_scale_bug)
        variant = replace(preset, **keep)
    unknown = set(overrides) - {f.name for f in fields(Variant)}
    if unknown:
        raise ValueError(f"unknown variant fields {sorted(unknown)}; known: {[f.name for f in fields(Variant)]}")
    if overrides.get("parameterization", variant.parameterization) not in ("eps", "v"):
        raise ValueError("parameterization must be 'eps' or 'v'")
    return replace(variant, **{k: v for k, v in overrides.items() if k != "name" or v not in PRESETS})


def infer_config(sd: Mapping[str, torch.Tensor], overrides: Optional[Mapping] = None,
                 heads: Optional[Mapping] = None) -> ModelConfig:
    """Build a ModelConfig from an official-layout state dict (any size).

    `heads` may give {"unet_head_channels", "text_heads", "vision_heads", "resampler_dim_head"}
    for checkpoints whose head widths are neither the released ones nor the tiny convention.
    """
    heads = dict(heads or {})
    unet = infer_unet_config(sd, head_channels=heads.get("unet_head_channels"))
    variant = apply_variant_overrides(infer_variant(sd, unet), overrides)
    # fs=None inside the UNet: DynamiCrafter falls back to default_fs, VideoCrafter's forward to 16
    unet = replace(unet, default_fs=variant.default_fs if variant.family != "videocrafter" else 16)
    text = infer_clip_config(sd, "cond_stage_model.model.", text_heads=heads.get("text_heads"))
    vision = infer_clip_config(sd, "embedder.model.", text_heads=heads.get("text_heads"),
                               vision_heads=heads.get("vision_heads"))
    resampler = infer_resampler_config(sd, dim_head=heads.get("resampler_dim_head"))
    if resampler is not None:
        variant = replace(variant, frames=resampler.video_length)
    elif unet.relative_position:   # VideoCrafter1 samples as many frames as its position tables were trained for
        variant = replace(variant, frames=unet.temporal_length)
    camera = infer_camera_config(sd, unet, variant, heads)
    if camera is not None and "resolution" not in (overrides or {}):
        # CamI2V's epipolar masks are made for one pixel size (its YAML's origin_h x origin_w): its own size
        variant = replace(variant, resolution=(camera.origin_h, camera.origin_w))
    return ModelConfig(unet=unet, vae=infer_vae_config(sd), text=text, vision=vision,
                       resampler=resampler, variant=variant, camera=camera)


def infer_camera_config(sd, unet: UNetConfig, variant: Variant, heads: Mapping) -> Optional[CameraConfig]:
    """CamI2V's pose encoder from its keys; heads and epipolar settings from `heads` (the official YAML:
    keys camera_heads, camera_epipolar) or the released configs (the 512 settings for a model without gates)."""
    p = "pose_encoder."
    if p + "encoder_conv_in.weight" not in sd:
        if unet.camera_modules:
            raise CheckpointError("this CamI2V checkpoint has the UNet's camera modules (pluker_projection, "
                                  "epipolar) but no 'pose_encoder.*' tensors: is the file complete?")
        return None
    keys = [k[len(p):] for k in sd if k.startswith(p)]
    levels = _count(keys, r"encoder_down_conv_blocks\.(\d+)\.")
    blocks = _count(keys, r"encoder_down_conv_blocks\.0\.(\d+)\.")
    channels = tuple(sd[f"{p}encoder_down_conv_blocks.{i}.0.block2.weight"].shape[0] for i in range(levels))
    pe = sd[f"{p}encoder_down_attention_blocks.0.0.attention_blocks.0.pos_encoder.pe"]
    conv_in = sd[p + "encoder_conv_in.weight"]
    epipolar = dict(CAMI2V_EPIPOLAR["cami2v_256" if unet.image_gate else "cami2v_512"])
    epipolar.update(heads.get("camera_epipolar") or {})
    n_heads = heads.get("camera_heads") or default_camera_heads(channels)
    if any(c % n_heads for c in channels):
        raise CheckpointError(f"the camera pose encoder's {n_heads} attention heads must divide its widths {channels}")
    return CameraConfig(channels=channels, num_res_blocks=blocks, cin=conv_in.shape[1],
                        downscale=int(round((conv_in.shape[1] / 6) ** 0.5)), heads=n_heads, max_frames=pe.shape[1],
                        registers=unet.camera_registers, **epipolar)


def default_camera_heads(channels) -> int:
    """The pose encoder's attention heads where no config says: 8 for the released widths (320, ...),
    width / 8 for smaller models (the tiny convention)."""
    return 8 if channels[0] == 320 else max(1, channels[0] // 8)


def with_camera(cfg: ModelConfig, origin_hw: Optional[tuple] = None) -> ModelConfig:
    """The config of a DynamiCrafter `cfg` turned into CamI2V as the official code builds it from a
    DynamiCrafter checkpoint (MODEL-SPEC-CAMI2V §0, §6.2): a pose encoder with the UNet's level widths,
    camera modules with 4 register tokens in the temporal blocks, the epipolar settings and sampling
    defaults of the released config of its kind (256: image gates; 512 otherwise), epipolar masks
    made for `origin_hw` (H, W) pixels (default: the released config's). The objective stays the base's."""
    if cfg.camera is not None:
        return cfg
    if cfg.unet.image_cross_attention is False or cfg.resampler is None:
        raise ValueError("camera control builds on an image-to-video DynamiCrafter (image context stream); "
                         "this model has none")
    kind = "cami2v_256" if cfg.unet.image_gate else "cami2v_512"
    epipolar = dict(CAMI2V_EPIPOLAR[kind])
    if origin_hw is not None:
        epipolar.update(origin_h=int(origin_hw[0]), origin_w=int(origin_hw[1]))
    channels = tuple(cfg.unet.model_channels * m for m in cfg.unet.channel_mult)
    camera = CameraConfig(channels=channels, heads=default_camera_heads(channels), registers=4,
                          max_frames=16, **epipolar)
    base, preset = cfg.variant, PRESETS[kind]
    variant = replace(preset, name=kind if base.name in PRESETS else "custom",
                      **{k: getattr(base, k) for k in ("parameterization", "zero_snr", "dynamic_rescale_base",
                                                       "use_scale", "scale_b", "fix_scale_bug", "fs_meaning",
                                                       "default_fs", "resolution", "frames", "fs_range")})
    unet = replace(cfg.unet, camera_modules=True, camera_registers=camera.registers)
    return replace(cfg, unet=unet, camera=camera, variant=variant)


def tiny_config(family: str = "dynamicrafter", frames: int = 8, **variant_changes) -> ModelConfig:
    """A tiny model of the official architecture (the sizes of the shared reference checkpoint)."""
    dc = family == "dynamicrafter"
    unet = UNetConfig(in_channels=8 if dc else 4, model_channels=32, channel_mult=(1, 2, 4, 4),
                      num_head_channels=16, context_dim=64, image_cross_attention=dc,
                      default_fs=24 if dc else 28)
    clip = ClipConfig(embed_dim=32, text_width=64, text_layers=3, text_heads=4, vision_width=48,
                      vision_layers=2, vision_heads=3)
    variant = replace(PRESETS["512" if dc else "vc2"], name="custom", frames=frames, resolution=(64, 128),
                      **variant_changes)
    return ModelConfig(unet=unet, vae=VAEConfig(ch=32), text=clip, vision=clip if dc else None,
                       resampler=ResamplerConfig(dim=64, depth=2, dim_head=16, heads=3, embedding_dim=48,
                                                 output_dim=64, video_length=frames) if dc else None,
                       variant=variant)
