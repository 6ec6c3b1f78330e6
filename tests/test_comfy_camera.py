"""CamI2V in the real ComfyUI executor: the loader loads the tiny CamI2V, 'DynamiCrafter Camera' attaches a
camera move, and our DDIM node (with camera CFG) and the core KSampler sample with it. The DDIM node equals
the library's sample_ddim with the same camera."""
from __future__ import annotations

import sys

import pytest
import torch

import comfy_runtime

REPO = comfy_runtime.REPO_ROOT
sys.path.insert(0, str(REPO / "scripts"))
from comfy_workflow import load_workflow  # noqa: E402
from run_workflow import prepare_prompt, video_outputs  # noqa: E402

CKPT = "cami2v_tiny.safetensors"
W, H, T, STEPS = 64, 64, 16, 2


@pytest.fixture(scope="module")
def cam_ref(comfy_reference):
    folder = comfy_reference / "tiny_cami2v"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("no tiny CamI2V checkpoint in the reference folder")
    return folder


def _with_camera(prompt, sampler_class, preset="orbit left", cfg_camera=None):
    sid = next(k for k, v in prompt.items() if v["class_type"] == sampler_class)
    s = prompt[sid]["inputs"]
    prompt["cam"] = {"class_type": "DynamiCrafterCamera",
                     "inputs": {"positive": s["positive"], "negative": s["negative"], "preset": preset,
                                "speed": 0.5, "strength": 1.0}}
    s["positive"], s["negative"] = ["cam", 0], ["cam", 1]
    if cfg_camera is not None:
        s["cfg_camera"] = cfg_camera
    return prompt


def _as_ksampler(prompt):
    """The template's SamplerCustomAdvanced + DualCFGGuider replaced by the core KSampler (same id)."""
    sid = next(k for k, v in prompt.items() if v["class_type"] == "SamplerCustomAdvanced")
    guider = prompt[prompt[sid]["inputs"]["guider"][0]]["inputs"]
    prompt[sid] = {"class_type": "KSampler", "inputs": {
        "model": guider["model"], "positive": guider["cond1"], "negative": guider["negative"],
        "latent_image": prompt[sid]["inputs"]["latent_image"], "seed": 3, "steps": STEPS, "cfg": 5.5,
        "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    return prompt


@pytest.mark.parametrize("workflow,sampler,cfg_camera", [
    ("DynamiCrafter image to video.json", "DynamiCrafterDDIMSampler", 2.0),
    ("DynamiCrafter with KSampler.json", "KSampler", None),
])
def test_camera_workflow_runs_in_the_executor(comfy, cam_ref, workflow, sampler, cfg_camera):
    wf = load_workflow(REPO / "workflows" / workflow)
    prompt = prepare_prompt(wf, comfy.node_classes, CKPT, ["single_image.png"], W, H, T, STEPS)
    if sampler == "KSampler":
        prompt = _as_ksampler(prompt)
    result = comfy.run(_with_camera(prompt, sampler, cfg_camera=cfg_camera))
    videos = video_outputs(result, comfy.output_dir)
    assert videos and videos[0].stat().st_size > 0, result["outputs"]


@pytest.fixture(scope="module")
def cam_loaded(comfy, cam_ref):
    from nodes_pack_access import pack
    return pack("loader").DynamiCrafterLoader.execute(CKPT, "fp32", "auto")


def test_ddim_node_with_camera_equals_library(comfy, cam_loaded, cam_ref):
    import comfy.sample as comfy_sample

    import dynamicrafter
    from dynamicrafter import camera as geometry
    from nodes_pack_access import load_input_image, pack
    model, clip, cv, vae = cam_loaded
    assert model.model.dc_model.variant["family"] == "cami2v"
    pos = comfy.nodes.CLIPTextEncode().encode(clip, "a fox")[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "")[0]
    image = load_input_image(cam_ref / "inputs" / "image.png")
    ctx = pack("resampler").resample_context(model, pack("clip_vision").encode_clip_vision(cv, image))
    video = pack("inputs").VideoSettings(W, H, T, 2)
    p, n, _, latent = pack("conditioning").build_conditioning(pos, neg, vae, ctx, image, video, 1, "image-to-video")
    p0, n0 = p, n
    p, n, preview = pack("camera").DynamiCrafterCamera.execute(p, n, "pan left", 0.5, 0.8)[:3]
    assert preview.shape == (1, 256, 256, 3) and preview.min() >= 0 and preview.max() <= 1
    seed = 5
    out = pack("sampler").DynamiCrafterDDIMSampler.execute(model, p, n, latent, seed, STEPS, 5.5, 0.0, 0.0, 0.7,
                                                           "auto", cfg_camera=2.0)[0]["samples"]
    dc = dynamicrafter.load_model(str(cam_ref / "model.safetensors"), config=str(cam_ref / "config.yaml"))
    cond = torch.cat([p[0][0], p[0][1]["dc_image_context"]], 1)
    uncond = torch.cat([n[0][0], n[0][1]["dc_image_context"]], 1)
    RT = geometry.resample_trajectory(geometry.preset_poses("pan left"), T, 0.5)[None]
    cam = dc.encode_camera(RT, geometry.intrinsics(H, W, frames=T), (H, W), 0.8,
                           generator=torch.Generator().manual_seed(seed))
    x_T = comfy_sample.prepare_noise(latent["samples"], seed)
    ref = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, concat=p[0][1]["concat_latent_image"] * dc.scale_factor,
                                    fs=2, steps=STEPS, cfg_text=5.5, eta=0.0, guidance_rescale=0.7,
                                    spacing="uniform_trailing", camera=cam, cfg_camera=2.0)
    ours = out * dc.scale_factor
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), float((ours - ref).abs().max())
    plain = pack("sampler").DynamiCrafterDDIMSampler.execute(model, p0, n0, latent, seed, STEPS, 5.5, 0.0, 0.0,
                                                             0.7, "auto")[0]["samples"]
    assert (plain - out).abs().max() > 1e-3      # the camera changes the video


def test_camera_node_errors(comfy, cam_loaded, cam_ref):
    from nodes_pack_access import pack
    p = [[torch.zeros(1, 77, 16), {}]]
    with pytest.raises(ValueError, match="not found"):
        pack("camera").DynamiCrafterCamera.execute(p, p, "orbit left", 1.0, 1.0, pose_file="missing.txt")
    with pytest.raises(ValueError, match="inside ComfyUI's input folder"):
        pack("camera").DynamiCrafterCamera.execute(p, p, "orbit left", 1.0, 1.0, pose_file="../../etc/passwd")


def test_camera_template_runs_on_the_tiny_cami2v(comfy, cam_ref):
    wf = load_workflow(REPO / "workflows" / "Camera moves.json")
    loader = next(n for n in wf["nodes"] if n["type"] == "DynamiCrafterLoader")
    assert {m["name"] for m in loader["properties"]["models"]} == {"256_cami2v.pt", "512_cami2v_100k.pt"}
    prompt = prepare_prompt(wf, comfy.node_classes, CKPT, ["single_image.png"], W, H, T, STEPS)
    assert any(v["class_type"] == "DynamiCrafterCamera" for v in prompt.values())
    videos = video_outputs(comfy.run(prompt), comfy.output_dir)
    assert videos and videos[0].stat().st_size > 0
