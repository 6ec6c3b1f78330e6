"""A new user's first hour (issue #32): one image-to-video node with the model's own defaults,
queue-time validation, template order and notes, search words in the display names."""
from __future__ import annotations

import sys

import pytest
import torch

import comfy_runtime

REPO = comfy_runtime.REPO_ROOT
sys.path.insert(0, str(REPO / "scripts"))

from test_comfy_nodes import _error_of, run_and_get_video, tiny_prompt  # noqa: E402


@pytest.fixture(scope="module")
def loaded(comfy, tiny_ckpt):
    from nodes_pack_access import pack
    return pack("loader").DynamiCrafterLoader.execute("dc_tiny_v.safetensors", "fp32", "auto")


def _one_node_prompt(comfy, **widgets) -> dict:
    """The image-to-video template with its CLIP vision + resampler + conditioning replaced by the
    one Image to Video node (widgets: its width/height/frames/fs)."""
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json")
    ids = {n["class_type"]: k for k, n in prompt.items()}
    enc, res, cond = (ids[c] for c in ("DynamiCrafterCLIPVisionEncode", "DynamiCrafterContextResampler",
                                       "DynamiCrafterImageConditioning"))
    old = prompt[cond]["inputs"]
    prompt[cond] = {"class_type": "DynamiCrafterI2V", "inputs": {
        "model": prompt[res]["inputs"]["model"], "clip_vision": prompt[enc]["inputs"]["clip_vision"],
        "vae": old["vae"], "positive": old["positive"], "negative": old["negative"],
        "start_image": old["start_image"], "batch_size": 1, "mode": "image-to-video",
        "width": 0, "height": 0, "frames": 0, "fs": 0, **widgets}}
    del prompt[enc], prompt[res]
    return prompt


def test_image_to_video_node_takes_size_frames_fs_from_the_model(comfy, loaded):
    """0 = the model's trained size/frames/fs; the result is the three-node chain's at those values."""
    from nodes_pack_access import load_input_image, pack
    model, clip, cv, vae = loaded
    v = model.model.variant
    (h, w), frames, fs = v["resolution"], v["frames"], v["default_fs"]
    pos = comfy.nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
    neg = comfy.nodes.CLIPTextEncode().encode(clip, "")[0]
    image = load_input_image(comfy_runtime.REPO_ROOT / "assets" / "example.png")
    inputs = pack("inputs")
    one = pack("image_to_video").image_to_video(inputs.Pipeline(model, cv, vae, pos, neg), image,
                                                inputs.VideoSettings(0, 0, 0, 0), 1, "image-to-video")
    ctx = pack("resampler").resample_context(model, pack("clip_vision").encode_clip_vision(cv, image))
    three = pack("conditioning").build_conditioning(pos, neg, vae, ctx, image, inputs.VideoSettings(w, h, frames, fs),
                                                    1, "image-to-video")
    assert tuple(one[3]["samples"].shape) == (1, 4, frames, h // 8, w // 8)
    for a, b in zip(one[:3], three[:3]):
        assert a[0][1]["dc_fs"] == fs
        assert torch.equal(a[0][1]["concat_latent_image"], b[0][1]["concat_latent_image"])
        assert torch.equal(a[0][1]["dc_image_context"], b[0][1]["dc_image_context"])


def test_image_to_video_node_runs_in_the_executor_and_warns_off_size(comfy, loaded):
    model = loaded[0]
    h, w = model.model.variant["resolution"]
    video = run_and_get_video(comfy, _one_node_prompt(comfy))
    assert video.stat().st_size > 0
    from nodes_pack_access import pack
    assert pack("image_to_video").size_warning(model.model.variant, w, h) is None
    msg = pack("image_to_video").size_warning(model.model.variant, w + 64, h)
    assert f"trained at {w}x{h}" in msg and f"{w + 64}x{h}" in msg and "0" in msg


def _validation_error(comfy, prompt) -> str:
    """The queue-time (validation) error of a prompt: it must fail before any node runs."""
    result = comfy.run(prompt, check=False)
    assert not result["success"] and "validation" in result, "expected a queue-time validation error"
    return _error_of(comfy, prompt)


@pytest.mark.parametrize("steps,spacing,needle", [
    (61, "auto", "'uniform_trailing' spacing is not defined for 61 steps"),
    (122, "uniform_trailing", "'uniform_trailing' spacing is not defined for 122 steps"),
    (1001, "uniform", "bigger than max of 1000"),
    (50, "trailing", "Value not in list"),
])
def test_steps_the_spacing_cannot_make_are_refused_at_queue_time(comfy, steps, spacing, needle):
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json")
    for n in prompt.values():
        if n["class_type"] == "DynamiCrafterDDIMSampler":
            n["inputs"].update(steps=steps, spacing=spacing)
    msg = _validation_error(comfy, prompt)
    assert needle in msg and "DynamiCrafter DDIM Sampler (dual CFG)" in msg, msg


def test_uniform_spacing_keeps_steps_that_trailing_cannot_make(comfy):
    from nodes_pack_access import pack
    assert pack("validation").steps_problem("x", 61, "uniform") is None
    assert pack("validation").steps_problem("x", 60, "auto") is None
    assert pack("validation").steps_problem("x", None, "auto") is None      # linked: checked at run time


def test_missing_checkpoint_is_refused_at_queue_time_by_display_name(comfy):
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json", ckpt="dynamicrafter_512.ckpt")
    msg = _validation_error(comfy, prompt)
    assert "DynamiCrafter Checkpoint Loader" in msg and "'dynamicrafter_512.ckpt' not found" in msg, msg


def test_template_order_file_is_generated_from_make_workflows_with_the_demo_first():
    """web/js/templates.js orders the Templates browser's cards by web/js/template_order.js, which
    scripts/make_workflows.py writes from its WORKFLOWS table (browser test: the demo card first)."""
    import make_workflows
    assert (REPO / "web" / "js" / "template_order.js").read_text() == make_workflows.template_order_js()
    assert next(iter(make_workflows.WORKFLOWS)) == "DynamiCrafter demo.json"
    assert {n for n in make_workflows.WORKFLOWS} == {p.name for p in (REPO / "workflows").glob("*.json")}


def test_sampler_warns_when_the_graph_asks_a_size_the_model_was_not_trained_at(comfy, loaded, caplog):
    """The three-node template at another size than the model's: the DDIM node logs the warning."""
    h, w = loaded[0].model.variant["resolution"]
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json")
    for n in prompt.values():
        if n["class_type"] == "DynamiCrafterImageConditioning":
            n["inputs"].update(width=w + 64, height=h)
    with caplog.at_level("WARNING"):
        run_and_get_video(comfy, prompt)
    assert any(f"trained at {w}x{h} but the graph asks for {w + 64}x{h}" in r.getMessage() for r in caplog.records)


def test_image_to_video_node_widgets_are_locked(comfy):
    """Saved workflows depend on widget order: new widgets go at the end, never between."""
    from comfy_workflow import widget_layout
    layout = [w for w, _ in widget_layout(comfy.node_classes["DynamiCrafterI2V"])]
    assert layout == ["width", "height", "frames", "batch_size", "fs", "mode"]
    import nodes as comfy_nodes   # ComfyUI's module
    assert comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS["DynamiCrafterI2V"].startswith("Image to Video (DynamiCrafter")


def test_thumbnails_show_the_example_inputs_not_the_graph():
    """Each card's picture (workflows/<name>.jpg) is what scripts/make_thumbnails.py makes from the
    template's example inputs, so the cards differ at a glance; the graph only without an input."""
    import json

    import numpy as np
    from PIL import Image

    import make_thumbnails
    with_inputs = 0
    for wf in sorted((REPO / "workflows").glob("*.json")):
        pictures = make_thumbnails.example_inputs(json.loads(wf.read_text()))[:3]
        if not pictures:
            continue
        with_inputs += 1
        want = np.asarray(make_thumbnails.input_thumbnail(pictures), dtype=np.float32)
        shipped = np.asarray(Image.open(wf.with_suffix(".jpg")).convert("RGB"), dtype=np.float32)
        assert shipped.shape == want.shape and np.abs(shipped - want).mean() < 3.0, wf.name   # JPEG noise only
    assert with_inputs >= 9


# ------------------------------------------------------------------------------ keyframes: framing
def _strip_keyframe(comfy, name: str, colour) -> str:
    """A square keyframe (the tiny video is 2:1) with 4-row red strips along its top and bottom
    edges: a cover crop cuts them off, a letterbox keeps them."""
    import numpy as np
    from PIL import Image
    picture = np.full((64, 64, 3), colour, np.uint8)
    picture[:4] = picture[-4:] = (255, 0, 0)
    Image.fromarray(picture).save(comfy.input_dir / name)
    return name


def test_keyframes_node_pads_keyframes_of_another_shape_in_the_executor(comfy, monkeypatch, previews):
    """The Keyframes template (framing 'pad', its default) keeps the whole keyframe: the strips
    along the square keyframes' edges reach the fitted keyframes, centred on a mid-grey border.
    Each pair's steps send first-frame previews (latent2rgb) from the node."""
    from nodes_pack_access import pack
    from test_comfy_nodes import H, STEPS, T, W, count_frames
    images, fitted = pack("images"), []
    real = images.frame_image

    def spy(*args, **kwargs):                   # what the node's keyframes were fitted to
        fitted.append((args, real(*args, **kwargs)))
        return fitted[-1][1]

    monkeypatch.setattr(images, "frame_image", spy)
    keys = [_strip_keyframe(comfy, f"strip_key{i}.png", c)
            for i, c in enumerate([(40, 40, 200), (40, 200, 40), (200, 200, 40)])]
    prompt = tiny_prompt(comfy, "Keyframes to one shot.json", keys,
                         sets=["DynamiCrafterLoader.variant=512_interp", "DynamiCrafterKeyframes.pair_prompts="])
    assert [n["inputs"]["framing"] for n in prompt.values() if n["class_type"] == "DynamiCrafterKeyframes"] == ["pad"]
    assert count_frames(run_and_get_video(comfy, prompt)) == 1 + 2 * (T - 1)
    (args, out), = fitted
    assert args[1:4] == (H, W, "pad") and out.shape == (3, 3, H, W)
    left = (W - H) // 2                                    # a square keyframe is H x H in the H x W frame
    assert (out[..., :left] == 0.5).all() and (out[..., left + H:] == 0.5).all()
    red = (out[:, 0] > 0.9) & (out[:, 1] < 0.1) & (out[:, 2] < 0.1)
    assert red[:, 0, left:left + H].all() and red[:, -1, left:left + H].all()   # top and bottom strips kept
    assert {n for n, _ in previews} == {_node_of(prompt, "DynamiCrafterKeyframes")}
    assert len(previews) == 2 * STEPS and {image.size for _, image in previews} == {(W, H)}  # 2 pairs, own VAE


def test_keyframes_crop_framing_is_todays_cover_crop_bit_for_bit():
    """framing 'crop' fits the keyframes exactly as the node did before it had the choice."""
    from dynamicrafter.pipeline import cover_crop
    from nodes_pack_access import pack
    keys = torch.rand(3, 70, 90, 3)
    before = cover_crop(keys.movedim(-1, 1).float(), 64, 128).clamp(0, 1).movedim(1, -1)
    assert torch.equal(pack("images").fit_frames(keys, 128, 64, "crop"), before)
    assert torch.equal(pack("images").resize_center(keys, 128, 64), before)


# ------------------------------------------------------------------------------ run-time errors
@pytest.mark.parametrize("workflow,node,widgets,needle", [
    ("DynamiCrafter image to video.json", "DynamiCrafterDDIMSampler", {"cfg_camera": 2.0},
     "cfg_camera 2.0 needs a camera move"),
    ("Keyframes to one shot.json", "DynamiCrafterKeyframes", {"pair_prompts": "a\nb\nc"},
     "pair_prompts has 3 lines but 3 keyframes make 2 pairs"),
])
def test_run_time_errors_name_the_node_by_its_display_name(comfy, workflow, node, widgets, needle):
    """A bad input found while the node runs: the executor's execution_error message starts with
    the node's title as the user sees it (ComfyUI's node_type stays the class id)."""
    import nodes as comfy_nodes   # ComfyUI's module
    images = ["interp_a_first.png", "interp_b_last.png", "single_image.png"] if "Keyframes" in workflow \
        else ["single_image.png"]
    prompt = tiny_prompt(comfy, workflow, images, sets=["DynamiCrafterLoader.variant=512_interp"]
                         if "Keyframes" in workflow else None)
    for n in prompt.values():
        if n["class_type"] == node:
            n["inputs"].update(widgets)
    result = comfy.run(prompt, check=False)
    err = comfy_runtime.execution_error(result)
    assert err is not None and err["node_type"] == node, result["messages"]
    title = comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS[node]
    assert title != node and err["exception_message"].startswith(f"{title}: "), err["exception_message"]
    assert needle in err["exception_message"] and err["exception_message"].count(title) == 1


def test_the_model_check_names_no_node_of_its_own_inside_a_node(comfy):
    """A MODEL that is not ours, given to the DDIM node: one name (the node's title), then why."""
    from nodes_pack_access import pack
    sampler = pack("sampler").DynamiCrafterDDIMSampler
    with pytest.raises(ValueError) as caught:
        sampler.execute(object(), [], [], {"samples": torch.zeros(1, 4, 2, 8, 8)}, 0, 2, 7.5, 0.0, 1.0, 0.7, "auto")
    assert str(caught.value).startswith("DynamiCrafter DDIM Sampler (dual CFG): the MODEL input is not a "
                                        "DynamiCrafter/VideoCrafter model"), caught.value


# ------------------------------------------------------------------------------ step previews
RED_BLOCK = (slice(2, 6), slice(2, 7))        # latent rows, columns of the first frame's red block


def _probe_latent(comfy, name: str, frames: int, h: int, w: int) -> str:
    """input/<name>.latent (core LoadLatent): a video latent whose first frame's latent2rgb (SD's
    factors) is a red block on mid-grey, left of centre, and every later frame's is blue; strong
    (rgb +-3, clamped in the preview) so a few steps of the tiny model's x0 keep the colours."""
    from comfy.latent_formats import SD15
    from safetensors.torch import save_file
    sd = SD15()
    factors = torch.tensor(sd.latent_rgb_factors)                   # (4, 3): latent -> rgb in [-1, 1]
    rgb = torch.zeros(frames, h, w, 3)
    rgb[0][RED_BLOCK] = torch.tensor([3.0, -3.0, -3.0])
    rgb[1:] = torch.tensor([-3.0, -3.0, 3.0])
    model_space = rgb @ torch.linalg.pinv(factors)                  # (T, h, w, 4), exact: factors has rank 3
    latent = (model_space / sd.scale_factor).permute(3, 0, 1, 2)[None].contiguous()
    save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])}, str(comfy.input_dir / name))
    return name


@pytest.fixture
def previews(monkeypatch):
    """[(node id, PIL preview)] the progress hook is handed while the executor runs (what the
    server sends the browser), with Settings > preview method set per test through `method`."""
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args
    from comfy_execution.utils import get_executing_context
    sent, hook = [], comfy.utils.PROGRESS_BAR_HOOK

    def recording(value, total, preview, prompt_id=None, node_id=None):
        if preview is not None:
            sent.append((node_id or get_executing_context().node_id, preview[1]))
        return hook(value, total, preview, prompt_id=prompt_id, node_id=node_id)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", recording)
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    return sent


def _probe_prompt(comfy, workflow: str, sampler: str, **widgets) -> dict:
    from test_comfy_nodes import H, T, W
    prompt = tiny_prompt(comfy, workflow, steps=widgets.pop("steps", 3))
    name = _probe_latent(comfy, "preview_probe.latent", T, H // 8, W // 8)
    prompt["900"] = {"class_type": "LoadLatent", "inputs": {"latent": name}}
    for n in prompt.values():
        if n["class_type"] == sampler:
            n["inputs"]["latent_image"] = ["900", 0]
        if n["class_type"] in widgets:
            n["inputs"].update(widgets[n["class_type"]])
    return prompt


def _colours(image) -> tuple:
    import numpy as np
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    inside = np.zeros(a.shape[:2], bool)
    inside[RED_BLOCK] = True
    return a[inside].mean(0), a[~inside].mean(0)


def _assert_first_frame_preview(previews, node: str) -> None:
    """Every preview came from `node`, is the latent's size (latent2rgb: one pixel a latent pixel)
    and shows the probe's first frame: its red block where it is, mid-grey around it (a later
    frame would be blue, a transposed or flipped one the wrong size or place)."""
    import numpy as np
    from test_comfy_nodes import H, W
    assert previews and {n for n, _ in previews} == {node}, previews
    for _, image in previews:
        assert image.size == (W // 8, H // 8)
        inside, outside = _colours(image)
        assert inside[0] > 200 and inside[1:].max() < 60, inside
        assert np.abs(outside - 127.5).max() < 25, outside


def _node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, n in prompt.items() if n["class_type"] == class_type)


@pytest.fixture
def sd_latents(monkeypatch):
    """The tiny checkpoints' VAEs taken for the released one (SD's latent space), as a released
    model's previews see it: the tiny VAEs are small ones of their own."""
    from dynamicrafter.config import VAEConfig
    monkeypatch.setattr(VAEConfig, "sd_latents", property(lambda self: True))


def test_ddim_node_previews_the_first_frame_by_latent2rgb(comfy, previews, sd_latents):
    """Settings > preview method latent2rgb, a model of SD latents: each step's preview the DDIM
    node sends is its x0's first frame through SD's latent2rgb factors, at the latent's size (a
    clip started at denoise 0.06, so x0 stays near the probe latent)."""
    prompt = _probe_prompt(comfy, "DynamiCrafter image to video.json", "DynamiCrafterDDIMSampler", steps=40,
                           DynamiCrafterDDIMSampler={"denoise": 0.06})
    comfy.run(prompt)
    _assert_first_frame_preview(previews, _node_of(prompt, "DynamiCrafterDDIMSampler"))


def test_core_sampler_previews_the_first_frame_by_latent2rgb(comfy, previews):
    """The KSampler path (SamplerCustomAdvanced on our MODEL): core's previewer, given the 5-D x0
    and the MODEL's latent format, shows the same first frame and raises nothing."""
    prompt = _probe_prompt(comfy, "DynamiCrafter with KSampler.json", "SamplerCustomAdvanced", steps=40,
                           BasicScheduler={"denoise": 0.06})
    comfy.run(prompt)
    _assert_first_frame_preview(previews, _node_of(prompt, "SamplerCustomAdvanced"))


@pytest.fixture
def taesd(comfy, previews, monkeypatch):
    """Preview method TAESD with an SD TAESD decoder (random weights: the size is what is checked)
    in models/vae_approx/taesd_decoder.safetensors."""
    import folder_paths
    from comfy.cli_args import LatentPreviewMethod, args
    from comfy.taesd.taesd import Decoder
    from safetensors.torch import save_file
    path = comfy.base_dir / "models" / "vae_approx" / "taesd_decoder.safetensors"
    assert str(path.parent) in folder_paths.get_folder_paths("vae_approx")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(Decoder().state_dict(), str(path))
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.TAESD)
    yield previews
    path.unlink()


def test_taesd_previews_of_the_ddim_node_are_the_video_size(comfy, taesd, sd_latents):
    from test_comfy_nodes import H, W
    prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json", steps=2)
    comfy.run(prompt)
    assert len(taesd) == 2 and {n for n, _ in taesd} == {_node_of(prompt, "DynamiCrafterDDIMSampler")}
    assert {image.size for _, image in taesd} == {(W, H)}      # SD's TAESD decodes x0's first frame


def test_taesd_setting_leaves_the_core_sampler_on_latent2rgb(comfy, taesd):
    """Core's TAESD previewer takes 4-D latents only: the MODEL's latent format names none, so
    core previews our 5-D x0 by latent2rgb (first frame) instead of failing mid-sampling."""
    from test_comfy_nodes import H, W
    prompt = tiny_prompt(comfy, "DynamiCrafter with KSampler.json", steps=2)
    comfy.run(prompt)
    assert taesd and {image.size for _, image in taesd} == {(W // 8, H // 8)}


def test_demo_model_previews_its_first_frame_decoded_by_its_own_vae(comfy, comfy_base, previews):
    """The demo template (its model's VAE is a small one of its own: SD's latent2rgb factors show
    its red circle grey-blue): the previews are the first frame decoded by that VAE at the
    video's size, and the last one shows the decoded first frame's red circle."""
    import shutil

    import av
    import numpy as np
    from comfy_workflow import load_workflow, ui_to_api
    from test_comfy_nodes import run_and_get_video
    demo = REPO / "assets" / "demo" / "dynamicrafter_demo.safetensors"
    shutil.copyfile(demo, comfy_base / "models" / "checkpoints" / demo.name)
    shutil.copyfile(REPO / "assets" / "example.png", comfy.input_dir / "example.png")
    prompt = ui_to_api(load_workflow(REPO / "workflows" / "DynamiCrafter demo.json"), comfy.node_classes)
    ddim = _node_of(prompt, "DynamiCrafterDDIMSampler")
    prompt[ddim]["inputs"]["steps"] = 6
    video = run_and_get_video(comfy, prompt)
    with av.open(str(video)) as f:
        first = next(f.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    assert len(previews) == 6 and {n for n, _ in previews} == {ddim}
    assert {image.size for _, image in previews} == {(first.shape[1], first.shape[0])}      # 64x64, the video's
    last = np.asarray(previews[-1][1].convert("RGB"), dtype=np.float32)
    circle = (first[..., 0] > 150) & (first[..., 1] < 90)       # the red circle of the decoded first frame
    assert circle.sum() > 100
    inside = last[circle].mean(0), first[circle].mean(0)
    assert np.abs(inside[0] - inside[1]).max() < 25, inside
    assert np.abs(last[~circle].mean(0) - first[~circle].mean(0)).max() < 25


# ------------------------------------------------------------------------------ guidance from the model
DEMO_VARIANT = {"cfg_text": 2.0, "cfg_img": 1.0, "guidance_rescale": 0.7}      # the demo model's metadata
RELEASED_VARIANT = {"cfg_text": 7.5, "cfg_img": None, "guidance_rescale": 0.7}  # DynamiCrafter 512


@pytest.mark.parametrize("cfg_text,cfg_img,variant,expected", [
    (0.0, 0.0, DEMO_VARIANT, (2.0, 1.0)),          # 0: the model's own pair (text-only guidance)
    (0.0, 0.0, RELEASED_VARIANT, (7.5, None)),     # 0: the released single CFG
    (0.0, 3.0, DEMO_VARIANT, (2.0, 3.0)),          # the model's text scale, the user's image scale
    (5.0, 0.0, DEMO_VARIANT, (5.0, None)),         # set: single CFG at 5, whatever the model
    (5.0, 1.5, RELEASED_VARIANT, (5.0, 1.5)),      # set: dual CFG as given
])
def test_cfg_text_zero_is_the_loaded_models_own_guidance(comfy, cfg_text, cfg_img, variant, expected):
    from nodes_pack_access import pack
    settings = pack("inputs").SamplerSettings.of(1, 10, cfg_text, cfg_img, 1.0, 0.3, "auto")
    g = settings.guidance(variant)
    assert (g.cfg_text, g.cfg_img, g.rescale) == (*expected, 0.3)    # guidance_rescale stays the widget's


def test_ddim_node_at_cfg_text_zero_samples_as_at_the_models_own_numbers(comfy, loaded):
    """In the executor: the image-to-video template with cfg_text 0 makes the video that the model's
    own cfg_text / cfg_img, typed in, make (the tiny model: single CFG 7.5)."""
    import av
    import numpy as np
    v = loaded[0].model.variant

    def frames(cfg_text, cfg_img):
        prompt = tiny_prompt(comfy, "DynamiCrafter image to video.json")
        sampler = next(n["inputs"] for n in prompt.values() if n["class_type"] == "DynamiCrafterDDIMSampler")
        sampler.update(cfg_text=cfg_text, cfg_img=cfg_img)
        with av.open(str(run_and_get_video(comfy, prompt))) as f:
            return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])

    own = frames(0.0, 0.0)
    assert np.array_equal(own, frames(v["cfg_text"], v.get("cfg_img") or 0.0))
    assert not np.array_equal(own, frames(1.0, 0.0))      # the guidance matters at this size


def test_variant_defaults_give_dual_cfg_guider_the_models_own_guidance(comfy, loaded):
    """cfg_cond2_negative: DualCFGGuider at (cfg_text, cfg_text) is single CFG, at (cfg_text, 1) text-only."""
    from nodes_pack_access import pack
    out = pack("defaults").DynamiCrafterVariantDefaults.execute(loaded[0])
    assert loaded[0].model.variant.get("cfg_img") is None and out[8] == out[4] == loaded[0].model.variant["cfg_text"]
    scales = pack("defaults").guidance_outputs
    assert (scales(DEMO_VARIANT)["cfg_text"], scales(DEMO_VARIANT)["cfg_cond2_negative"]) == (2.0, 1.0)
    assert scales(RELEASED_VARIANT)["cfg_img"] == 0.0 and scales(RELEASED_VARIANT)["cfg_cond2_negative"] == 7.5
