"""ToonCrafter and the keyframe node in the real ComfyUI executor, with the tiny ToonCrafter
checkpoint: the loader's dual-reference VAE, references carried by the conditioning's latent,
our DDIM node (dual CFG) and core KSampler / SamplerCustomAdvanced, the decode node against the
library, the core VAEDecode fallback, and N keyframes joined without repeated frames."""
from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch

import comfy_runtime

REPO = comfy_runtime.REPO_ROOT
sys.path.insert(0, str(REPO / "scripts"))
from comfy_workflow import load_workflow  # noqa: E402
from run_workflow import prepare_prompt, video_outputs  # noqa: E402

TOON = "toon_tiny.safetensors"
W, H, T, STEPS = 128, 64, 8, 2
IMAGES = ["toon_a_first.png", "toon_b_last.png"]


@pytest.fixture(scope="module")
def toon_ref(comfy_reference):
    if not (comfy_reference / "tiny_toon" / "model.safetensors").is_file():
        pytest.skip("no tiny ToonCrafter checkpoint in the reference folder")
    return comfy_reference / "tiny_toon"


@pytest.fixture(scope="module")
def toon_loaded(comfy, toon_ref):
    from nodes_pack_access import pack
    return pack("loader").DynamiCrafterLoader.execute(TOON, "fp32", "auto")


@pytest.fixture(scope="module")
def toon_lib(toon_ref):
    import dynamicrafter
    # as the ComfyUI loader loads it: with the official YAML that the test base puts beside it
    return dynamicrafter.load_model(str(toon_ref / "model.safetensors"), config=str(toon_ref / "config.yaml"))


def _count_frames(path) -> int:
    import av
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def _prompt(comfy, workflow="ToonCrafter in-betweening.json", images=IMAGES, **kw):
    wf = load_workflow(REPO / "workflows" / workflow)
    return prepare_prompt(wf, comfy.node_classes, TOON, list(images), W, H, kw.pop("frames", T),
                          kw.pop("steps", STEPS), kw.pop("sets", None))


def _run_video(comfy, prompt):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = comfy.run(prompt)
    videos = video_outputs(result, comfy.output_dir)
    assert videos and videos[0].stat().st_size > 0, result["outputs"]
    fallback = [w for w in caught if "without references" in str(w.message)]
    return _count_frames(videos[0]), fallback


def _inputs(comfy, loaded, toon_ref, frames=T):
    from nodes_pack_access import load_input_image, pack
    model, clip, cv, vae = loaded
    pos = comfy.nodes.CLIPTextEncode().encode(clip, "a girl turns her head")[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "")[0]
    first = load_input_image(toon_ref / "inputs" / "a_first.png")
    last = load_input_image(toon_ref / "inputs" / "b_last.png")
    ctx = pack("resampler").resample_context(model, pack("clip_vision").encode_clip_vision(cv, first))
    video = pack("inputs").VideoSettings(W, H, frames, 10)
    p, n, io, latent = pack("conditioning").build_conditioning(pos, neg, vae, ctx, first, video, 1, "interpolation",
                                                               last)
    return p, n, io, latent, first, last


def test_loader_reads_the_inference_yaml_beside_the_checkpoint(comfy, toon_loaded, toon_ref):
    """The tiny ToonCrafter's text tower has 2 heads of width 8, which shapes cannot tell: with its
    official YAML beside the file (`toon_tiny.yaml`) the loader's CLIP encodes the prompt exactly as
    the official code did; the same file without the YAML is read with the default head width."""
    from conftest import assert_close_to_ref, load_reference
    from nodes_pack_access import pack
    _, ref, manifest = load_reference("tiny_toon")
    clip = toon_loaded[1]
    cond = comfy.nodes.CLIPTextEncode().encode(clip, manifest["prompt"])[0][0][0]
    assert_close_to_ref(cond, ref["text.prompt_emb"], name="prompt embedding through ComfyUI's CLIP")
    loader = pack("loader")
    assert loader.inference_config_beside(str(comfy.base_dir / "models" / "checkpoints" / TOON))["text_heads"] == 2
    assert loader.inference_config_beside(
        str(comfy.base_dir / "models" / "checkpoints" / "dc_tiny_v.safetensors")) is None


def test_loader_vae_is_the_reference_decoder_and_conditioning_carries_references(comfy, toon_loaded, toon_ref,
                                                                                  toon_lib):
    from nodes_pack_access import pack
    tv = pack("tooncrafter_vae")
    vae = toon_loaded[3]
    assert tv.is_dualref_vae(vae) and toon_loaded[0].model.variant["name"] == "tooncrafter"
    p, n, io, latent, first, last = _inputs(comfy, toon_loaded, toon_ref)
    refs = latent[tv.REFERENCES_KEY]
    with torch.no_grad():
        expected = toon_lib.encode_references(first.movedim(-1, 1) * 2 - 1, last.movedim(-1, 1) * 2 - 1)
    assert len(refs) == len(expected) == 5
    for r, e in zip(refs, expected):
        assert torch.allclose(r, e, atol=1e-5), float((r - e).abs().max())
    # the start/end latents in the concat are the VAE's posterior means, like any ComfyUI VAE
    z = p[0][1]["concat_latent_image"]
    with torch.no_grad():
        mean = toon_lib.vae_moments(first.movedim(-1, 1) * 2 - 1)[:, :4]
    assert torch.allclose(z[:, :, 0], mean, atol=1e-5)


def test_ddim_dual_cfg_then_decode_node_equals_library(comfy, toon_loaded, toon_ref, toon_lib):
    """Our DDIM node (dual CFG) + our decode node = the library's sampling and the official
    decode with references and the middle-frame re-decode."""
    import comfy.sample as comfy_sample

    import dynamicrafter
    from dynamicrafter.models.tooncrafter import decode_keyframe_clip
    from nodes_pack_access import pack
    model, _, _, vae = toon_loaded
    p, n, io, latent, first, last = _inputs(comfy, toon_loaded, toon_ref)
    out = pack("sampler").DynamiCrafterDDIMSampler.execute(model, p, n, latent, 5, 3, 7.5, 1.5, 0.0, 0.7, "auto")[0]
    assert pack("tooncrafter_vae").REFERENCES_KEY in out        # the sampler keeps the references
    dc = toon_lib
    cond = torch.cat([p[0][0], p[0][1]["dc_image_context"]], 1)
    uncond = torch.cat([n[0][0], n[0][1]["dc_image_context"]], 1)
    with torch.no_grad():
        ref = dynamicrafter.sample_ddim(dc, comfy_sample.prepare_noise(latent["samples"], 5), cond, uncond,
                                        concat=p[0][1]["concat_latent_image"] * dc.scale_factor, fs=10, steps=3,
                                        cfg_text=7.5, cfg_img=1.5, guidance_rescale=0.7)
    assert torch.allclose(out["samples"] * dc.scale_factor, ref, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without references")   # decoded with the references
        frames = pack("decode").decode_video(vae, out, 4, "auto")
    assert frames.shape == (T, H, W, 3)
    refs = [r for r in out[pack("tooncrafter_vae").REFERENCES_KEY]]
    with torch.no_grad():
        video = decode_keyframe_clip(dc, out["samples"] * dc.scale_factor, refs)
    expected = ((video[0].clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)
    assert torch.allclose(frames, expected, atol=1e-5), float((frames - expected).abs().max())


def test_workflow_with_our_ddim_node(comfy, toon_ref):
    frames, fallback = _run_video(comfy, _prompt(comfy, sets=["DynamiCrafterDDIMSampler.cfg_img=1.5"]))
    assert frames == T and not fallback


def _swap_sampler(prompt: dict, core: str) -> dict:
    """The workflow with our DDIM node replaced by core KSampler or SamplerCustomAdvanced + DualCFGGuider."""
    prompt = copy.deepcopy(prompt)
    sid = next(k for k, v in prompt.items() if v["class_type"] == "DynamiCrafterDDIMSampler")
    ddim = prompt[sid]["inputs"]
    if core == "KSampler":
        prompt[sid] = {"class_type": "KSampler", "inputs": {
            "model": ddim["model"], "positive": ddim["positive"], "negative": ddim["negative"],
            "latent_image": ddim["latent_image"], "seed": 3, "steps": STEPS, "cfg": 7.5, "sampler_name": "ddim",
            "scheduler": "simple", "denoise": 1.0}}
        return prompt
    cond = ddim["positive"][0]
    prompt["g1"] = {"class_type": "DualCFGGuider", "inputs": {
        "model": ddim["model"], "cond1": [cond, 0], "cond2": [cond, 2], "negative": [cond, 1],
        "cfg_conds": 7.5, "cfg_cond2_negative": 1.5, "style": "regular"}}
    prompt["g2"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    prompt["g3"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt["g4"] = {"class_type": "BasicScheduler", "inputs": {"model": ddim["model"], "scheduler": "simple",
                                                                "steps": STEPS, "denoise": 1.0}}
    prompt[sid] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["g2", 0], "guider": ["g1", 0], "sampler": ["g3", 0], "sigmas": ["g4", 0],
        "latent_image": ddim["latent_image"]}}
    return prompt


@pytest.mark.parametrize("core", ["KSampler", "SamplerCustomAdvanced"])
def test_workflow_under_core_samplers(comfy, toon_ref, core):
    frames, fallback = _run_video(comfy, _swap_sampler(_prompt(comfy), core))
    assert frames == T and not fallback      # the core samplers keep the latent's references


def test_core_vae_decode_falls_back_to_the_plain_decoder(comfy, toon_ref):
    prompt = _prompt(comfy)
    did = next(k for k, v in prompt.items() if v["class_type"] == "DynamiCrafterVideoDecode")
    dec = prompt[did]["inputs"]
    prompt[did] = {"class_type": "VAEDecode", "inputs": {"samples": dec["latent"], "vae": dec["vae"]}}
    frames, fallback = _run_video(comfy, prompt)
    assert frames == T and fallback


# ------------------------------------------------------------------------------ keyframes
def test_pair_prompts_lines():
    from nodes_pack_access import pack
    kf = pack("keyframes")
    assert kf.pair_prompts("", 2) == [None, None]
    assert kf.pair_prompts("walk\n\n", 3) == ["walk", None, None]
    assert kf.pair_prompts("a\n\nc", 3) == ["a", None, "c"]
    with pytest.raises(ValueError, match="at most one line per pair"):
        kf.pair_prompts("a\nb\nc", 2)


def test_keyframe_workflow_joins_pairs_without_repeated_frames(comfy, toon_ref):
    images = IMAGES + ["toon_a_first.png"]
    frames, fallback = _run_video(comfy, _prompt(comfy, "Keyframes to one shot.json", images))
    assert frames == 1 + 2 * (T - 1) and not fallback


def test_keyframe_node_is_the_pairs_joined(comfy, toon_loaded, toon_ref):
    """3 keyframes = pair 1 (all its frames) + pair 2 without its first frame (keyframe 2 again)."""
    from nodes_pack_access import load_input_image, pack
    model, clip, cv, vae = toon_loaded
    kf = pack("keyframes")
    pos = comfy.nodes.CLIPTextEncode().encode(clip, "a girl turns her head")[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "")[0]
    a = load_input_image(toon_ref / "inputs" / "a_first.png")
    b = load_input_image(toon_ref / "inputs" / "b_last.png")
    keys = torch.cat([a, b, a.flip(2)])
    inputs = pack("inputs")
    pipe, video = inputs.Pipeline(model, cv, vae, pos, neg), inputs.VideoSettings(W, H, T, 10)
    settings = inputs.SamplerSettings.of(7, STEPS, 7.5, 0.0, 0.0, 0.7, "auto")
    args = (video, settings)
    whole = kf.keyframe_video(pipe, keys, *args, clip=clip, prompts="\nshe turns back")
    first = kf.keyframe_video(pipe, keys[:2], *args)
    second = kf.keyframe_video(inputs.Pipeline(model, cv, vae, kf.encode_prompt(clip, "she turns back"), neg),
                               keys[1:], video, settings.shifted(1))
    assert whole.shape == (1 + 2 * (T - 1), H, W, 3)
    assert torch.equal(whole[:T], first) and torch.equal(whole[T:], second[1:])
    for j in (T - 1, 2 * (T - 1)):   # consecutive frames around each join are distinct frames
        assert (whole[j] - whole[j - 1]).abs().max() > 0
    with pytest.raises(ValueError, match="2..64 images"):
        kf.keyframe_video(pipe, keys[:1], *args)
    with pytest.raises(ValueError, match="needs the clip input"):
        kf.keyframe_video(pipe, keys, *args, prompts="x")


def test_new_workflows_carry_model_download_metadata():
    import json
    for name, files in (("ToonCrafter in-betweening.json", {"tooncrafter_512_interp.ckpt"}),
                        ("Keyframes to one shot.json", {"tooncrafter_512_interp.ckpt"})):   # one loader, one file
        wf = json.loads((REPO / "workflows" / name).read_text())
        assert {m["name"] for m in wf["models"]} == files
        assert all(m["url"].startswith("https://huggingface.co/") and m["directory"] == "checkpoints"
                   for m in wf["models"])
        loader = next(n for n in wf["nodes"] if n["type"] == "DynamiCrafterLoader")
        assert loader["widgets_values"][0] in {m["name"] for m in loader["properties"]["models"]}
