"""The node pack inside a real ComfyUI 0.3.75 executor (in this process), with the tiny
reference checkpoint: registration, every bundled workflow end to end, exactness of the DDIM
node against the library, progress/previews, interrupt, and clear errors for bad input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import comfy_runtime

REPO = comfy_runtime.REPO_ROOT
sys.path.insert(0, str(REPO / "scripts"))
from comfy_workflow import load_workflow, ui_to_api, widget_layout  # noqa: E402
from run_workflow import prepare_prompt, video_outputs  # noqa: E402

W, H, T, STEPS = 128, 64, 8, 3
EXPECTED_NODES = {
    "DynamiCrafterLoader", "DynamiCrafterCLIPVisionEncode", "DynamiCrafterContextResampler",
    "DynamiCrafterImageConditioning", "DynamiCrafterDDIMSampler", "DynamiCrafterVideoDecode",
    "DynamiCrafterVariantDefaults", "DynamiCrafterLongVideo", "DynamiCrafterTextToVideoLatent",
    "DynamiCrafterCamera", "DynamiCrafterHoldImage",
}
WORKFLOWS = REPO / "workflows"


def count_frames(path: Path) -> int:
    import av
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def tiny_prompt(comfy, workflow: str, images=("single_image.png",), ckpt="dc_tiny_v.safetensors", **kw):
    wf = load_workflow(WORKFLOWS / workflow)
    return prepare_prompt(wf, comfy.node_classes, ckpt, list(images), W, H, kw.pop("frames", T),
                          kw.pop("steps", STEPS), kw.pop("sets", None))


def run_and_get_video(comfy, prompt) -> Path:
    result = comfy.run(prompt)
    videos = video_outputs(result, comfy.output_dir)
    assert videos, f"no video saved: {result['outputs']}"
    assert videos[0].is_file() and videos[0].stat().st_size > 0
    return videos[0]


# ------------------------------------------------------------------------------ registration
def test_pack_registers_every_node(comfy):
    names = set(comfy.node_classes)
    assert EXPECTED_NODES <= names, f"missing: {EXPECTED_NODES - names}"
    import nodes as comfy_nodes   # ComfyUI's module, not ours
    assert Path(comfy_nodes.__file__).parent == comfy_runtime.comfy_dir()
    for n in EXPECTED_NODES:   # the pack's name in every title (some lead with what users search for)
        assert "DynamiCrafter" in comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS.get(n, "")
        assert comfy.node_classes[n].CATEGORY == "DynamiCrafter"


def test_widget_order_is_stable(comfy):
    """Saved workflows depend on widget order: changing it breaks users' graphs."""
    layouts = {n: [w for w, _ in widget_layout(comfy.node_classes[n])] for n in sorted(EXPECTED_NODES)}
    assert layouts["DynamiCrafterLoader"] == ["ckpt_name", "dtype", "variant"]
    assert layouts["DynamiCrafterImageConditioning"] == ["width", "height", "frames", "batch_size", "fs", "mode"]
    assert layouts["DynamiCrafterDDIMSampler"] == ["seed", "steps", "cfg_text", "cfg_img", "eta",
                                                   "guidance_rescale", "spacing", "solver", "context_window",
                                                   "context_overlap", "context_schedule", "cfg_camera", "denoise",
                                                   "mask_feather", "motion"]
    assert layouts["DynamiCrafterVideoDecode"] == ["frames_per_batch", "trim", "tiling"]
    assert layouts["DynamiCrafterHoldImage"] == ["mask_feather"]
    assert layouts["DynamiCrafterLongVideo"] == ["width", "height", "total_frames", "segment_frames", "fs", "seed",
                                                 "steps", "cfg_text", "cfg_img", "eta", "guidance_rescale",
                                                 "spacing", "method", "prompt_schedule"]
    assert layouts["DynamiCrafterTextToVideoLatent"] == ["width", "height", "frames", "batch_size", "fs"]
    assert layouts["DynamiCrafterCamera"] == ["preset", "speed", "strength", "pan_right", "pan_down", "zoom", "orbit",
                                              "pose_file"]
    for n in ("DynamiCrafterCLIPVisionEncode", "DynamiCrafterContextResampler", "DynamiCrafterVariantDefaults"):
        assert layouts[n] == [], n


def test_nodes_use_the_v3_schema_with_descriptions(comfy):
    """V3 nodes (comfy_api, registered through comfy_entrypoint); each explains itself in the UI."""
    from comfy_api.latest import io
    for n in sorted(EXPECTED_NODES):
        cls = comfy.node_classes[n]
        assert issubclass(cls, io.ComfyNode), n
        assert len(cls.DESCRIPTION) > 40, n
    for n in ("DynamiCrafterImageConditioning", "DynamiCrafterLongVideo", "DynamiCrafterTextToVideoLatent"):
        types = comfy.node_classes[n].INPUT_TYPES()["required"]
        assert "multiple of 64" in types["width"][1]["tooltip"] and "multiple of 64" in types["height"][1]["tooltip"]


# ------------------------------------------------------------------------------ workflows
@pytest.mark.parametrize("workflow,images,frames_out", [
    ("DynamiCrafter image to video.json", ["single_image.png"], T),
    ("DynamiCrafter interpolation.json", ["interp_a_first.png", "interp_b_last.png"], T),
    ("DynamiCrafter seamless loop.json", ["single_image.png"], T - 1),
    ("DynamiCrafter storytelling.json", ["single_image.png", "interp_a_first.png", "interp_b_last.png"], 3 * T),
    ("DynamiCrafter with KSampler.json", ["single_image.png"], T),
])
def test_bundled_workflow_runs_end_to_end(comfy, workflow, images, frames_out):
    video = run_and_get_video(comfy, tiny_prompt(comfy, workflow, images))
    assert count_frames(video) == frames_out


def test_long_video_workflow_chains_segments(comfy):
    prompt = tiny_prompt(comfy, "DynamiCrafter long video.json", frames=4, steps=2,
                         sets=["DynamiCrafterLongVideo.total_frames=10", "DynamiCrafterLongVideo.method=chained"])
    video = run_and_get_video(comfy, prompt)
    assert count_frames(video) == 10      # 4 + 3 + 3 frames from three chained segments


def test_text_to_video_workflow_runs(comfy, comfy_reference):
    if not (comfy_reference / "tiny_vc2" / "model.safetensors").is_file():
        pytest.skip("no tiny VideoCrafter2 checkpoint in the reference folder")
    video = run_and_get_video(comfy, tiny_prompt(comfy, "VideoCrafter text to video.json", [],
                                                 ckpt="vc2_tiny.safetensors", steps=4))
    assert count_frames(video) == T


def test_text_to_video_checkpoint_in_the_image_graph_names_the_right_template(comfy, comfy_reference):
    if not (comfy_reference / "tiny_vc2" / "model.safetensors").is_file():
        pytest.skip("no tiny VideoCrafter2 checkpoint in the reference folder")
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json", ckpt="vc2_tiny.safetensors")
    with pytest.raises(comfy_runtime.PromptFailed, match="text-to-video.*VideoCrafter text to video"):
        comfy.run(prompt)


def test_demo_template_runs_as_shipped_on_the_demo_model(comfy, comfy_base):
    """workflows/DynamiCrafter demo.json unchanged (no widget touched), with the files its note
    names copied where it says: the bundled demo model and assets/example.png. The clip has the
    size and length the model was trained at (its metadata and its stage-3 config agree), and its
    first frame is the input: the red circle stays red where it is (the old demo painted it green)."""
    import shutil

    import av
    import numpy as np
    import yaml
    from PIL import Image
    from safetensors import safe_open
    demo = comfy_runtime.REPO_ROOT / "assets" / "demo" / "dynamicrafter_demo.safetensors"
    if not demo.is_file():
        pytest.skip(f"{demo} not found (the demo model is built by training/; see README)")
    shutil.copyfile(demo, comfy_base / "models" / "checkpoints" / demo.name)
    example = comfy_runtime.REPO_ROOT / "assets" / "example.png"
    shutil.copyfile(example, comfy.input_dir / "example.png")
    wf = load_workflow(WORKFLOWS / "DynamiCrafter demo.json")
    trained = yaml.safe_load((comfy_runtime.REPO_ROOT / "training" / "configs" / "demo_stage3.yaml").read_text())
    with safe_open(str(demo), "pt") as f:
        variant = json.loads(f.metadata()["dynamicrafter_config"])["variant"]
    api = ui_to_api(wf, comfy.node_classes)
    sampler = next(n["inputs"] for n in api.values() if n["class_type"] == "DynamiCrafterDDIMSampler")
    assert (sampler["cfg_text"], sampler["cfg_img"]) == (variant["cfg_text"], variant.get("cfg_img") or 0.0)
    video = run_and_get_video(comfy, api)
    with av.open(str(video)) as f:
        stream = f.streams.video[0]
        frames = [fr.to_ndarray(format="rgb24").astype(np.float64) for fr in f.decode(stream)]
    size = (stream.height, stream.width, len(frames))
    assert size == tuple(trained["data"][k] for k in ("height", "width", "frames")), size   # its training size
    assert size == (*variant["resolution"], variant["frames"]), (size, variant)              # and its defaults
    # the red circle's inner pixels, as training/demo/workflow_seeds.py measures the 16-seed check
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "workflow_seeds", comfy_runtime.REPO_ROOT / "training" / "demo" / "workflow_seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    image = np.asarray(Image.open(example).convert("RGB"), dtype=np.float64)
    assert seeds.inner_mask(image).sum() > 50                            # its pixels 4 px inside the outline
    psnr, colour_error = seeds.first_frame_scores(frames[0], image)
    # (seeds 0-15 in assets/demo/workflow_seeds.json: 23.8 dB and 7.0 at worst)
    assert psnr > 21 and colour_error < 40, (psnr, colour_error)


def test_text_to_image_then_animation_workflow_runs(comfy, comfy_base):
    """A core SD checkpoint -> KSampler -> VAEDecode -> our nodes, with a tiny SD 1.5-layout file."""
    from tiny_sd import write_tiny_sd15
    write_tiny_sd15(comfy_base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    prompt = tiny_prompt(comfy, "Animate a generated image.json", [],
                         sets=["CheckpointLoaderSimple.ckpt_name=tiny_sd15.safetensors"])
    video = run_and_get_video(comfy, prompt)
    assert count_frames(video) == T


def test_every_workflow_is_ui_format_with_notes():
    for path in sorted(WORKFLOWS.glob("*.json")):
        wf = json.loads(path.read_text())
        assert {"nodes", "links", "last_node_id", "last_link_id"} <= set(wf), path.name
        assert any(n["type"] == "Note" for n in wf["nodes"]), f"{path.name} has no note"
        ids = {n["id"] for n in wf["nodes"]}
        for link in wf["links"]:
            assert link[1] in ids and link[3] in ids, path.name
        assert all("pos" in n and "size" in n for n in wf["nodes"]), path.name


def test_templates_have_human_names_and_the_pack_category_is_translated():
    """The front end titles templates by file name: every bundled file name reads as a title, and
    locales/en/main.json (the category heading) is what make_workflows writes."""
    from make_workflows import WORKFLOWS as BUILT, template_translations
    assert {p.name for p in WORKFLOWS.glob("*.json")} == set(BUILT)
    for name in BUILT:
        assert " " in name and "_" not in name and name[0].isupper(), name
    shipped = json.loads((REPO / "locales" / "en" / "main.json").read_text())
    assert shipped == template_translations()
    assert shipped["templateWorkflows"]["category"][comfy_runtime.PACK_NAME] == "DynamiCrafter"


def test_example_inputs_named_by_the_workflows_are_shipped():
    """Every image or video a bundled workflow loads is in assets/ or assets/examples/."""
    shipped = ({p.name for p in (REPO / "assets").glob("*.png")}
               | {p.name for p in (REPO / "assets" / "examples").iterdir()})
    for path in sorted(WORKFLOWS.glob("*.json")):
        for n in json.loads(path.read_text())["nodes"]:
            if n["type"] in ("LoadImage", "LoadVideo"):
                assert n["widgets_values"][0] in shipped, (path.name, n["widgets_values"])


# ------------------------------------------------------------------------------ exactness
@pytest.fixture(scope="module")
def loaded(comfy, tiny_ckpt):
    from nodes_pack_access import pack
    model, clip, cv, vae = pack("loader").DynamiCrafterLoader.execute("dc_tiny_v.safetensors", "fp32", "auto")
    return model, clip, cv, vae


@pytest.fixture(scope="module")
def lib_model(tiny_ckpt):
    """The library's own model from the same file (never handed to ComfyUI, so never modified)."""
    import dynamicrafter
    return dynamicrafter.load_model(str(tiny_ckpt))


def _i2v_inputs(comfy, loaded, comfy_reference, mode="image-to-video"):
    from nodes_pack_access import pack, load_input_image
    model, clip, cv, vae = loaded
    core = comfy.nodes
    prompt = (comfy_reference / "tiny_v" / "inputs" / "single" / "prompt.txt").read_text().strip()
    pos = core.CLIPTextEncode().encode(clip, prompt)[0]
    neg = core.CLIPTextEncode().encode(clip, "")[0]
    image = load_input_image(comfy_reference / "tiny_v" / "inputs" / "single" / "image.png")
    tokens = pack("clip_vision").encode_clip_vision(cv, image)
    ctx = pack("resampler").resample_context(model, tokens)
    video = pack("inputs").VideoSettings(W, H, T, 24)
    p, n, io, latent = pack("conditioning").build_conditioning(pos, neg, vae, ctx, image, video, 1, mode)
    return p, n, io, latent, tokens, ctx, image, prompt


def test_ddim_node_equals_library_sample_ddim(comfy, loaded, tiny_ckpt, comfy_reference, lib_model):
    import comfy.sample as comfy_sample
    import dynamicrafter
    from nodes_pack_access import pack
    model = loaded[0]
    p, n, io, latent, *_ = _i2v_inputs(comfy, loaded, comfy_reference)
    seed, steps = 11, 4
    node_out = pack("sampler").DynamiCrafterDDIMSampler.execute(
        model, p, n, latent, seed, steps, 7.5, 1.5, 0.0, 0.7, "auto")[0]["samples"]

    dc = lib_model
    text_p, text_n = p[0][0], n[0][0]
    img_c, img_u = p[0][1]["dc_image_context"], n[0][1]["dc_image_context"]
    cond = torch.cat([text_p, img_c], 1)
    uncond = torch.cat([text_n, img_u], 1)
    uncond_img = torch.cat([text_n, img_c], 1)
    concat = p[0][1]["concat_latent_image"] * dc.scale_factor
    x_T = comfy_sample.prepare_noise(latent["samples"], seed)
    ref = dynamicrafter.sample_ddim(dc, x_T, cond, uncond, uncond_img, concat=concat, fs=24, steps=steps,
                                    cfg_text=7.5, cfg_img=1.5, eta=0.0, guidance_rescale=0.7,
                                    spacing="uniform_trailing")
    ours = node_out * dc.scale_factor
    assert ours.shape == ref.shape == (1, 4, T, H // 8, W // 8)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), float((ours - ref).abs().max())


def test_ddim_node_solver_input_equals_library_sample(comfy, loaded, comfy_reference, lib_model):
    import comfy.sample as comfy_sample
    import dynamicrafter
    from nodes_pack_access import pack
    p, n, io, latent, *_ = _i2v_inputs(comfy, loaded, comfy_reference)
    seed, steps = 5, 4
    node_out = pack("sampler").DynamiCrafterDDIMSampler.execute(
        loaded[0], p, n, latent, seed, steps, 7.5, 1.5, 1.0, 0.7, "auto", solver="dpmpp_2m")[0]["samples"]
    dc = lib_model
    cond = torch.cat([p[0][0], p[0][1]["dc_image_context"]], 1)
    uncond = torch.cat([n[0][0], n[0][1]["dc_image_context"]], 1)
    ref = dynamicrafter.sample(dc, comfy_sample.prepare_noise(latent["samples"], seed), cond, uncond,
                               torch.cat([n[0][0], p[0][1]["dc_image_context"]], 1), solver="dpmpp_2m",
                               concat=p[0][1]["concat_latent_image"] * dc.scale_factor, fs=24, steps=steps,
                               cfg_text=7.5, cfg_img=1.5, guidance_rescale=0.7)   # eta is DDIM's: not used
    assert torch.allclose(node_out * dc.scale_factor, ref, atol=1e-5, rtol=1e-5)


def test_old_workflow_keeps_ddim_and_solver_runs_in_the_executor(comfy, monkeypatch):
    """A workflow saved before the solver input (7 widgets + the seed's control value) still maps
    value by value (the web UI fills widgets in order, the new last ones keep their defaults) and
    runs DDIM; the solver input set to dpmpp_2m runs DPM-Solver++ 2M in the real executor. (One
    saved before the context-window inputs: tests/test_comfy_windows.py.)"""
    import dynamicrafter.sampling.solvers as solvers
    wf = load_workflow(WORKFLOWS / "DynamiCrafter image to video.json")
    node = next(nd for nd in wf["nodes"] if nd["type"] == "DynamiCrafterDDIMSampler")
    assert len(node["widgets_values"]) == 16 and node["widgets_values"][8] == "ddim"   # saved with the solver
    saved = node["widgets_values"] = node["widgets_values"][:8]     # as saved before the solver input existed
    assert saved[-1] in ("auto", "uniform_trailing", "uniform")
    calls = []

    def recording(name, solver):
        def run(model, x, levels, *args, **kwargs):
            calls.append((name, len(levels)))
            return solver(model, x, levels, *args, **kwargs)
        return run
    for name in ("ddim", "dpmpp_2m"):
        monkeypatch.setitem(solvers.SOLVERS, name, recording(name, solvers.SOLVERS[name]))
    old = prepare_prompt(wf, comfy.node_classes, "dc_tiny_v.safetensors", ["single_image.png"], W, H, T, STEPS)
    sampler = next(v for v in old.values() if v["class_type"] == "DynamiCrafterDDIMSampler")
    assert "solver" not in sampler["inputs"] and sampler["inputs"]["spacing"] == saved[-1]
    run_and_get_video(comfy, old)
    assert calls == []                  # DDIM through sample_ddim, no solver of the levels
    new = tiny_prompt(comfy, "DynamiCrafter image to video.json", sets=["DynamiCrafterDDIMSampler.solver=dpmpp_2m"])
    run_and_get_video(comfy, new)
    assert calls == [("dpmpp_2m", STEPS)]
    bad = tiny_prompt(comfy, "DynamiCrafter image to video.json", sets=["DynamiCrafterDDIMSampler.solver=heun"])
    with pytest.raises(comfy_runtime.PromptFailed, match="solver"):
        comfy.run(bad)


def test_comfy_side_encoders_match_library(comfy, loaded, tiny_ckpt, comfy_reference, lib_model):
    """The CLIP / CLIP_VISION / VAE the loader hands to ComfyUI compute what the library computes."""
    p, n, io, latent, tokens, ctx, image, prompt = _i2v_inputs(comfy, loaded, comfy_reference)
    dc = lib_model
    ref_text = dc.encode_text([prompt])
    assert torch.allclose(p[0][0], ref_text, atol=1e-4), float((p[0][0] - ref_text).abs().max())
    signed = image.movedim(-1, 1) * 2 - 1
    ref_tok = dc.encode_clip_image(signed)
    assert torch.allclose(tokens["cond"], ref_tok, atol=1e-4), float((tokens["cond"] - ref_tok).abs().max())
    ref_ctx = dc.image_context(ref_tok)
    assert torch.allclose(ctx["cond"], ref_ctx, atol=1e-4)
    moments = dc.vae_moments(signed)
    mean = moments[:, :4]
    concat = p[0][1]["concat_latent_image"]
    assert torch.allclose(concat[:, :, 0], mean, atol=1e-4), float((concat[:, :, 0] - mean).abs().max())
    vae = loaded[3]
    frames = vae.decode(mean)                   # ComfyUI IMAGE in [0, 1]
    ref_frames = ((dc.decode((mean * dc.scale_factor).unsqueeze(2))[:, :, 0] + 1) / 2).clamp(0, 1)
    assert torch.allclose(frames.movedim(-1, 1), ref_frames, atol=1e-4)


def test_comfy_vae_keeps_a_small_vaes_group_count(comfy):
    """ComfyUI's AutoencoderKL always builds 32-group norms; a small VAE trained with 8 groups
    (the demo model's) must encode and decode in ComfyUI exactly as in the library."""
    from nodes_pack_access import pack
    from dynamicrafter.config import VAEConfig
    from dynamicrafter.models.vae import AutoencoderKL
    torch.manual_seed(0)
    lib = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)).eval()
    with torch.no_grad():
        for p in lib.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae = pack("comfy_model").make_comfy_vae(lib, torch.float32)
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean = lib.moments(image.movedim(-1, 1) * 2 - 1)[:, :4]
        ref = ((lib.decode(mean) + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert torch.allclose(vae.encode(image), mean, atol=1e-4), float((vae.encode(image) - mean).abs().max())
    assert torch.allclose(vae.decode(mean), ref, atol=1e-4), float((vae.decode(mean) - ref).abs().max())


def test_official_layouts_in_conditioning(comfy, loaded, comfy_reference):
    from nodes_pack_access import pack, load_input_image
    model, clip, cv, vae = loaded
    core = comfy.nodes
    pos = core.CLIPTextEncode().encode(clip, "x")[0]
    image = load_input_image(comfy_reference / "tiny_v" / "inputs" / "interp" / "a_first.png")
    end = load_input_image(comfy_reference / "tiny_v" / "inputs" / "interp" / "b_last.png")
    ctx = pack("resampler").resample_context(model, pack("clip_vision").encode_clip_vision(cv, image))
    build = pack("conditioning").build_conditioning
    p, *_ = build(pos, pos, vae, ctx, image, pack("inputs").VideoSettings(W, H, T, 10), 1, "interpolation", end)
    c = p[0][1]["concat_latent_image"]
    assert c[:, :, 1:-1].abs().max() == 0 and c[:, :, 0].abs().max() > 0
    assert not torch.allclose(c[:, :, 0], c[:, :, -1])
    p, *_ = build(pos, pos, vae, ctx, image, pack("inputs").VideoSettings(W, H, T, 10), 1, "loop")
    c = p[0][1]["concat_latent_image"]
    assert torch.equal(c[:, :, 0], c[:, :, -1]) and c[:, :, 1:-1].abs().max() == 0


def test_variant_defaults_node(comfy, loaded):
    from nodes_pack_access import pack
    out = pack("defaults").DynamiCrafterVariantDefaults.execute(loaded[0])
    info = json.loads(out[6])
    assert info["parameterization"] == "v" and info["zero_snr"] is True
    assert out[3] == 24      # fs of a 512-style (fps) model
    assert out[7] == 0.0     # cfg_img: single CFG, as the released models (0 = off in the sampler nodes)


def test_model_is_a_comfy_model_patcher_with_vpred_zero_snr(loaded):
    import comfy.model_base
    import comfy.model_patcher
    model = loaded[0]
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.model, comfy.model_base.BaseModel)
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert model.model.model_sampling.zsnr
    assert float(model.model.model_sampling.sigmas[-1]) > 1000    # zero terminal SNR: huge last sigma


# ------------------------------------------------------------------------------ progress / interrupt
def test_progress_bar_and_latent_previews(comfy):
    from comfy.cli_args import LatentPreviewMethod, args
    old = args.preview_method
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        run_and_get_video(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json", steps=4,
                                             sets=["DynamiCrafterDDIMSampler.seed=5"]))
    finally:
        args.preview_method = old
    sampling = [p for p in comfy.progress if p[1] == 4]
    assert [p[0] for p in sampling] == [1, 2, 3, 4]
    assert all(p[2] for p in sampling), "every DDIM step should carry a latent preview"


def test_interrupt_mid_sampling_then_next_prompt_runs(comfy):
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json", steps=20,
                         sets=["DynamiCrafterDDIMSampler.seed=77"])
    seen = []

    def on_progress(value, total):
        seen.append((value, total))
        if total == 20 and value == 3:
            comfy.interrupt()

    comfy.on_progress = on_progress
    try:
        result = comfy.run(prompt, check=False)
    finally:
        comfy.on_progress = None
    assert not result["success"]
    events = [e for e, _ in result["messages"]]
    assert "execution_interrupted" in events
    assert max(v for v, t in seen if t == 20) == 3, "sampling went on after the interrupt"
    run_and_get_video(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json", steps=2))


# ------------------------------------------------------------------------------ bad input
def _error_of(comfy, prompt) -> str:
    result = comfy.run(prompt, check=False)
    assert not result["success"]
    if "validation" in result:
        return comfy_runtime._format_validation(result["validation"]["error"], result["validation"]["node_errors"])
    err = comfy_runtime.execution_error(result)
    assert err is not None, result["messages"]
    return err["exception_message"]


def _write_file(comfy_base, name: str, data: bytes) -> str:
    (comfy_base / "models" / "checkpoints" / name).write_bytes(data)
    return name


def test_error_non_dynamicrafter_checkpoint(comfy, comfy_base):
    from safetensors.torch import save_file
    path = comfy_base / "models" / "checkpoints" / "sd_like.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(path))
    msg = _error_of(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json", ckpt="sd_like.safetensors"))
    assert "sd_like.safetensors" in msg and ("DynamiCrafter" in msg or "video" in msg), msg


def test_error_truncated_checkpoint(comfy, comfy_base, tiny_ckpt):
    with open(tiny_ckpt, "rb") as f:
        head = f.read(1_000_000)
    _write_file(comfy_base, "truncated.safetensors", head)
    msg = _error_of(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json", ckpt="truncated.safetensors"))
    assert "truncated.safetensors" in msg, msg


def test_error_size_not_multiple_of_64(comfy):
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json")
    for node in prompt.values():
        if node["class_type"] == "DynamiCrafterImageConditioning":
            node["inputs"]["width"] = 120
    msg = _error_of(comfy, prompt)
    assert "multiple" in msg and "64" in msg, msg


@pytest.mark.parametrize("node,field,value,needle", [
    ("DynamiCrafterImageConditioning", "frames", -1, "frames"),     # 0 = the model's own (issue #32)
    ("DynamiCrafterImageConditioning", "fs", -1, "fs"),
    ("DynamiCrafterDDIMSampler", "steps", 1001, "steps"),
    ("DynamiCrafterDDIMSampler", "cfg_text", -1.0, "cfg_text"),
])
def test_error_out_of_range_widgets_are_rejected_by_validation(comfy, node, field, value, needle):
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json")
    for n in prompt.values():
        if n["class_type"] == node:
            n["inputs"][field] = value
    msg = _error_of(comfy, prompt)
    assert needle in msg and ("smaller than min" in msg or "bigger than max" in msg), msg


def test_steps_limit_is_the_library_contract_with_the_spacing_rule(comfy):
    """The node takes the library's 1..1000 steps; a count the spacing does not define (61 with
    uniform_trailing) is the library's error naming the counts that work."""
    from dynamicrafter.contract import STEPS
    from nodes_pack_access import pack
    steps = next(i for i in pack("sampler").DynamiCrafterDDIMSampler.define_schema().inputs if i.id == "steps")
    assert steps.max == STEPS[1]
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json")
    for n in prompt.values():
        if n["class_type"] == "DynamiCrafterDDIMSampler":
            n["inputs"].update(steps=61, spacing="uniform_trailing")
    msg = _error_of(comfy, prompt)
    assert "'uniform_trailing' spacing is not defined for 61 steps" in msg and "use 60 or 62 steps" in msg, msg


def test_error_interpolation_without_end_image(comfy):
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json")
    for n in prompt.values():
        if n["class_type"] == "DynamiCrafterImageConditioning":
            n["inputs"]["mode"] = "interpolation"
    msg = _error_of(comfy, prompt)
    assert "end_image" in msg, msg


def test_error_end_image_of_other_size(comfy):
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 10, 10)).save(comfy.input_dir / "small_square.png")
    prompt = tiny_prompt(comfy, "DynamiCrafter interpolation.json", ["interp_a_first.png", "small_square.png"])
    msg = _error_of(comfy, prompt)
    assert "end_image" in msg and "same size" in msg, msg


def test_error_nan_image(comfy, loaded):
    from nodes_pack_access import pack
    bad = torch.full((1, H, W, 3), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        pack("clip_vision").encode_clip_vision(loaded[2], bad)


def test_error_nan_cfg_img_is_refused_not_read_as_off(comfy):
    """NaN passes ComfyUI's min/max validation (every comparison is False) and `NaN > 0` would
    silently mean single CFG: the node refuses it with the library's check."""
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json")
    for n in prompt.values():
        if n["class_type"] == "DynamiCrafterDDIMSampler":
            n["inputs"]["cfg_img"] = float("nan")
    msg = _error_of(comfy, prompt)
    assert "cfg_img must be a finite number in [0.0, 100.0], got nan" in msg, msg


def test_error_fs_and_batch_size_outside_widget_limits(comfy, loaded, comfy_reference):
    """Calls that bypass the widgets (other nodes, API code) get the library's range checks."""
    from nodes_pack_access import pack
    p, n, io, latent, tokens, ctx, image, _ = _i2v_inputs(comfy, loaded, comfy_reference)
    build = pack("conditioning").build_conditioning
    for batch_size, fs, needle in [(1, 0, "fs must be an integer in 1..1000, got 0"),
                                   (1, 10 ** 6, "fs must be an integer in 1..1000, got 1000000"),
                                   (0, 24, "batch_size must be an integer in 1..16, got 0"),
                                   (10 ** 4, 24, "batch_size must be an integer in 1..16, got 10000")]:
        with pytest.raises(ValueError) as err:
            build(p, n, loaded[3], ctx, image, pack("inputs").VideoSettings(W, H, T, fs), batch_size, "image-to-video")
        assert needle in str(err.value)
        with pytest.raises(ValueError) as err:
            pack("text_to_video").DynamiCrafterTextToVideoLatent.execute(p, n, W, H, T, batch_size, fs)
        assert needle in str(err.value)


def test_error_wrong_family_text_encoder(comfy, loaded, comfy_reference):
    from nodes_pack_access import pack
    p, n, io, latent, *_ = _i2v_inputs(comfy, loaded, comfy_reference)
    wrong = [[torch.zeros(1, 77, 768), dict(p[0][1])]]
    with pytest.raises(ValueError, match="768"):
        pack("sampler").DynamiCrafterDDIMSampler.execute(loaded[0], wrong, n, latent, 0, 2, 7.5, 0.0, 0.0, 0.0,
                                                          "auto")


def test_error_wrong_family_clip_vision(comfy, loaded):
    from nodes_pack_access import pack
    with pytest.raises(ValueError, match="1280|resampler expects"):
        pack("resampler").resample_context(loaded[0], {"cond": torch.zeros(1, 257, 1024),
                                                       "uncond": torch.zeros(1, 257, 1024)})


def test_error_model_of_another_kind(comfy):
    from nodes_pack_access import pack
    with pytest.raises(ValueError, match="not a DynamiCrafter"):
        pack("defaults").DynamiCrafterVariantDefaults.execute(object())


# ------------------------------------------------------------------------------ batches / pruned files / dtypes
def test_batch_of_videos(comfy):
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json", steps=2,
                         sets=["DynamiCrafterImageConditioning.batch_size=2"])
    video = run_and_get_video(comfy, prompt)
    assert count_frames(video) == 2 * T      # the two videos one after the other


def test_pruned_file_loads_from_diffusion_models(comfy, comfy_base, tiny_ckpt, lib_model):
    import dynamicrafter
    from nodes_pack_access import pack
    dc = lib_model
    path = comfy_base / "models" / "diffusion_models" / "dc_tiny_pruned_fp16.safetensors"
    dynamicrafter.save_checkpoint(dc, path, dtype=torch.float16, parts=("model.diffusion_model.", "image_proj_model."))
    model, clip, cv, vae = pack("loader").DynamiCrafterLoader.execute(path.name, "fp32", "auto")
    assert clip is None and cv is None and vae is None
    assert model.model.variant["parameterization"] == "v"
    with pytest.raises(ValueError, match="VAELoader"):
        pack("decode").decode_video(None, {"samples": torch.zeros(1, 4, T, H // 8, W // 8)})
    with pytest.raises(ValueError, match="CLIPVisionLoader"):
        pack("clip_vision").encode_clip_vision(None, torch.zeros(1, H, W, 3))


def test_half_precision_model_samples_close_to_fp32(comfy, loaded, comfy_reference):
    """fp16/bf16 weights (GPU users' default); on CPU bf16 is slow, so a 2-step check on the tiny model."""
    from nodes_pack_access import pack
    p, n, io, latent, *_ = _i2v_inputs(comfy, loaded, comfy_reference)
    ref = pack("sampler").DynamiCrafterDDIMSampler.execute(loaded[0], p, n, latent, 3, 2, 7.5, 0.0, 0.0, 0.7,
                                                            "auto")[0]["samples"]
    model16 = pack("loader").DynamiCrafterLoader.execute("dc_tiny_v.safetensors", "bf16", "auto")[0]
    out = pack("sampler").DynamiCrafterDDIMSampler.execute(model16, p, n, latent, 3, 2, 7.5, 0.0, 0.0, 0.7,
                                                            "auto")[0]["samples"]
    assert torch.isfinite(out).all()
    rel = float((out - ref).abs().max() / ref.abs().max())
    assert rel < 0.1, rel


def test_core_sampler_path_denoises_like_the_library(comfy, loaded, tiny_ckpt, comfy_reference, lib_model):
    """What KSampler / SamplerCustomAdvanced call (BaseModel.extra_conds + apply_model at a sigma)
    equals the library's x0 prediction at the matching DDPM timestep: v-prediction, the zero-SNR
    schedule, the concat latent, the [text | image] context and fs are all wired as in the model."""
    p, n, io, latent, *_ = _i2v_inputs(comfy, loaded, comfy_reference)
    inner = loaded[0].model
    extras = dict(p[0][1])
    conds = inner.extra_conds(cross_attn=p[0][0], noise=latent["samples"], **extras)
    c_concat = conds["c_concat"].cond
    c_cross = conds["c_crossattn"].cond
    fs = conds["fs"].cond
    dc = lib_model
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(latent["samples"].shape, generator=g)
    eps = torch.randn(latent["samples"].shape, generator=g)
    for t in (999, 700, 250):
        a = dc.alphas_cumprod[t].double()
        sigma = inner.model_sampling.sigma(torch.tensor([float(t)]))
        x_comfy = x0 + sigma * eps                                   # ComfyUI's noise scaling
        with torch.no_grad():
            den = inner.apply_model(x_comfy, sigma, c_concat=c_concat, c_crossattn=c_cross, fs=fs)
            x_t = x_comfy * (1.0 / (sigma.double() ** 2 + 1).sqrt()).float()
            v = dc.denoise(x_t, torch.tensor([t]), torch.cat([p[0][0], extras["dc_image_context"]], 1),
                           extras["concat_latent_image"] * dc.scale_factor, torch.tensor([24]))
            ref = dc.sqrt_alphas_cumprod[t] * x_t - dc.sqrt_one_minus_alphas_cumprod[t] * v
        if t == 999:       # ComfyUI keeps alpha 4.9e-8 there instead of 0: x0 = -v up to that
            assert torch.allclose(den, ref, atol=2e-3), float((den - ref).abs().max())
        else:
            assert torch.allclose(den, ref, atol=2e-4, rtol=1e-4), (t, float((den - ref).abs().max()))
        assert abs(float(1 / (sigma ** 2 + 1)) - float(a)) < 1e-5 or t == 999


@pytest.mark.parametrize("saver,inputs,suffix", [
    ("SaveAnimatedWEBP", {"filename_prefix": "dc_webp", "fps": 8.0, "lossless": False, "quality": 80,
                          "method": "default"}, ".webp"),
    ("SaveWEBM", {"filename_prefix": "dc_webm", "codec": "vp9", "fps": 8.0, "crf": 32.0}, ".webm"),
])
def test_decoded_frames_feed_core_savers(comfy, saver, inputs, suffix):
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json", steps=2)
    dec = next(k for k, v in prompt.items() if v["class_type"] == "DynamiCrafterVideoDecode")
    for k in [k for k, v in prompt.items() if v["class_type"] in ("CreateVideo", "SaveVideo")]:
        del prompt[k]
    prompt["900"] = {"class_type": saver, "inputs": {"images": [dec, 0], **inputs}}
    result = comfy.run(prompt)
    files = [i for o in result["outputs"].values() for i in o.get("images", [])]
    assert files and files[0]["filename"].endswith(suffix), result["outputs"]
    assert (comfy.output_dir / files[0].get("subfolder", "") / files[0]["filename"]).stat().st_size > 0


def test_pruned_model_with_core_vae_loader(comfy, comfy_base, tiny_ckpt, lib_model):
    """A pruned file gives only MODEL; the VAE then comes from core VAELoader (an SD KL-f8 VAE)."""
    import dynamicrafter
    from safetensors.torch import load_file, save_file
    from tiny_sd import write_tiny_sd15
    sd_path = write_tiny_sd15(comfy_base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    vae_path = comfy_base / "models" / "vae" / "sd_vae_random.safetensors"
    if not vae_path.exists():
        full = load_file(str(sd_path))
        save_file({k[len("first_stage_model."):]: v for k, v in full.items() if k.startswith("first_stage_model.")},
                  str(vae_path))
    pruned = comfy_base / "models" / "diffusion_models" / "dc_tiny_pruned.safetensors"
    if not pruned.exists():
        dynamicrafter.save_checkpoint(lib_model, pruned,
                                      parts=("model.diffusion_model.", "image_proj_model."))
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json", steps=2)
    loader_id = next(k for k, v in prompt.items() if v["class_type"] == "DynamiCrafterLoader")
    prompt["801"] = {"class_type": "DynamiCrafterLoader",
                     "inputs": {"ckpt_name": pruned.name, "dtype": "fp32", "variant": "auto"}}
    prompt["802"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae_path.name}}
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == loader_id and value[1] == 0:
                node["inputs"][name] = ["801", 0]
            if isinstance(value, list) and value[0] == loader_id and value[1] == 3:
                node["inputs"][name] = ["802", 0]
    video = run_and_get_video(comfy, prompt)
    assert count_frames(video) == T


def test_start_image_of_another_size_is_covered_and_centre_cropped(comfy):
    from nodes_pack_access import pack
    img = torch.zeros(1, 100, 100, 3)
    img[:, 45:55, 45:55] = 1.0                     # a white square in the middle
    out = pack("images").resize_center(img, W, H)
    assert out.shape == (1, H, W, 3)
    assert out[0, H // 2, W // 2].min() > 0.9 and out[0, 0, 0].max() < 0.05
    # odd margin: the node crops where the library and the trainer crop (torchvision's rounding)
    ramp = (torch.arange(H + 3, dtype=torch.float32) / (H + 3)).view(1, H + 3, 1, 1).expand(1, H + 3, W, 3)
    from dynamicrafter.pipeline import fit_image
    library = (fit_image(ramp.movedim(-1, 1) * 2 - 1, H, W) + 1) / 2
    assert torch.allclose(pack("images").resize_center(ramp, W, H).movedim(-1, 1), library, atol=1e-6)
    assert torch.equal(pack("images").resize_center(ramp, W, H)[0, :, 0, 0], ramp[0, 2:H + 2, 0, 0])
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json", steps=2,
                         sets=['DynamiCrafterImageConditioning.width=64', 'DynamiCrafterImageConditioning.height=128'])
    video = run_and_get_video(comfy, prompt)     # a 128x64 input animated as a 64x128 portrait video
    assert count_frames(video) == T


def test_run_workflow_prompt_option_targets_the_positive_text(comfy):
    for name in ("DynamiCrafter image to video.json", "DynamiCrafter long video.json",
                 "VideoCrafter text to video.json", "DynamiCrafter with KSampler.json"):
        prompt = prepare_prompt(load_workflow(WORKFLOWS / name), comfy.node_classes, text="a dancing robot")
        texts = [v["inputs"]["text"] for v in prompt.values() if v["class_type"] == "CLIPTextEncode"]
        assert texts.count("a dancing robot") == 1 and "" in texts, (name, texts)
