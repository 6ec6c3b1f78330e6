"""One config file per run (YAML or TOML) + ``section.key=value`` CLI overrides.

Sections and their defaults are the dataclasses below; an unknown key is an error that
lists the known ones, so a typo never silently trains with a default.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import yaml

from dynamicrafter.config import DTYPES


class ConfigError(ValueError):
    """The run config is unusable; the message says which key to change and how."""


@dataclass
class ModelSection:
    init: Optional[str] = None          # checkpoint to start from (official layout, .ckpt/.safetensors)
    init_extra: list = field(default_factory=list)  # more checkpoints: their tensors under init_extra_prefixes
    init_config: Optional[str] = None   # the init's official inference YAML (head widths, CamI2V epipolar settings)
    init_extra_prefixes: list = field(default_factory=lambda: ["embedder.", "image_proj_model."])  # that init lacks
    tiny: bool = False                  # random tiny model of the official architecture (tests, demo)
    tiny_overrides: dict = field(default_factory=dict)  # sizes of the tiny model: {unet: {...}, vae: {...}, ...}
    # overrides: parameterization, zero_snr, dynamic_rescale_base, fs_meaning
    variant: dict = field(default_factory=dict)
    image_kv_init: str = "copy_text"    # new to_k_ip/to_v_ip (from a VideoCrafter init): copy_text | random
    frozen_dtype: str = "fp32"          # dtype of the frozen encoders (VAE, text + image CLIP): fp32 | bf16 | fp16
    dropout: float = 0.1                # dropout in the UNet ResBlocks while training (the official trainer's 0.1)


@dataclass
class DataSection:
    csv: Optional[str] = None
    video_dir: Optional[str] = None     # default: the CSV's folder
    height: int = 320
    width: int = 512
    frames: int = 16                    # clip length (stage 1 always uses single frames)
    max_stride: int = 6                 # random frame stride 1..max_stride
    fs_meaning: Optional[str] = None    # frame_stride | fps; default: the model variant's
    fps_max: Optional[int] = None
    num_workers: int = 2
    uncond_prob: float = 0.05           # 5% text only, 5% image only, 5% both dropped (CFG)
    val_csv: Optional[str] = None       # held-out clips for the validation loss (same layout as csv)
    cache_dir: Optional[str] = None     # encode VAE latents, CLIP image and text embeddings once, train from them


@dataclass
class OptimSection:
    name: str = "adamw"                 # adamw | adamw8bit (bitsandbytes, 8-bit states: the 24 GB preset)
    lr: float = 5e-5
    weight_decay: float = 1e-2          # torch AdamW default, as the official trainer
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"          # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.0           # cosine floor, fraction of lr
    grad_clip: float = 0.0              # 0 = off


@dataclass
class RunSection:
    stage: int = 3
    run_dir: str = "runs/run"
    seed: int = 0
    max_steps: int = 1000
    global_batch: int = 64              # samples per optimizer step, all processes together
    micro_batch: int = 1                # samples per forward per process; accumulation makes up the rest
    precision: str = "fp32"             # fp32 | bf16 (autocast)
    grad_checkpointing: bool = False
    distributed: str = "ddp"            # ddp | fsdp (only used under torchrun with >1 process)
    ema_decay: float = 0.0              # 0 = no EMA
    train_all: bool = False             # stage 3: train every UNet parameter (temporal too)
    lora: dict = field(default_factory=dict)   # {rank, alpha, targets[, dropout]}: LoRA on a frozen UNet
    cond_frame: str = "random"          # stage 3 conditioning frame: random | first
    interp_prob: float = 0.0            # stage 3: share of samples with the first+last frame (interpolation) concat
    camera: bool = False                # stage 3 CamI2V camera control: trains only the camera modules (poses needed)
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 3
    export_at_end: bool = True
    export_dtype: str = "fp32"          # fp32 | fp16 | bf16 (fp32 between stages: the frozen UNet round-trips)
    export_ema: bool = True             # export the EMA weights when EMA is on
    progress: bool = True               # progress bar on rank 0
    tensorboard: bool = True
    device: str = "auto"                # auto | cpu | cuda


@dataclass
class EvalSection:
    every: int = 0                      # 0 = no sample videos during training
    prompts: list = field(default_factory=list)   # fixed prompts; paired with the first dataset clips' frames
    images: list = field(default_factory=list)    # optional conditioning images (paths), one per prompt
    steps: int = 25
    cfg_text: float = 7.5
    cfg_img: Optional[float] = None
    fs: Optional[int] = None
    seed: int = 1234
    fps: int = 8
    val_every: int = 0                  # validation loss every N steps (needs data.val_csv); 0 = off
    val_clips: int = 8                  # the first N clips of data.val_csv (fixed clip, noise and timesteps)
    val_timesteps: list = field(default_factory=lambda: [100, 300, 500, 700, 900])


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        cfg = TrainConfig()
        for section, values in (d or {}).items():
            if section not in _SECTIONS:
                raise ConfigError(f"unknown config section {section!r}; known: {sorted(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping")
            for k, v in values.items():
                _set(cfg, section, k, v)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        r = self.run
        if r.stage not in (1, 2, 3):
            raise ConfigError(f"run.stage must be 1, 2 or 3, got {r.stage}")
        if r.precision not in ("fp32", "bf16"):
            raise ConfigError(f"run.precision must be fp32 or bf16, got {r.precision!r}")
        if r.distributed not in ("ddp", "fsdp"):
            raise ConfigError(f"run.distributed must be ddp or fsdp, got {r.distributed!r}")
        if r.cond_frame not in ("random", "first"):
            raise ConfigError(f"run.cond_frame must be random or first, got {r.cond_frame!r}")
        if r.export_dtype not in DTYPES:
            raise ConfigError(f"run.export_dtype must be one of {', '.join(DTYPES)}, got {r.export_dtype!r}")
        if r.micro_batch < 1 or r.global_batch < 1 or r.max_steps < 0:
            raise ConfigError("run.micro_batch and run.global_batch must be >= 1, run.max_steps >= 0")
        if not 0.0 <= r.ema_decay < 1.0:
            raise ConfigError("run.ema_decay must be in [0, 1)")
        if self.optim.name not in ("adamw", "adamw8bit"):
            raise ConfigError(f"optim.name must be adamw or adamw8bit, got {self.optim.name!r}")
        if self.optim.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule must be constant or cosine, got {self.optim.schedule!r}")
        if not 0.0 <= self.data.uncond_prob <= 1.0 / 3.0:
            raise ConfigError("data.uncond_prob must be in [0, 1/3] (three disjoint drop cases)")
        if self.model.frozen_dtype not in DTYPES:
            raise ConfigError(f"model.frozen_dtype must be one of {', '.join(DTYPES)}")
        if not 0.0 <= r.interp_prob <= 1.0:
            raise ConfigError("run.interp_prob must be in [0, 1]")
        if self.model.image_kv_init not in ("copy_text", "random"):
            raise ConfigError("model.image_kv_init must be copy_text or random")
        if not self.data.csv:
            raise ConfigError("set data.csv: the CSV listing the training videos "
                              "(video,caption or videoid,name,page_dir)")
        if not self.model.init and not self.model.tiny:
            raise ConfigError("set model.init (a checkpoint to start from) or model.tiny=true")
        if not 0.0 <= self.model.dropout < 1.0:
            raise ConfigError("model.dropout must be in [0, 1)")
        switch = sorted(set(self.model.variant or {}) & {"parameterization", "zero_snr"})
        if r.stage == 1 and switch and not self.model.tiny:
            raise ConfigError(f"stage 1 must keep the base model's parameterisation (model.variant sets {switch}): "
                              "it trains only the image context layers, which cannot absorb a new objective; "
                              "switch to v + zero-SNR in stage 2, where the UNet trains")
        if self.eval.val_every and not self.data.val_csv:
            raise ConfigError("eval.val_every needs data.val_csv: a CSV of held-out clips")
        if any(not 0 <= int(t) < 1000 for t in self.eval.val_timesteps) or not self.eval.val_timesteps:
            raise ConfigError("eval.val_timesteps must be a non-empty list of timesteps in [0, 1000)")
        if r.lora:
            self.check_lora()
        if r.camera:
            self.check_camera()
        self.check_sizes(size_multiple(self))

    def check_camera(self) -> None:
        r = self.run
        clashes = [(r.stage != 3, f"run.stage={r.stage} (camera control trains on the image-to-video stage: "
                                  "run.stage=3)"),
                   (r.train_all, "run.train_all (camera runs train only the camera modules: drop it)"),
                   (bool(r.lora), "run.lora (camera runs train the camera modules themselves: drop run.lora)"),
                   (r.interp_prob > 0, "run.interp_prob (the interpolation layout has no camera data: set it to 0)"),
                   (bool(self.data.cache_dir), "data.cache_dir (the latent cache holds no camera poses: drop it)"),
                   (self.data.frames > 16, f"data.frames={self.data.frames} (the pose encoder's frame positions "
                                           "stop at 16: data.frames<=16)")]
        bad = [why for clash, why in clashes if clash]
        if bad:
            raise ConfigError("run.camera does not go with " + "; ".join(bad))

    def check_lora(self) -> None:
        from training.lora import GROUPS
        spec = self.run.lora
        unknown = set(spec) - {"rank", "alpha", "targets", "dropout"}
        if unknown:
            raise ConfigError(f"run.lora has unknown keys {sorted(unknown)}; known: rank, alpha, targets, dropout")
        if not isinstance(spec.get("rank"), int) or spec["rank"] < 1:
            raise ConfigError("run.lora.rank must be a positive integer (e.g. 16)")
        targets = spec.get("targets")
        if not targets or not isinstance(targets, list) or set(targets) - set(GROUPS):
            raise ConfigError(f"run.lora.targets must be a list of layer groups from {list(GROUPS)}, got {targets!r}")
        if self.run.distributed == "fsdp":
            raise ConfigError("run.lora trains a few million parameters: use run.distributed=ddp, not fsdp")
        if self.run.train_all:
            raise ConfigError("run.lora keeps the UNet frozen: drop run.train_all")

    def check_sizes(self, multiple: Optional[int]) -> None:
        """data.height/width must divide down to the UNet's smallest feature map."""
        for key in ("height", "width"):
            v = getattr(self.data, key)
            m = multiple or 8
            if v < m or v % m:
                near = max(m, m * round(v / m))
                why = "the VAE's 8x" if multiple is None else f"the VAE's 8x and the UNet's {multiple // 8}x"
                raise ConfigError(f"data.{key}={v} is not a multiple of {m} ({why} downsampling); "
                                  f"nearest valid: data.{key}={near}")

    def accumulation(self, world: int) -> int:
        """Micro-steps per optimizer step so that micro_batch * world * accum == global_batch."""
        per = self.run.micro_batch * world
        if self.run.global_batch % per:
            raise ConfigError(f"run.global_batch={self.run.global_batch} is not a multiple of "
                             f"micro_batch*processes={self.run.micro_batch}*{world}")
        return self.run.global_batch // per


def size_multiple(cfg: "TrainConfig") -> Optional[int]:
    """Pixels that height and width must be a multiple of: 8 (VAE) x 2**(UNet levels - 1).
    Known at config load for a tiny model and a .safetensors init (read from its key names);
    None when only the built model can tell (a .ckpt init: checked again after it loads)."""
    m = cfg.model
    if m.tiny:
        from dynamicrafter.config import tiny_config
        mult = (m.tiny_overrides or {}).get("unet", {}).get("channel_mult") or tiny_config().unet.channel_mult
        return 8 * 2 ** (len(mult) - 1)
    if m.init and str(m.init).endswith(".safetensors") and os.path.isfile(m.init):
        from safetensors import safe_open
        with safe_open(m.init, "pt") as f:
            downs = [k for k in f.keys() if re.match(r"model\.diffusion_model\.input_blocks\.\d+\.0\.op\.weight$", k)]
        return 8 * 2 ** len(downs)
    return None


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
_SECTIONS = {f.name: f.type for f in fields(TrainConfig)}


def _set(cfg: TrainConfig, section: str, key: str, value: Any) -> None:
    sec = getattr(cfg, section)
    names = {f.name: f for f in fields(sec)}
    if key not in names:
        raise ConfigError(f"unknown config key {section}.{key}; known in [{section}]: {sorted(names)}")
    current = getattr(sec, key)
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)      # YAML 1.1 reads "3e-5" as a string
        if isinstance(current, int) and not isinstance(current, bool) and value.is_integer():
            value = int(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if key in ("run_dir", "csv", "video_dir", "init", "init_config", "val_csv", "cache_dir") and isinstance(value, str):
        value = os.path.expanduser(str(value))
    setattr(sec, key, value)


def load_file(path: str) -> dict:
    with open(path, "rb") as fh:
        raw = fh.read()
    if path.endswith(".toml"):
        import tomllib
        return tomllib.loads(raw.decode("utf-8"))
    data = yaml.safe_load(raw.decode("utf-8"))
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of sections")
    return data or {}


def parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. run.max_steps=100)")
    dotted, raw = text.split("=", 1)
    section, key = dotted.split(".", 1)
    return section, key, yaml.safe_load(raw) if raw != "" else None


def load_config(path: Optional[str], overrides: list[str] = ()) -> TrainConfig:
    d = load_file(path) if path else {}
    for o in overrides:
        section, key, value = parse_override(o)
        d.setdefault(section, {})[key] = value
    return TrainConfig.from_dict(d)


# Changes on resume that alter what the run trains (refused without --allow-config-change);
# a key ending in "." guards its whole section.
GUARDED = ("optim.lr", "data.csv", "data.video_dir", "run.stage", "run.train_all", "run.lora", "run.camera", "model.")


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(section.key, old, new) for every key whose value differs between two resolved configs."""
    out = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            va, vb = a.get(key), b.get(key)
            if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
                va, vb = list(va), list(vb)
            if va != vb:
                out.append((f"{section}.{key}", a.get(key), b.get(key)))
    return out


def guarded(key: str) -> bool:
    return any(key == g or (g.endswith(".") and key.startswith(g)) for g in GUARDED)
