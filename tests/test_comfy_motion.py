"""Directing the motion in the real ComfyUI executor with the tiny checkpoint: the DDIM node's
mask / denoise / motion inputs, DynamiCrafter Video Latent from core VAEEncode, core KSampler's
denoise on our MODEL, and Long Video's prompt schedule and mask (nodes/motion.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_comfy_long_shots import moving_square_clip, write_clip
from test_comfy_nodes import H, T, W, _i2v_inputs, loaded, tiny_prompt  # noqa: F401  (loaded: fixture)
from test_comfy_windows import latents  # noqa: F401  (fixture)


def node(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def half_mask_image(comfy) -> str:
    """single_image-sized PNG: black left half (hold), white right half (moves)."""
    from PIL import Image
    arr = np.zeros((H, W, 3), np.uint8)
    arr[:, W // 2:] = 255
    Image.fromarray(arr).save(comfy.input_dir / "half_mask.png")
    return "half_mask.png"


def with_mask(comfy, prompt: dict, target: str, feather: float | None = None) -> dict:
    prompt["700"] = {"class_type": "LoadImage", "inputs": {"image": half_mask_image(comfy)}}
    prompt["701"] = {"class_type": "ImageToMask", "inputs": {"image": ["700", 0], "channel": "red"}}
    t = node(prompt, target)
    prompt[t]["inputs"]["mask"] = ["701", 0]
    if feather is not None:
        prompt[t]["inputs"]["mask_feather"] = feather
    return prompt


def with_clip_latent(comfy, prompt: dict, frames: int = T) -> tuple[dict, np.ndarray]:
    """LoadVideo -> GetVideoComponents -> VAEEncode -> DynamiCrafter Video Latent as the DDIM latent_image."""
    clip = moving_square_clip(frames)
    name = write_clip(comfy, "motion_square.mp4", clip)
    loader = node(prompt, "DynamiCrafterLoader")
    prompt["710"] = {"class_type": "LoadVideo", "inputs": {"file": name}}
    prompt["711"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["710", 0]}}
    prompt["712"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["711", 0], "vae": [loader, 3]}}
    prompt["713"] = {"class_type": "DynamiCrafterVideoLatent", "inputs": {"frames": ["712", 0]}}
    return prompt, clip


# ------------------------------------------------------------------------------ inputs
def test_motion_inputs_are_optional_and_after_the_old_widgets(comfy):
    from comfy_workflow import widget_layout
    ddim = [w for w, _ in widget_layout(comfy.node_classes["DynamiCrafterDDIMSampler"])]
    assert ddim[-3:] == ["denoise", "mask_feather", "motion"] and ddim[-5:-3] == ["context_schedule", "cfg_camera"]
    lv = [w for w, _ in widget_layout(comfy.node_classes["DynamiCrafterLongVideo"])]
    assert lv[-2:] == ["method", "prompt_schedule"]
    for n in ("DynamiCrafterDDIMSampler", "DynamiCrafterLongVideo", "DynamiCrafterKeyframes"):
        types = comfy.node_classes[n].INPUT_TYPES()
        assert types["optional"]["mask"][0] == "MASK", n
        assert "mask" not in types["required"]
    tip = comfy.node_classes["DynamiCrafterDDIMSampler"].INPUT_TYPES()["optional"]["motion"][1]["tooltip"]
    assert "motion amount" in tip and "1 = the model's own" in tip


def test_ddim_node_defaults_are_todays_sampler_bit_for_bit(comfy, loaded, comfy_reference):  # noqa: F811
    from nodes_pack_access import pack
    p, n, _, latent, *_ = _i2v_inputs(comfy, loaded, comfy_reference)
    run = pack("sampler").DynamiCrafterDDIMSampler.execute
    base = run(loaded[0], p, n, latent, 7, 3, 7.5, 0.0, 1.0, 0.7, "auto")[0]["samples"]
    same = run(loaded[0], p, n, latent, 7, 3, 7.5, 0.0, 1.0, 0.7, "auto", denoise=1.0, motion=1.0,
               mask_feather=2.0)[0]["samples"]
    assert torch.equal(base, same)
    still = run(loaded[0], p, n, latent, 7, 3, 7.5, 0.0, 1.0, 0.7, "auto", motion=0.0)[0]["samples"]
    concat = p[0][1]["concat_latent_image"]
    assert torch.allclose(still, concat[:, :, :1].expand_as(still), atol=1e-6)   # m = 0: the image on every frame


def test_ddim_node_mask_holds_the_image_latent_outside(comfy, loaded, comfy_reference):  # noqa: F811
    from nodes_pack_access import pack
    p, n, _, latent, *_ = _i2v_inputs(comfy, loaded, comfy_reference)
    mask = torch.zeros(1, H, W)
    mask[:, :, W // 2:] = 1
    run = pack("sampler").DynamiCrafterDDIMSampler.execute
    out = run(loaded[0], p, n, latent, 7, 3, 7.5, 0.0, 1.0, 0.7, "auto", mask=mask, mask_feather=0.0)[0]["samples"]
    free = run(loaded[0], p, n, latent, 7, 3, 7.5, 0.0, 1.0, 0.7, "auto")[0]["samples"]
    held = p[0][1]["concat_latent_image"][:, :, :1].expand_as(out)
    w = out.shape[-1] // 2
    assert torch.allclose(out[..., :w], held[..., :w], atol=1e-6)       # final: the image latent
    assert not torch.allclose(out[..., w:], held[..., w:], atol=1e-3)
    assert not torch.allclose(out[..., w:], free[..., w:], atol=1e-4)   # the moving half sees the held one


def test_motion_brush_graph_runs_with_a_core_mask(comfy, latents):   # noqa: F811
    prompt = with_mask(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json"), "DynamiCrafterDDIMSampler",
                       feather=0.0)
    comfy.run(prompt)
    out = latents[-1]
    left = out[..., : out.shape[-1] // 2]
    assert torch.allclose(left, left[:, :, :1].expand_as(left), atol=1e-6)   # held: the same on every frame
    right = out[..., out.shape[-1] // 2:]
    assert (right[:, :, 1:] - right[:, :, :1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------ video to video
def test_ddim_denoise_lower_stays_nearer_the_clip(comfy, latents):   # noqa: F811
    out = {}
    for denoise in (0.0, 0.2, 1.0):
        prompt, clip = with_clip_latent(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json", steps=10))
        d = node(prompt, "DynamiCrafterDDIMSampler")
        prompt[d]["inputs"]["latent_image"] = ["713", 0]
        prompt[d]["inputs"]["denoise"] = denoise
        comfy.run(prompt)
        out[denoise] = latents[-1]
    # latent distances (the tiny model's random VAE and UNet make pixels meaningless; the demo model's
    # PSNR vs strength is in benchmarks/bench_motion.py)
    d_low, d_full = [float((out[s] - out[0.0]).pow(2).mean()) for s in (0.2, 1.0)]
    assert 0 < d_low < d_full / 2, (d_low, d_full)


def test_ddim_denoise_zero_is_the_encoded_clip(comfy, latents, monkeypatch):   # noqa: F811
    from nodes_pack_access import pack
    prompt, _ = with_clip_latent(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json"))
    d = node(prompt, "DynamiCrafterDDIMSampler")
    prompt[d]["inputs"]["latent_image"] = ["713", 0]
    prompt[d]["inputs"]["denoise"] = 0.0
    seen = []
    cls = pack("motion").DynamiCrafterVideoLatent
    original = cls.execute.__func__

    def execute(c, frames):
        out = original(c, frames)
        seen.append(out.args[0]["samples"].clone())
        return out
    monkeypatch.setattr(cls, "execute", classmethod(execute))
    comfy.run(prompt)
    assert seen and seen[0].shape == (1, 4, T, H // 8, W // 8)
    assert torch.allclose(latents[-1], seen[0], atol=1e-6)   # denoise 0: the clip's latent (x scale / scale)


def test_video_latent_node_layout_and_errors(comfy):
    from nodes_pack_access import pack
    mod = pack("motion")
    frames = torch.randn(T, 4, 8, 16)
    out = mod.video_latent(frames)
    assert out.shape == (1, 4, T, 8, 16) and torch.equal(out[0, :, 3], frames[3])
    assert mod.video_latent(out) is out
    with pytest.raises(ValueError, match="VAEEncode"):
        mod.video_latent(torch.zeros(4, 8, 16))


def test_core_ksampler_denoise_on_our_model(comfy, latents):   # noqa: F811
    """core KSampler with denoise < 1 starts from the clip's latent (DynamiCrafter Video Latent)."""
    out = {}
    for denoise in (0.0, 0.15, 1.0):
        prompt, clip = with_clip_latent(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json"))
        d = node(prompt, "DynamiCrafterDDIMSampler")
        inputs = prompt[d]["inputs"]
        if denoise == 0.0:         # the clip's latent, as our DDIM node returns it at denoise 0
            inputs.update(latent_image=["713", 0], denoise=0.0)
        else:
            prompt[d] = {"class_type": "KSampler", "inputs": {
                "model": inputs["model"], "positive": inputs["positive"], "negative": inputs["negative"],
                "latent_image": ["713", 0], "seed": 3, "steps": 4, "cfg": 3.0, "sampler_name": "ddim",
                "scheduler": "simple", "denoise": denoise}}
        comfy.run(prompt)
        out[denoise] = latents[-1]
    assert out[1.0].shape == out[0.0].shape == (1, 4, T, H // 8, W // 8)
    d_low, d_full = [float((out[s] - out[0.0]).pow(2).mean()) for s in (0.15, 1.0)]
    assert 0 < d_low < d_full * 0.75, (d_low, d_full)


# ------------------------------------------------------------------------------ long video
def test_long_video_prompt_schedule_and_mask(comfy, monkeypatch):
    import dynamicrafter.sampling.ddim as sampling
    texts = []
    real = sampling.window_guided_output

    def recording(dc, x, t, contexts, cond, *a, **kw):
        texts.append(cond.window_contexts)
        return real(dc, x, t, contexts, cond, *a, **kw)
    monkeypatch.setattr(sampling, "window_guided_output", recording)
    base = ["DynamiCrafterLongVideo.total_frames=12", "DynamiCrafterLongVideo.method=windows"]
    prompt = tiny_prompt(comfy, "DynamiCrafter long video.json", frames=8, steps=2, sets=base)
    lv = node(prompt, "DynamiCrafterLongVideo")
    clip_node = node(prompt, "DynamiCrafterLoader")
    prompt[lv]["inputs"]["prompt_schedule"] = "0: a boat on a calm lake | 11: a storm rises"
    prompt[lv]["inputs"]["clip"] = [clip_node, 1]
    with_mask(comfy, prompt, "DynamiCrafterLongVideo")
    comfy.run(prompt)
    assert texts and all(t is not None for t in texts)
    del prompt[lv]["inputs"]["clip"]
    import comfy_runtime
    with pytest.raises(comfy_runtime.PromptFailed, match="prompt_schedule needs the clip input"):
        comfy.run(prompt)


# ------------------------------------------------------------------------------ Hold Image (pixels)
@pytest.fixture
def held(comfy, monkeypatch):
    """Each run's DynamiCrafter Hold Image inputs and output, and the VAE the decode node was given."""
    from nodes_pack_access import pack
    hold, decode = pack("motion").DynamiCrafterHoldImage, pack("decode").DynamiCrafterVideoDecode
    seen = {"runs": []}
    hold_run, decode_run = hold.execute.__func__, decode.execute.__func__

    def hold_execute(c, images, start_image, mask, mask_feather):
        out = hold_run(c, images, start_image, mask, mask_feather)
        seen["runs"].append((images.clone(), start_image.clone(), mask.clone(), mask_feather, out[0].clone()))
        return out

    def decode_execute(c, vae, latent, *args, **kwargs):
        seen["vae"] = vae
        return decode_run(c, vae, latent, *args, **kwargs)
    monkeypatch.setattr(hold, "execute", classmethod(hold_execute))
    monkeypatch.setattr(decode, "execute", classmethod(decode_execute))
    return seen


def check_held_pixels(run, vae) -> None:
    """Hold Image's output is the library's paste-back of the decoded frames and the start image, and the
    held part stays within the VAE's own reconstruction error of the start image (core VAE round trip)."""
    from dynamicrafter.sampling.motion import pixel_mask
    frames, start, mask, feather, out = run
    t, h, w, _ = frames.shape
    image = start[:1, ..., :3]
    assert image.shape[1:3] == (h, w)
    m = pixel_mask(mask[0] if mask.ndim == 3 else mask, t, h, w, feather)[0, 0][..., None]     # (T, H, W, 1)
    assert torch.allclose(out, m * frames + (1 - m) * image, atol=1e-6)
    hold = m[0, ..., 0] == 0
    assert hold.any() and torch.equal(out[:, hold], image[:, hold].expand(t, -1, -1))   # mask 0: the image itself
    with torch.inference_mode():
        round_trip = vae.decode(vae.encode(image))[..., :3].float().to(out)
    held = (mask[0] if mask.ndim == 3 else mask) == 0
    err, vae_err, decoded = [float((v[:, held] - image[:, held]).abs().mean()) for v in (out, round_trip, frames)]
    assert err < vae_err and err < decoded, (err, vae_err, decoded)


def test_hold_image_node_pastes_the_start_image_back_in_the_executor(comfy, held):
    """The tiny model's i2v graph with a half mask on the sampler and Hold Image after the decode."""
    prompt = with_mask(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json"), "DynamiCrafterDDIMSampler",
                       feather=0.5)
    dec = node(prompt, "DynamiCrafterVideoDecode")
    start = next(v["inputs"]["start_image"] for v in prompt.values()
                 if v["class_type"] == "DynamiCrafterImageConditioning")
    prompt["720"] = {"class_type": "DynamiCrafterHoldImage",
                     "inputs": {"images": [dec, 0], "start_image": start, "mask": ["701", 0], "mask_feather": 0.5}}
    for v in prompt.values():                     # the video is made of the held frames
        if v["class_type"] == "CreateVideo":
            v["inputs"]["images"] = ["720", 0]
    comfy.run(prompt)
    (run,) = held["runs"]
    assert run[3] == 0.5 and run[4].shape == run[0].shape == (T, H, W, 3)
    check_held_pixels(run, held["vae"])


def test_hold_image_errors_name_what_to_change():
    from nodes_pack_access import pack
    hold = pack("motion").hold_image
    frames, mask = torch.rand(4, 64, 64, 3), torch.zeros(1, 64, 64)
    with pytest.raises(ValueError, match="multiples of 8"):
        hold(torch.rand(4, 60, 64, 3), torch.rand(1, 60, 64, 3), mask, 1.0)
    with pytest.raises(ValueError, match="start_image contains 1 NaN"):
        bad = torch.rand(1, 64, 64, 3)
        bad[0, 0, 0, 0] = float("nan")
        hold(frames, bad, mask, 1.0)
    with pytest.raises(ValueError, match="motion_mask values must be in \\[0, 1\\]"):
        hold(frames, torch.rand(1, 64, 64, 3), mask + 2, 1.0)
    # a start image of another size is covered and centre-cropped to the frames, as the conditioning does
    wide = torch.rand(1, 64, 128, 3)
    assert torch.allclose(hold(frames, wide, mask, 0.0), wide[:, :, 32:96].expand(4, -1, -1, -1))


# ------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("workflow", ["Motion brush.json", "Video to video.json"])
def test_motion_templates_run_as_shipped_on_the_demo_model(comfy, comfy_base, latents, held, workflow):  # noqa: F811
    """The two templates unchanged, with the files their notes name in place (the bundled demo model,
    assets/example.png, assets/examples/motion_mask.png / motion_clip.mp4)."""
    import shutil

    import comfy_runtime
    from comfy_workflow import load_workflow, ui_to_api
    from test_comfy_nodes import WORKFLOWS, run_and_get_video
    repo = comfy_runtime.REPO_ROOT
    demo = repo / "assets" / "demo" / "dynamicrafter_demo.safetensors"
    if not demo.is_file():
        pytest.skip(f"{demo} not found (the demo model is built by training/; see README)")
    shutil.copyfile(demo, comfy_base / "models" / "checkpoints" / demo.name)
    shutil.copyfile(repo / "assets" / "example.png", comfy.input_dir / "example.png")
    for name in ("motion_mask.png", "motion_clip.mp4"):
        shutil.copyfile(repo / "assets" / "examples" / name, comfy.input_dir / name)
    api = ui_to_api(load_workflow(WORKFLOWS / workflow), comfy.node_classes)
    sampler = next(n["inputs"] for n in api.values() if n["class_type"] == "DynamiCrafterDDIMSampler")
    run_and_get_video(comfy, api)
    out = latents[-1]
    if workflow == "Motion brush.json":
        assert "mask" in sampler
        # black in motion_mask.png, beyond the soft edge (mask_feather 1: a 5-wide Gaussian): held on every frame
        from PIL import Image
        painted = torch.from_numpy(np.asarray(Image.open(comfy.input_dir / "motion_mask.png").convert("L")) > 127)
        moves = painted[::8, ::8][None, None].float()                   # the latent grid (1/8 size)
        near = torch.nn.functional.max_pool2d(moves, 5, stride=1, padding=2)[0, 0] > 0   # within 2 of a moving cell
        assert (~near).any(), "the mask holds nothing beyond its soft edge"
        held_cells = out[..., ~near]
        assert torch.allclose(held_cells, held_cells[:, :, :1].expand_as(held_cells), atol=1e-6)
        # and after decoding, Hold Image pastes the start image's pixels back there
        (run,) = held["runs"]
        assert run[3] == sampler["mask_feather"] == 1.0
        check_held_pixels(run, held["vae"])
    else:
        assert sampler["denoise"] == 0.6 and out.shape == (1, 4, 16, 8, 8)
