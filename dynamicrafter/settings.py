"""Sampler settings as values (issue #26): what guidance, which steps, which context windows, which
video, how it moves.

Small frozen dataclasses travel together instead of a dozen loose keywords. The sampling
functions (`sample`, `sample_ddim`, `animate`, `continue_clip`, ...) take them as `guidance=`,
`schedule=` and `windows=`, `animate` also `shot=` and `motion=`; their older loose keywords
(`LEGACY`, `SHOT_KEYWORDS`, `MOTION_KEYWORDS`) still work for one release and raise a
DeprecationWarning (README: Library).
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
    guidance runs (None = every step); camera: CamI2V's camera CFG scale (1 = off; else a third UNet call
per step, `animate` takes it from `Camera.cfg`)."""
    cfg_text: float = 1.0
    cfg_img: Optional[float] = None
    rescale: float = 0.0
    interval: Optional[tuple] = None
    camera: float = 1.0

    @classmethod
    def of_model(cls, variant: dict) -> "Guidance":
        """The guidance a model was made for, from its variant metadata: cfg_text, cfg_img (None =
        single CFG; 1 = text-only guidance, the image in both branches) and guidance rescale."""
        return cls(float(variant["cfg_text"]), variant.get("cfg_img"), float(variant.get("guidance_rescale", 0.0)))


@dataclass(frozen=True)
class Schedule:
    """steps and their spacing ("uniform_trailing", "uniform", "quad"), DDIM's eta, the solver; start: the
    step the run begins at (x_T already at that step's level, `sampling.motion`; plain DDIM only);
    cache (k, depth): k > 1 reuses the deep UNet blocks between every k-th step (DeepCache, `sample`)."""
    steps: int = 50
    spacing: str = "uniform_trailing"
    eta: float = 0.0
    solver: str = "ddim"
    start: int = 0
    cache: tuple = (1, 1)


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


@dataclass(frozen=True, eq=False)
class Shot:
    """The video `animate` makes: frames, size (height, width) and fs (None = the variant's), the
    seed of its noise; loop=True ends it on its start image, end_image (1, 3, H, W) in [-1, 1] on
    that image (interpolation); framing (contract.FRAMINGS): how the image(s) fit the size, "crop" (the
    official cover crop), "pad" (the whole image on a grey border) or "stretch"."""
    frames: Optional[int] = None
    size: Optional[tuple] = None
    fs: Optional[int] = None
    seed: int = 123
    loop: bool = False
    end_image: object = None
    framing: str = "crop"


@dataclass(frozen=True, eq=False)
class Motion:
    """Directing the motion (`dynamicrafter.sampling.motion`, design §14): mask (H, W) or (T, H, W) in
    [0, 1], 1 = free to move, 0 = hold the image (soft edge of `feather` latent pixels); init_video
    (1, 3, T, H, W) in [-1, 1] with `strength` in [0, 1] (1 = from pure noise, 0 = the clip back);
    amount in [0, 1] (1 = today's sampler; lower starts later from the image: less motion);
    prompt_schedule "0: a boat | 24: a storm" (or an encoded `motion.PromptSchedule`), per context
    window; camera: a CamI2V move (a `Camera`, or just its trajectory)."""
    mask: object = None
    feather: float = 1.0
    init_video: object = None
    strength: float = 1.0
    amount: float = 1.0
    prompt_schedule: object = None
    camera: object = None


# the loose keywords of earlier releases: keyword -> (settings object, field)
LEGACY = {"cfg_text": ("guidance", "cfg_text"), "cfg_img": ("guidance", "cfg_img"),
          "guidance_rescale": ("guidance", "rescale"), "cfg_interval": ("guidance", "interval"),
          "steps": ("schedule", "steps"), "spacing": ("schedule", "spacing"), "eta": ("schedule", "eta"),
          "solver": ("schedule", "solver"), "window": ("windows", "size"),
          "window_overlap": ("windows", "overlap"), "window_schedule": ("windows", "schedule")}
# animate's loose keywords of earlier releases
SHOT_KEYWORDS = {"frames": ("shot", "frames"), "fs": ("shot", "fs"), "seed": ("shot", "seed"),
                 "loop": ("shot", "loop"), "end_image": ("shot", "end_image")}
MOTION_KEYWORDS = {"motion_mask": ("motion", "mask"), "mask_feather": ("motion", "feather"),
                   "init_video": ("motion", "init_video"), "strength": ("motion", "strength"),
                   "motion": ("motion", "amount"), "prompt_schedule": ("motion", "prompt_schedule"),
                   "camera": ("motion", "camera")}


def apply_legacy(where: str, values: dict, legacy: dict, keywords: dict, stacklevel: int = 3) -> dict:
    """values {name: settings value} with the loose keywords of `legacy` applied on top (`keywords`:
    keyword -> (value's name, field); a DeprecationWarning naming the values to pass instead); an
    unknown keyword is a TypeError naming it, as Python's own; a value of the wrong type a ValueError."""
    unknown = sorted(set(legacy) - set(keywords))
    if unknown:
        raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}")
    for name, value in values.items():
        kind = KINDS.get(name)
        if kind is not None and not isinstance(value, kind):
            raise ValueError(f"{name} must be a dynamicrafter.settings.{kind.__name__}, got {type(value).__name__}")
    if legacy:
        names = sorted({keywords[k][0] for k in legacy})
        instead = ", ".join(f"{n}={type(values[n]).__name__}(...)" for n in names)
        warnings.warn(f"{where}(): the keywords {', '.join(sorted(legacy))} are deprecated and go in the next "
                      f"release: pass {instead} (dynamicrafter.settings)", DeprecationWarning, stacklevel=stacklevel)
    out = dict(values)
    for key, value in legacy.items():
        name, field = keywords[key]
        out[name] = dataclasses.replace(out[name], **{field: value})
    return out


KINDS = {"guidance": Guidance, "schedule": Schedule, "windows": Windows, "shot": Shot, "motion": Motion}


def resolve(where: str, guidance: Guidance, schedule: Schedule, windows: Windows,
            legacy: dict, stacklevel: int = 3) -> tuple[Guidance, Schedule, Windows]:
    """The settings of one call: the objects (the caller's defaults when not given) with the loose
    keywords of `legacy` (`LEGACY`) applied on top (`apply_legacy`)."""
    out = apply_legacy(where, {"guidance": guidance, "schedule": schedule, "windows": windows}, legacy, LEGACY,
                       stacklevel + 1)
    return out["guidance"], out["schedule"], out["windows"]


def variant_settings(where: str, variant, guidance: Optional[Guidance], schedule: Optional[Schedule],
                     windows: Optional[Windows], legacy: dict) -> tuple[Guidance, Schedule, Windows]:
    """`resolve` for the entry points whose defaults are the variant's (animate, continue_clip):
    its guidance, 50 steps of its spacing at eta 1 with DDIM; a loose keyword set to None meant
    the variant's value, as before."""
    legacy = {k: v for k, v in legacy.items()
              if not (v is None and k in ("cfg_text", "cfg_img", "guidance_rescale", "spacing"))}
    return resolve(where, guidance or Guidance.of_model(variant),
                   schedule or Schedule(50, variant["spacing"], 1.0), windows or Windows(), legacy, stacklevel=4)


def shot_and_motion(where: str, shot: Optional[Shot], motion, legacy: dict) -> tuple[Shot, Motion, dict]:
    """`animate`'s Shot and Motion (the defaults when not given) with its loose keywords of earlier releases
    (`SHOT_KEYWORDS`, `MOTION_KEYWORDS`, size= / height= / width=, motion= as a number) taken out of
    `legacy` and applied (DeprecationWarning); returns them and the keywords left for `variant_settings`."""
    legacy = dict(legacy)
    if isinstance(motion, (int, float)):        # motion= was the motion amount
        legacy["motion"], motion = motion, None
    if "height" in legacy or "width" in legacy:
        legacy["size"] = (legacy.pop("height", None), legacy.pop("width", None))
    keywords = {**SHOT_KEYWORDS, **MOTION_KEYWORDS, "size": ("shot", "size")}
    own = {k: legacy.pop(k) for k in list(legacy) if k in keywords}
    values = apply_legacy(where, {"shot": shot or Shot(), "motion": motion or Motion()}, own, keywords, stacklevel=4)
    return values["shot"], values["motion"], legacy
