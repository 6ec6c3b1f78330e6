"""Model set-up for training: initialisation (checkpoint, checkpoint + extras, VideoCrafter
extended with the image stream, or a random tiny model), `build_model` (what a run trains, for
the driver and the exporter alike), EMA, gradient checkpointing, export.

Always the library's `DynamiCrafter` (one implementation of the layers for inference and
training); nothing here re-implements a layer.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from contextlib import contextmanager
from typing import Iterable, Optional

import torch
from torch.utils.checkpoint import checkpoint as grad_checkpoint

import dynamicrafter
from dynamicrafter.checkpoints.loader import model_from_state_dict, read_state_dict
from dynamicrafter.config import DTYPES, ModelConfig, ResamplerConfig, infer_config, tiny_config
from dynamicrafter.model import DynamiCrafter
from dynamicrafter.checkpoints.unused_keys import refuse_unknown
from training.lora import add_lora
from training.stages import prepare_model_for_stage

log = logging.getLogger("training.modeling")

FRESH_OK = ("attn2.to_k_ip.", "attn2.to_v_ip.", "attn2.alpha", "image_proj_model.")


class InitError(ValueError):
    """The initial weights cannot start this run; the message says what to add."""


def tiny_model_config(frames: int, overrides: Optional[dict] = None) -> ModelConfig:
    """A small random model of the official architecture with a 4-channel (text-to-video) UNet,
    as stage 1 starts from. `overrides` = {"unet": {...}, "vae": {...}, "resampler": {...},
    "text": {...}, "vision": {...}, "variant": {...}} changes sizes/fields."""
    cfg = tiny_config(family="dynamicrafter", frames=frames)
    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, in_channels=cfg.unet.out_channels))
    for part, changes in (overrides or {}).items():
        current = getattr(cfg, part)
        if current is None:
            raise InitError(f"model.tiny_overrides.{part}: the tiny model has no {part}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()}
        cfg = dataclasses.replace(cfg, **{part: dataclasses.replace(current, **fixed)})
    if cfg.unet.default_fs != cfg.variant.default_fs:
        cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, default_fs=cfg.variant.default_fs))
    return cfg


def build_tiny(frames: int, seed: int, overrides: Optional[dict] = None) -> DynamiCrafter:
    torch.manual_seed(seed)
    return DynamiCrafter(tiny_model_config(frames, overrides=overrides)).eval().requires_grad_(False)


EXTRA_PREFIXES = ("embedder.", "image_proj_model.")


def _merge(sd: dict, extras: Iterable[str], prefixes: tuple = EXTRA_PREFIXES) -> dict:
    """Add the tensors under `prefixes` that `sd` lacks, from each extra checkpoint in turn."""
    for path in extras:
        extra, _ = read_state_dict(path)
        added = [k for k in extra if k not in sd and k.startswith(tuple(prefixes))]
        log.info("init_extra %s: adding %d tensors the main checkpoint lacks", path, len(added))
        for k in added:
            sd[k] = extra[k]
    return sd


def load_init(path: str, extras: Iterable[str] = (), variant: Optional[dict] = None, seed: int = 0,
              frames: int = 16, image_kv_init: str = "copy_text",
              extra_prefixes: tuple = EXTRA_PREFIXES, config: Optional[str] = None) -> DynamiCrafter:
    """Weights to start a run from. A complete DynamiCrafter file loads as is. A VideoCrafter
    (text-to-video) file is extended with the image stream: CLIP image encoder and Resampler
    from `extras` (e.g. a stage-1 or DynamiCrafter checkpoint), otherwise a fresh Resampler;
    new to_k_ip/to_v_ip start as copies of to_k/to_v (or random). `config`: the file's official
    inference YAML, for what its tensors cannot tell (head widths, CamI2V's epipolar settings)."""
    sd, metadata = read_state_dict(path)
    sd = _merge(sd, extras, extra_prefixes)
    has_image_kv = any("attn2.to_k_ip." in k for k in sd)
    if has_image_kv and any(k.startswith("image_proj_model.") for k in sd):
        heads = None
        if config:
            from dynamicrafter.checkpoints.official_config import read_inference_config
            heads = read_inference_config(config)
        return model_from_state_dict(sd, variant_overrides=variant or None, metadata=metadata, heads=heads)
    if not any(k.startswith("embedder.model.visual.") for k in sd):
        raise InitError(f"{path} has no CLIP image encoder (embedder.*), which the image stream needs; add a "
                        "checkpoint that has one via model.init_extra (a DynamiCrafter or stage-1 checkpoint)")
    base = infer_config(sd)
    v = base.variant
    rescale = v.dynamic_rescale_base if v.dynamic_rescale_base is not None else (v.scale_b if v.use_scale else None)
    variant = dataclasses.replace(v, family="dynamicrafter", dynamic_rescale_base=rescale, use_scale=False,
                                  **(variant or {}))
    unet = dataclasses.replace(base.unet, image_cross_attention=True)
    resampler = base.resampler
    if resampler is None:   # official sizes for a full-width model; the tiny convention otherwise
        ctx = base.unet.context_dim
        full = ctx == 1024
        dim_head = 64 if full else 16
        resampler = ResamplerConfig(dim=ctx, depth=4 if full else 2, dim_head=dim_head,
                                    heads=max(1, (3 * ctx // 4) // dim_head), embedding_dim=base.vision.vision_width,
                                    output_dim=ctx, video_length=frames)
    cfg = dataclasses.replace(base, unet=unet, resampler=resampler, variant=variant)
    torch.manual_seed(seed)
    model = DynamiCrafter(cfg)
    expected = model.state_dict()
    buffers = {k for k, _ in model.named_buffers()}
    refuse_unknown(k for k in sd if k not in expected)   # known-unused keys (EMA copies...) drop; others refuse
    sd = {k: v for k, v in sd.items() if k in expected and k not in buffers}
    mismatched = [k for k in sd if sd[k].shape != expected[k].shape]
    if mismatched:
        raise InitError(f"tensors of the init do not fit the extended model: {mismatched[:3]}")
    missing = [k for k in expected if k not in sd and k not in buffers]
    not_fresh = [k for k in missing if not any(m in k for m in FRESH_OK)]
    if not_fresh:
        raise InitError(f"the init lacks {len(not_fresh)} tensors that cannot start fresh, e.g. {not_fresh[:3]}")
    model.load_state_dict(sd, strict=False)
    if image_kv_init == "copy_text":
        with torch.no_grad():
            for name, mod in model.unet.named_modules():
                if hasattr(mod, "to_k_ip") and f"model.diffusion_model.{name}.to_k_ip.weight" in missing:
                    mod.to_k_ip.weight.copy_(mod.to_k.weight)
                    mod.to_v_ip.weight.copy_(mod.to_v.weight)
    log.info("extended %s with the image stream: %d fresh tensors (%s)", path, len(missing),
             "resampler random" if base.resampler is None else "resampler from extras")
    return model.eval().requires_grad_(False)


def overlay_extras(dc: DynamiCrafter, extras: Iterable[str], prefixes: tuple = EXTRA_PREFIXES) -> int:
    """Replace parts of a (tiny, random) model with tensors from other files, e.g. a VAE trained
    by training.pretrain_vae (prefix first_stage_model.). Shapes must match the model's."""
    own = dc.state_dict()
    loaded = {}
    for path in extras:
        extra, _ = read_state_dict(path)
        _check_vae_groups(path, dc)
        for k, v in extra.items():
            if not k.startswith(tuple(prefixes)):
                continue
            if k not in own:
                raise InitError(f"{path}: tensor {k} is not part of this model; do the sizes in "
                                "model.tiny_overrides match the file?")
            if own[k].shape != v.shape:
                raise InitError(f"{path}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}; "
                                "match model.tiny_overrides to the file")
            loaded[k] = v.to(own[k].dtype)
    if not loaded and list(extras):
        raise InitError(f"none of {list(extras)} holds tensors under {list(prefixes)}")
    dc.load_state_dict(loaded, strict=False)
    return len(loaded)


def _check_vae_groups(path: str, dc: DynamiCrafter) -> None:
    """A VAE file from training.pretrain_vae records its GroupNorm group count, which its weights cannot
    show; using it with another count would silently change every reconstruction."""
    if not path.endswith(".safetensors") or dc.cfg.vae is None:
        return
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = (f.metadata() or {}).get("vae_config")
    groups = json.loads(meta).get("norm_groups", 32) if meta else None
    if groups is not None and groups != dc.cfg.vae.norm_groups:
        raise InitError(f"{path}: this VAE was trained with norm_groups {groups}, the model has "
                        f"{dc.cfg.vae.norm_groups}; set model.tiny_overrides.vae.norm_groups: {groups}")


def build_model(cfg) -> DynamiCrafter:
    """The model a run trains, from its config (`training.config.TrainConfig`): the init
    checkpoint or the tiny seed, prepared for the stage (input conv grown for stage 3), ResBlock
    dropout, LoRA adapters. The driver and `training.export` both build through here."""
    r, m = cfg.run, cfg.model
    if m.tiny:
        overrides = {k: dict(v) for k, v in (m.tiny_overrides or {}).items()}
        if m.variant:
            overrides["variant"] = {**overrides.get("variant", {}), **m.variant}
        dc = build_tiny(cfg.data.frames, r.seed, overrides)
        if m.init_extra:
            overlay_extras(dc, m.init_extra, tuple(m.init_extra_prefixes))
    else:
        dc = load_init(m.init, m.init_extra, m.variant, seed=r.seed, frames=cfg.data.frames,
                       image_kv_init=m.image_kv_init, extra_prefixes=tuple(m.init_extra_prefixes),
                       config=m.init_config)
    prepare_model_for_stage(dc, r.stage)
    if r.camera:        # CamI2V: a DynamiCrafter start gets fresh camera modules (official init)
        from training.camera import add_camera_control
        dc = add_camera_control(dc, (cfg.data.height, cfg.data.width))
        if dc.cfg.camera.origin_h != cfg.data.height:
            raise InitError(f"{m.init}: its epipolar masks are made for {dc.cfg.camera.origin_h}-pixel-high frames "
                            f"(epipolar origin_h), data.height is {cfg.data.height}: train at "
                            f"data.height={dc.cfg.camera.origin_h}, or give the checkpoint's official YAML as "
                            "model.init_config if it was made for another size")
    record_training_size(dc, cfg.data.height, cfg.data.width, cfg.data.frames if r.stage >= 2 else None)
    set_resblock_dropout(dc.unet, m.dropout)
    cfg.check_sizes(8 * 2 ** (len(dc.unet.cfg.channel_mult) - 1))   # a .ckpt init is only known now
    if r.lora:
        add_lora(dc, r.lora)
    return dc


def record_training_size(dc: DynamiCrafter, height: int, width: int, frames: Optional[int]) -> None:
    """The size (and, for the video stages, the length) a run trains at becomes the model's default
    (`variant.resolution`, `variant.frames`), stored in every export's metadata: the library, the
    CLI and the nodes then default to what the checkpoint was trained on."""
    v = dc.cfg.variant
    v = dataclasses.replace(v, resolution=(height, width), frames=frames or v.frames)
    dc.cfg = dataclasses.replace(dc.cfg, variant=v)


def cast_frozen(dc: DynamiCrafter, dtype: torch.dtype) -> None:
    """Store the frozen encoders (VAE, text and image CLIP towers) in a smaller dtype for
    memory-lean runs; the library casts their inputs and returns float32. Frozen UNet layers
    stay in the training dtype (they sit between trainable layers in the same activations)."""
    for part in (dc.first_stage_model, dc.cond_stage_model, dc.embedder):
        if part is not None:
            part.to(dtype)


# --------------------------------------------------------------------------- gradient checkpointing

def enable_gradient_checkpointing(unet) -> int:
    """Recompute each UNet block's activations in the backward pass instead of storing them."""
    blocks = list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks)
    if hasattr(unet, "init_attn"):
        blocks.append(unet.init_attn)
    for block in blocks:
        if getattr(block, "_ckpt_wrapped", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return grad_checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._ckpt_wrapped = True
    return len(blocks)


# --------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadow copies).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so a short
    fine-tune's average is not dominated by the starting weights (at a fixed 0.9999, 2,000
    steps would leave 82 % of the initial weights in it)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.num_updates = 0
        self.params = dict(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)
        self.num_updates += 1

    def describe(self) -> str:
        return f"EMA weights (decay {self.decay}, {self.num_updates} updates, last decay {self.current_decay():.6f})"

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = int(state["num_updates"])
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)

    @contextmanager
    def swapped_in(self):
        """Temporarily put the EMA weights into the model (for sampling or export)."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])


# --------------------------------------------------------------------------- export

def export_safetensors(dc: DynamiCrafter, path: str, dtype: str = "fp16", weights: str = "") -> str:
    """One .safetensors in the official key layout (what dynamicrafter.load_model and the
    ComfyUI loader read), written atomically by the library. `weights` says which weights
    these are (raw, or EMA with its decay); it is logged and stored as metadata."""
    meta = {"training_weights": weights} if weights else None
    out = str(dynamicrafter.save_checkpoint(dc, path, dtype=DTYPES[dtype], metadata=meta))
    os.chmod(out, 0o644)      # readable by a ComfyUI running as another user, whatever the umask
    log.info("exported %s (%s, %s)", out, weights or "model weights", dtype)
    return out


def set_resblock_dropout(unet, p: float) -> int:
    """Dropout probability of the spatial ResBlocks' output layers (the official trainer's
    `dropout`, 0.1); the temporal convolutions keep their fixed 0.1. Training only: dropout
    does nothing at inference."""
    from dynamicrafter.models.unet import ResBlock
    n = 0
    for m in unet.modules():
        if isinstance(m, ResBlock):
            for layer in m.out_layers:
                if isinstance(layer, torch.nn.Dropout):
                    layer.p = p
                    n += 1
    return n
