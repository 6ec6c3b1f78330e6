"""Issue #32: a new user who only has the bundled demo model picks it in the loader of any template
its family can serve and, changing nothing else, gets a correct video: the conditioning nodes'
width / height / frames / fs and the samplers' cfg_text default to 0, "the loaded model's own" (its
metadata), and core samplers take their cfg from Variant Defaults, so the templates written for the
released 320x512 checkpoints run at the demo model's 64x64 and its guidance (text-only cfg 2)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import comfy_runtime
from comfy_workflow import load_workflow, set_ui_widget, ui_to_api
from run_workflow import video_outputs

REPO = comfy_runtime.REPO_ROOT
WORKFLOWS = REPO / "workflows"
DEMO = REPO / "assets" / "demo" / "dynamicrafter_demo.safetensors"
DEMO_VARIANT = json.loads((REPO / "assets" / "demo" / "dynamicrafter_demo.json").read_text())["variant"]

# template -> (its first input file, frames of its video given the demo model's segment length T)
DEMO_SERVES = {
    "DynamiCrafter demo.json": ("example.png", lambda t: t),
    "DynamiCrafter image to video.json": ("example.png", lambda t: t),
    "DynamiCrafter seamless loop.json": ("example.png", lambda t: t - 1),      # trim auto: the repeated end
    "DynamiCrafter storytelling.json": ("scene1.png", lambda t: 3 * t),        # three scenes joined
    "DynamiCrafter long video.json": ("example.png", lambda t: 46),            # its total_frames
    "DynamiCrafter with KSampler.json": ("example.png", lambda t: t),
    "Long shot - context windows.json": ("example.png", lambda t: 64),         # its 64 frames in windows
    "Continue a clip.json": ("clip.mp4", lambda t: CLIP + t - 8),              # the clip, then t - overlap 8
    "Motion brush.json": ("example.png", lambda t: t),
    "Video to video.json": ("motion_clip.mp4", lambda t: t),
}
# why the demo model (DynamiCrafter image-to-video, its own 64x64 text and image towers) cannot serve these
DEMO_CANNOT = {
    "DynamiCrafter interpolation.json": "needs an interpolation model (512_interp): start..end in-betweening",
    "ToonCrafter in-betweening.json": "needs ToonCrafter (interpolation, its dual-reference decoder)",
    "Keyframes to one shot.json": "in-betweens keyframe pairs: an interpolation model",
    "VideoCrafter text to video.json": "text to video: a VideoCrafter model, no image input",
    "Camera moves.json": "needs a CamI2V model (camera-conditioned); tests/test_browser.py runs it on the tiny one",
    "Animate a generated image.json": "also needs an SD text-to-image checkpoint for the still",
}
CLIP = 16     # frames of assets/examples/clip.mp4
INPUTS = ["example.png", "examples/scene1.png", "examples/scene2.png", "examples/scene3.png", "examples/clip.mp4",
          "examples/motion_mask.png", "examples/motion_clip.mp4"]


def test_every_template_is_either_served_by_the_demo_model_or_says_why_not():
    assert set(DEMO_SERVES) | set(DEMO_CANNOT) == {p.name for p in WORKFLOWS.glob("*.json")}
    assert not set(DEMO_SERVES) & set(DEMO_CANNOT)


@pytest.fixture(scope="module")
def demo_inputs(comfy, comfy_base):
    if not DEMO.is_file():
        pytest.skip(f"{DEMO} not found (the demo model is built by training/; see README)")
    shutil.copyfile(DEMO, comfy_base / "models" / "checkpoints" / DEMO.name)
    for name in INPUTS:
        shutil.copyfile(REPO / "assets" / name, comfy.input_dir / name.split("/")[-1])
    return comfy


def read_video(path) -> np.ndarray:
    """(T, H, W, 3) floats in 0..255."""
    import av
    with av.open(str(path)) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]).astype(np.float64)


def first_input_frame(comfy, name: str, height: int, width: int) -> np.ndarray:
    """The template's input (a picture, or a clip's first frame) as the nodes fit it: covered and
    centre-cropped to the video size."""
    from nodes_pack_access import pack
    from PIL import Image
    if name.endswith(".mp4"):
        picture = read_video(comfy.input_dir / name)[0] / 255.0
    else:
        picture = np.asarray(Image.open(comfy.input_dir / name).convert("RGB"), dtype=np.float64) / 255.0
    image = torch.from_numpy(picture).float()[None]
    return pack("images").resize_center(image, width, height)[0].numpy().astype(np.float64) * 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.mark.parametrize("workflow", sorted(DEMO_SERVES))
def test_template_runs_on_the_demo_model_changing_only_the_checkpoint(demo_inputs, workflow):
    comfy = demo_inputs
    wf = load_workflow(WORKFLOWS / workflow)
    set_ui_widget(wf, "DynamiCrafterLoader", "ckpt_name", DEMO.name, comfy.node_classes)
    videos = video_outputs(comfy.run(ui_to_api(wf, comfy.node_classes)), comfy.output_dir)
    assert videos, workflow
    frames = read_video(videos[0])
    (height, width), t = DEMO_VARIANT["resolution"], DEMO_VARIANT["frames"]
    source, count = DEMO_SERVES[workflow]
    assert frames.shape == (count(t), height, width, 3), (workflow, frames.shape)
    # the video starts on the input (PSNR of an image coded as H.264 at this size: 20 dB and above)
    first = psnr(frames[0], first_input_frame(comfy, source, height, width))
    assert first > 18, (workflow, first)
    made = frames[CLIP:] if workflow == "Continue a clip.json" else frames      # what the model made
    # frames differ: a video, not a still (the 99th percentile: a motion brush moves a small region)
    motion = max(float(np.percentile(np.abs(f - made[0]).max(-1), 99)) for f in made[1:])
    assert motion > 10, (workflow, motion)
    print(f"{workflow}: {frames.shape[0]} frames {width}x{height}, first frame {first:.1f} dB, "
          f"largest change from it (99th pct) {motion:.1f}")
