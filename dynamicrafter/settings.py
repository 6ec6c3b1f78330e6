"""Sampler settings as values (issue #26): what guidance, which steps, which context windows.

Three small frozen dataclasses travel together instead of a dozen loose keywords. The sampling
functions (`sample`, `sample_ddim`, `animate`, `continue_clip`, ...) take them as `guidance=`,
`schedule=` and `windows=`; their older loose keywords (cfg_text, cfg_img, guidance_rescale,
cfg_interval, steps, spacing, eta, solver, window, window_overlap, window_schedule) still work for
one release and raise a DeprecationWarning (README: Library).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Guidance:
    """cfg_text: text (or single) CFG scale, 1 = no guidance; cfg_img: the image scale of dual CFG
    (None = single CFG); rescale: guidance rescale phi; interval: (t_lo, t_hi) DDPM timesteps where
    guidance runs (None = every step)."""
    cfg_text: float = 1.0
    cfg_img: Optional[float] = None
    rescale: float = 0.0
    interval: Optional[tuple] = None


@dataclass(frozen=True)
class Schedule:
    """steps and their spacing ("uniform_trailing", "uniform", "quad"), DDIM's eta, the solver."""
    steps: int = 50
    spacing: str = "uniform_trailing"
    eta: float = 0.0
    solver: str = "ddim"


@dataclass(frozen=True)
class Windows:
    """Context windows along time: size frames (None = one pass), overlapping by overlap frames,
    "uniform" or "looped" (`dynamicrafter.sampling.windows`)."""
    size: Optional[int] = None
    overlap: int = 4
    schedule: str = "uniform"


@dataclass(frozen=True)
class Camera:
    """A CamI2V camera move: `trajectory` (a preset name of dynamicrafter.camera.PRESET_NAMES, a
    RealEstate10K-style pose file, or (N, 4, 4) world-to-camera matrices), resampled as the official
    demo (`extract_ratio`: the part of the trajectory spread over the clip; `trace_scale`: the
    translations' scale), and the camera CFG scale `cfg` (1 = off; else a third UNet call per step)."""
    trajectory: object
    extract_ratio: float = 1.0
    trace_scale: float = 1.0
    cfg: float = 1.0


# the loose keywords of earlier releases: keyword -> (settings object, field)
LEGACY = {"cfg_text": ("guidance", "cfg_text"), "cfg_img": ("guidance", "cfg_img"),
          "guidance_rescale": ("guidance", "rescale"), "cfg_interval": ("guidance", "interval"),
          "steps": ("schedule", "steps"), "spacing": ("schedule", "spacing"), "eta": ("schedule", "eta"),
          "solver": ("schedule", "solver"), "window": ("windows", "size"),
          "window_overlap": ("windows", "overlap"), "window_schedule": ("windows", "schedule")}


def resolve(where: str, guidance: Guidance, schedule: Schedule, windows: Windows,
            legacy: dict, stacklevel: int = 3) -> tuple[Guidance, Schedule, Windows]:
    """The settings of one call: the objects (the caller's defaults when not given) with the loose
    keywords of `legacy` applied on top (DeprecationWarning); an unknown keyword is a TypeError
    naming it, as Python's own."""
    unknown = sorted(set(legacy) - set(LEGACY))
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    if legacy:
        warnings.warn(f"{where}(): the keywords {', '.join(sorted(legacy))} are deprecated and go in the next "
                      f"release: pass guidance=Guidance(...), schedule=Schedule(...), windows=Windows(...) "
                      f"(dynamicrafter.settings)", DeprecationWarning, stacklevel=stacklevel)
    objs = {"guidance": guidance, "schedule": schedule, "windows": windows}
    for name, kind in (("guidance", Guidance), ("schedule", Schedule), ("windows", Windows)):
        if not isinstance(objs[name], kind):
            raise ValueError(f"{name} must be a dynamicrafter.settings.{kind.__name__}, "
                             f"got {type(objs[name]).__name__}")
    for key, value in legacy.items():
        obj, field = LEGACY[key]
        objs[obj] = dataclasses.replace(objs[obj], **{field: value})
    return objs["guidance"], objs["schedule"], objs["windows"]


def variant_settings(where: str, variant, guidance: Optional[Guidance], schedule: Optional[Schedule],
                     windows: Optional[Windows], legacy: dict) -> tuple[Guidance, Schedule, Windows]:
    """`resolve` for the entry points whose defaults are the variant's (animate, continue_clip):
    its guidance, 50 steps of its spacing at eta 1 with DDIM; a loose keyword set to None meant
    the variant's value, as before."""
    legacy = {k: v for k, v in legacy.items()
              if not (v is None and k in ("cfg_text", "cfg_img", "guidance_rescale", "spacing"))}
    default = Guidance(variant["cfg_text"], variant.get("cfg_img"), variant["guidance_rescale"])
    return resolve(where, guidance or default,
                   schedule or Schedule(50, variant["spacing"], 1.0), windows or Windows(), legacy, stacklevel=4)
