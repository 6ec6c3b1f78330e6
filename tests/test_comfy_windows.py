"""Context windows in the real ComfyUI 0.3.75 executor with the tiny reference checkpoint: the DDIM
node's context_window / context_overlap / context_schedule inputs, and core 'Context Windows
(Manual)' driving our MODEL under core KSampler (workflows/Long shot - context windows.json)."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

import comfy_runtime

REPO = comfy_runtime.REPO_ROOT
sys.path.insert(0, str(REPO / "scripts"))
from comfy_workflow import load_workflow  # noqa: E402
from run_workflow import prepare_prompt, video_outputs  # noqa: E402

W, H, T, STEPS = 128, 64, 8, 3
WORKFLOWS = REPO / "workflows"


def tiny_prompt(comfy, workflow: str, frames=T, steps=STEPS, sets=None) -> dict:
    return prepare_prompt(load_workflow(WORKFLOWS / workflow), comfy.node_classes, "dc_tiny_v.safetensors",
                          ["single_image.png"], W, H, frames, steps, sets)


def count_frames(comfy, result) -> int:
    import av
    videos = video_outputs(result, comfy.output_dir)
    assert videos and videos[0].stat().st_size > 0
    with av.open(str(videos[0])) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.fixture
def latents(comfy, monkeypatch):
    """The latents each run hands to 'DynamiCrafter Video Decode' (the sampler's output)."""
    from nodes_pack_access import pack
    cls = pack("decode").DynamiCrafterVideoDecode
    original = cls.execute.__func__
    seen = []

    def execute(c, vae, latent, *args, **kwargs):
        seen.append(latent["samples"].clone())
        return original(c, vae, latent, *args, **kwargs)
    monkeypatch.setattr(cls, "execute", classmethod(execute))
    return seen


def run(comfy, latents, prompt) -> tuple[torch.Tensor, int]:
    result = comfy.run(prompt)
    return latents[-1], count_frames(comfy, result)


# ------------------------------------------------------------------------------ the DDIM node
def test_ddim_node_context_window_inputs_in_the_executor(comfy, latents, monkeypatch):
    import dynamicrafter.sampling.ddim as sampling
    plans = []
    real = sampling.plan_windows

    def recording(*args):
        plans.append((args, real(*args)))
        return plans[-1][1]
    monkeypatch.setattr(sampling, "plan_windows", recording)
    wf = "DynamiCrafter image to video.json"
    plain, n_plain = run(comfy, latents, tiny_prompt(comfy, wf))
    whole, _ = run(comfy, latents, tiny_prompt(comfy, wf, sets=[f"DynamiCrafterDDIMSampler.context_window={T}",
                                                              "DynamiCrafterDDIMSampler.context_overlap=2"]))
    windowed, n_windowed = run(comfy, latents, tiny_prompt(comfy, wf, sets=[
        "DynamiCrafterDDIMSampler.context_window=4", "DynamiCrafterDDIMSampler.context_overlap=2"]))
    looped, _ = run(comfy, latents, tiny_prompt(comfy, wf, sets=[
        "DynamiCrafterDDIMSampler.context_window=4", "DynamiCrafterDDIMSampler.context_overlap=1",
        "DynamiCrafterDDIMSampler.context_schedule=looped"]))
    assert [a for a, _ in plans] == [(T, None, 4, "uniform"), (T, T, 2, "uniform"), (T, 4, 2, "uniform"),
                                     (T, 4, 1, "looped")]
    assert plans[0][1] is None and plans[1][1] is None
    assert plans[2][1].windows == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7]]
    assert plans[3][1].windows == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 0, 1]]
    assert torch.equal(whole, plain)                      # window >= frames: the plain sampler, bit for bit
    assert windowed.shape == looped.shape == plain.shape == (1, 4, T, H // 8, W // 8) and n_windowed == n_plain == T
    assert not torch.equal(windowed, plain) and not torch.equal(looped, windowed)
    assert torch.isfinite(windowed).all() and torch.isfinite(looped).all()
    bad = tiny_prompt(comfy, wf, sets=["DynamiCrafterDDIMSampler.context_window=4",
                                       "DynamiCrafterDDIMSampler.context_overlap=4"])
    with pytest.raises(comfy_runtime.PromptFailed,
                       match=r"context_overlap must be an integer in 0\.\.3 \(less than context_window=4\)"):
        comfy.run(bad)


def test_workflow_saved_before_the_window_inputs_loads_and_samples_without_windows(comfy, latents):
    """Widgets are saved by position: a graph saved with the solver but before the window inputs
    (8 values + the seed's control value) maps value by value and samples as before (windows off)."""
    wf = load_workflow(WORKFLOWS / "DynamiCrafter image to video.json")
    node = next(nd for nd in wf["nodes"] if nd["type"] == "DynamiCrafterDDIMSampler")
    assert node["widgets_values"][9:12] == [0, 4, "uniform"]               # saved now: windows off
    node["widgets_values"] = node["widgets_values"][:9]
    old = prepare_prompt(wf, comfy.node_classes, "dc_tiny_v.safetensors", ["single_image.png"], W, H, T, STEPS)
    sampler = next(v for v in old.values() if v["class_type"] == "DynamiCrafterDDIMSampler")
    assert "context_window" not in sampler["inputs"] and sampler["inputs"]["solver"] == "ddim"
    before, n = run(comfy, latents, old)
    now, _ = run(comfy, latents, tiny_prompt(comfy, "DynamiCrafter image to video.json"))
    assert n == T and torch.equal(before, now)


def test_ddim_node_samples_more_frames_than_one_unet_call_in_windows(comfy, latents):
    frames = 66
    wf = "DynamiCrafter image to video.json"
    out, n = run(comfy, latents, tiny_prompt(comfy, wf, frames=frames, steps=2, sets=[
        "DynamiCrafterDDIMSampler.context_window=32", "DynamiCrafterDDIMSampler.context_overlap=8"]))
    assert out.shape[2] == frames and n == frames and torch.isfinite(out).all()
    with pytest.raises(comfy_runtime.PromptFailed, match="pass window=16"):
        comfy.run(tiny_prompt(comfy, wf, frames=frames, steps=2))


def test_text_to_video_in_windows_with_the_ddim_node_and_core_context_windows(comfy, latents, comfy_reference):
    """VideoCrafter (text only: nothing per frame to cut but the latent) through both window paths."""
    if not (comfy_reference / "tiny_vc2" / "model.safetensors").is_file():
        pytest.skip("no tiny VideoCrafter2 checkpoint in the reference folder")
    frames = 20

    def t2v(sets):
        return prepare_prompt(load_workflow(WORKFLOWS / "VideoCrafter text to video.json"), comfy.node_classes,
                              "vc2_tiny.safetensors", [], W, H, frames, 2, sets)
    ddim, n = run(comfy, latents, t2v(["DynamiCrafterDDIMSampler.context_window=8",
                                       "DynamiCrafterDDIMSampler.context_overlap=2"]))
    assert n == frames and ddim.shape[2] == frames and torch.isfinite(ddim).all()
    prompt = t2v([])
    sampler_id = next(k for k, v in prompt.items() if v["class_type"] == "DynamiCrafterDDIMSampler")
    loader_id = next(k for k, v in prompt.items() if v["class_type"] == "DynamiCrafterLoader")
    prompt["900"] = {"class_type": "ContextWindowsManual", "inputs": {
        "model": [loader_id, 0], "context_length": 8, "context_overlap": 2, "context_schedule": "standard_static",
        "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "dim": 2}}
    old = prompt[sampler_id]["inputs"]
    prompt[sampler_id] = {"class_type": "KSampler", "inputs": {
        "model": ["900", 0], "positive": old["positive"], "negative": old["negative"],
        "latent_image": old["latent_image"], "seed": 1, "steps": 2, "cfg": 7.5, "sampler_name": "euler",
        "scheduler": "simple", "denoise": 1.0}}
    core, n = run(comfy, latents, prompt)
    assert n == frames and core.shape[2] == frames and torch.isfinite(core).all()


# ------------------------------------------------------------------------------ core Context Windows (Manual)
def test_context_windows_workflow_is_core_context_windows_on_the_time_axis():
    wf = json.loads((WORKFLOWS / "Long shot - context windows.json").read_text())
    cw = next(n for n in wf["nodes"] if n["type"] == "ContextWindowsManual")
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    assert cw["widgets_values"][-1] == 2                               # dim: (b, c, T, h, w)
    assert cw["widgets_values"][0] < next(n for n in wf["nodes"] if n["type"] == "DynamiCrafterImageConditioning"
                                          )["widgets_values"][2]       # windows shorter than the video
    link = next(lk for lk in wf["links"] if lk[3] == ks["id"] and lk[4] == 0)
    assert link[1] == cw["id"]                                         # KSampler samples the windowed MODEL
    loader = next(n for n in wf["nodes"] if n["type"] == "DynamiCrafterLoader")
    assert loader["properties"]["models"][0]["name"] == "dynamicrafter_512.ckpt"


def test_core_context_windows_workflow_runs_our_model_in_the_executor(comfy, latents, monkeypatch):
    from nodes_pack_access import pack
    model_cls = pack("comfy_model").DynamiCrafterBaseModel
    cuts = []
    real = model_cls.window_conds

    def recording(self, x, c_concat, c_crossattn, transformer_options):
        out = real(self, x, c_concat, c_crossattn, transformer_options)
        window = transformer_options.get("context_window")
        cuts.append((None if window is None else list(window.index_list), tuple(c_concat.shape),
                     tuple(out[0].shape), c_crossattn, out[1]))
        return out
    monkeypatch.setattr(model_cls, "window_conds", recording)

    wf = "Long shot - context windows.json"
    windows_off = tiny_prompt(comfy, wf, sets=[f"ContextWindowsManual.context_length={T}"])
    plain_prompt = copy.deepcopy(windows_off)
    cw_id = next(k for k, v in plain_prompt.items() if v["class_type"] == "ContextWindowsManual")
    ks = next(v for v in plain_prompt.values() if v["class_type"] == "KSampler")
    ks["inputs"]["model"] = plain_prompt.pop(cw_id)["inputs"]["model"]      # plain core KSampler, no windows
    plain, n_plain = run(comfy, latents, plain_prompt)
    same, _ = run(comfy, latents, windows_off)
    assert n_plain == T and torch.equal(same, plain)                   # windows >= frames: plain KSampler
    assert all(c[0] is None for c in cuts)

    cuts.clear()
    windowed, n = run(comfy, latents, tiny_prompt(comfy, wf, sets=["ContextWindowsManual.context_length=4",
                                                                  "ContextWindowsManual.context_overlap=2"]))
    assert n == T and windowed.shape == plain.shape and torch.isfinite(windowed).all()
    assert not torch.equal(windowed, plain)
    windows = {tuple(c[0]) for c in cuts}
    assert windows == {(0, 1, 2, 3), (2, 3, 4, 5), (4, 5, 6, 7)}        # standard_static, every frame covered
    for idx, full, cut, ctx, ctx_cut in cuts:
        assert full[2] == T and cut[2] == 4
        tokens = 16 * T           # the tiny model's resampler makes 16 tokens per frame of its 8 frames
        assert ctx.shape[1] == 77 + tokens and ctx_cut.shape[1] == 77 + 16 * 4
        image = ctx[:, 77:].unflatten(1, (T, 16))[:, idx].flatten(1, 2)
        assert torch.equal(ctx_cut[:, 77:], image) and torch.equal(ctx_cut[:, :77], ctx[:, :77])

    with pytest.raises(comfy_runtime.PromptFailed, match="set 'Context Windows \\(Manual\\)' dim to 2"):
        comfy.run(tiny_prompt(comfy, wf, sets=["ContextWindowsManual.context_length=2",   # along the channels
                                               "ContextWindowsManual.context_overlap=0", "ContextWindowsManual.dim=1"]))
