"""`python -m dynamicrafter animate ...` — animate an image (or, with a text-to-video
checkpoint, a prompt) headless and write the video."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .config import DTYPES, WEIGHT_DTYPES
from .contract import FRAMINGS, WINDOW_SCHEDULES
from .devices import compute_dtype, default_device
from .settings import Camera, Guidance, Motion, Schedule, Shot, Windows
from .sampling.solvers import SOLVERS
from .models.speed import FAST_PATHS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynamicrafter", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("animate", help="image (+ prompt) -> video")
    a.add_argument("--ckpt", required=True, help="DynamiCrafter/VideoCrafter .ckpt or .safetensors")
    a.add_argument("--image", help="start image (omit for text-to-video checkpoints)")
    a.add_argument("--end-image", help="end image: generative interpolation between --image and this "
                                       "(required by ToonCrafter)")
    a.add_argument("--framing", choices=list(FRAMINGS), default="crop",
                   help="how the image(s) fit --width x --height: crop (cover, the official crop), pad (the whole "
                        "image on a grey border) or stretch")
    a.add_argument("--loop", action="store_true", help="make a looping video (last frame returns to the first)")
    a.add_argument("--prompt", default="")
    a.add_argument("--negative-prompt", default="")
    a.add_argument("--frames", type=int, help="default: the model's (16)")
    a.add_argument("--height", type=int)
    a.add_argument("--width", type=int)
    a.add_argument("--fs", type=int, help="frame stride (256 model) or fps (512/1024); default per model")
    a.add_argument("--steps", type=int, default=50)
    a.add_argument("--cfg", type=float, help="text guidance scale (default 7.5; 12 for VideoCrafter)")
    a.add_argument("--cfg-img", type=float, help="image guidance scale: enables dual CFG")
    a.add_argument("--solver", choices=list(SOLVERS), default="ddim",
                   help="ddim: the official sampler; dpmpp_2m / unipc: the same video in fewer steps "
                        "(e.g. --solver dpmpp_2m --steps 15; see the README's Speed table)")
    a.add_argument("--eta", type=float, help="DDIM noise (default 1.0 with ddim; the other solvers take 0)")
    a.add_argument("--guidance-rescale", type=float, help="default per model (0.7 for 512/1024, 0 for 256)")
    a.add_argument("--spacing", choices=["uniform", "uniform_trailing", "quad"])
    a.add_argument("--window", type=int, help="context windows of this many frames (e.g. 16) for --frames "
                                              "beyond the model's; default: one pass over all frames")
    a.add_argument("--window-overlap", type=int, default=4, help="frames shared by neighbouring windows")
    a.add_argument("--window-schedule", choices=list(WINDOW_SCHEDULES), default="uniform",
                   help="looped: windows wrap from the last frame to the first (with --loop)")
    a.add_argument("--camera", help="CamI2V camera move: a preset ('orbit left', 'zoom in', ... see "
                   "dynamicrafter.camera.PRESET_NAMES) or a RealEstate10K-style pose file")
    a.add_argument("--cfg-camera", type=float, default=1.0, help="camera guidance scale (1 = off; a third UNet call)")
    a.add_argument("--trace-extract-ratio", type=float, default=1.0,
                   help="part of the camera trajectory spread over the clip (the official demo's UI: 0.1)")
    a.add_argument("--trace-scale", type=float, default=1.0, help="scale of the camera translations")
    a.add_argument("--mask", help="motion brush: a grey image, white = free to move, black = hold the input image")
    a.add_argument("--mask-feather", type=float, default=1.0, help="soft edge of --mask, in latent pixels (8 px)")
    a.add_argument("--init-video", help="video to video: start from this clip (its first --frames frames)")
    a.add_argument("--strength", type=float, default=1.0,
                   help="with --init-video: 1 = ignore the clip (pure noise), 0 = the clip back; 0.5-0.8 restyles it")
    a.add_argument("--motion", type=float, default=1.0,
                   help="motion amount in [0, 1]: 1 = the model's own; lower starts later from the image "
                        "(CIL analytic init): less motion, closer to the image")
    a.add_argument("--prompt-schedule", help="prompts along the video, e.g. \"0: a boat | 24: a storm rises\" "
                                             "(with --window: each window's text interpolated at its centre)")
    a.add_argument("--seed", type=int, default=123)
    a.add_argument("--config", help="the checkpoint's official inference YAML (head widths of custom models)")
    a.add_argument("--variant", help="override the detected variant, e.g. 512_interp (default fs 10)")
    a.add_argument("--dtype", choices=["auto", *DTYPES], default="fp32",
                   help="auto: bf16 where the device supports it, else fp16; fp32 on the CPU")
    a.add_argument("--weight-dtype", choices=[k for k in WEIGHT_DTYPES if k.startswith("fp8")],
                   help="store the UNet's matrices in fp8 (computed in --dtype): about half the memory of fp16")
    a.add_argument("--speed", nargs="+", choices=FAST_PATHS, default=[],
                   help="UNet fast paths (dynamicrafter.models.speed.prepare_for_speed): compile (regional "
                        "torch.compile), fuse (fused attention projections), channels_last, fp8_matmul (fp8 "
                        "products for --weight-dtype fp8_e4m3fn where the chip has them)")
    a.add_argument("--device", default=str(default_device()), help="default: cuda, xpu or mps when present, else cpu")
    a.add_argument("--save-fps", type=float, default=8)
    a.add_argument("--out", required=True, help="output .mp4, .webp, .gif or .png (frame strip)")
    return p


def cli_settings(args, variant) -> dict:
    """guidance / schedule / windows from the command line (unset options: the variant's defaults)."""
    own = Guidance.of_model(variant)
    guidance = Guidance(own.cfg_text if args.cfg is None else args.cfg,
                        own.cfg_img if args.cfg_img is None else args.cfg_img,
                        own.rescale if args.guidance_rescale is None else args.guidance_rescale)
    eta = (1.0 if args.solver == "ddim" else 0.0) if args.eta is None else args.eta
    return dict(guidance=guidance, schedule=Schedule(args.steps, args.spacing or variant["spacing"], eta, args.solver),
                windows=Windows(args.window, args.window_overlap, args.window_schedule))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from . import load_model
    from .pipeline import animate
    from .video import load_image, save_video

    t0 = time.time()
    dtype = compute_dtype(args.device) if args.dtype == "auto" else DTYPES[args.dtype]
    dc = load_model(args.ckpt, device=args.device, dtype=dtype,
                    variant_overrides={"name": args.variant} if args.variant else None, config=args.config,
                    weight_dtype=WEIGHT_DTYPES[args.weight_dtype] if args.weight_dtype else None)
    if args.speed:
        from .models.speed import prepare_for_speed
        prepare_for_speed(dc, **{path: True for path in args.speed})
    image = load_image(args.image) if args.image else None
    end = load_image(args.end_image) if args.end_image else None
    mask = load_mask(args.mask) if args.mask else None
    init_video = load_clip(args.init_video, args.frames) if args.init_video else None
    bar = tqdm(total=None, desc="sampling", unit="step")

    def progress(i, total, x, x0):
        bar.total = total
        bar.update(1)

    camera = None if args.camera is None else Camera(args.camera, args.trace_extract_ratio, args.trace_scale,
                                                     args.cfg_camera)
    shot = Shot(args.frames, (args.height, args.width), args.fs, args.seed, args.loop, end, args.framing)
    motion = Motion(mask, args.mask_feather, init_video, args.strength, args.motion, args.prompt_schedule, camera)
    video = animate(dc, image, args.prompt, negative_prompt=args.negative_prompt, shot=shot, motion=motion,
                    callback=progress, **cli_settings(args, dc.variant))
    bar.close()
    if args.loop:   # the last frame duplicates the first
        video = video[:, :, :-1]
    path = save_video(video[0], args.out, fps=args.save_fps)
    print(f"wrote {path} ({video.shape[2]} frames, {video.shape[-1]}x{video.shape[-2]}) in {time.time() - t0:.1f}s")
    return 0


def load_mask(path) -> torch.Tensor:
    """A mask image -> (H, W) in [0, 1] (its grey level; white = 1)."""
    from .video import load_image
    return (load_image(path)[0].mean(0) + 1) / 2


def load_clip(path, frames=None) -> torch.Tensor:
    """A video file -> (1, 3, T, H, W) in [-1, 1] (its first `frames` frames when given)."""
    from .video import read_video
    arr = torch.from_numpy(read_video(path))[:frames]
    return (arr.permute(3, 0, 1, 2)[None].float() / 255.0 * 2 - 1)


if __name__ == "__main__":
    sys.exit(main())
