"""VideoCrafter2 text-to-video through the same library and API (design §11):
parity with the official VideoCrafter code's tensors in ../shared/reference/tiny_vc2."""

import pytest
import torch
from conftest import _reference_file, assert_close_to_ref, load_reference, unet_block_outputs

import dynamicrafter

PROMPT = "a red ball rolling across a wooden table, cinematic lighting"


@pytest.fixture(scope="module")
def ref_vc2():
    return load_reference("tiny_vc2")


def test_variant_detected_from_keys(ref_vc2):
    dc, ref, _ = ref_vc2
    v = dc.variant
    assert (v["family"], v["parameterization"], v["zero_snr"], v["use_scale"], v["image_cross_attention"]) == \
        ("videocrafter", "eps", False, True, False)
    assert v["spacing"] == "uniform" and v["default_fs"] == 28
    assert dc.image_encoder is None and dc.resampler is None and dc.unet.cfg.in_channels == 4
    assert torch.equal(dc.alphas_cumprod, ref["schedule.alphas_cumprod"])
    assert torch.equal(dc.scale_arr, ref["schedule.scale_arr"])


def test_text_and_unet(ref_vc2):
    dc, ref, _ = ref_vc2
    with torch.no_grad():
        assert_close_to_ref(dc.encode_text([PROMPT]), ref["text.prompt_emb"])
        assert_close_to_ref(dc.encode_text([""]), ref["text.empty_emb"])
        out, debug = unet_block_outputs(dc.unet, ref["unet.x_t"], ref["unet.t"], ref["unet.context"], ref["unet.fps"])
        for name in [k.removeprefix("unet.debug.") for k in ref if k.startswith("unet.debug.")]:
            assert_close_to_ref(debug[name], ref[f"unet.debug.{name}"], name=name)
        assert_close_to_ref(out, ref["unet.out"])
        assert_close_to_ref(dc.denoise(ref["unet.x_t"], ref["unet.t"], ref["unet.context"], None, ref["unet.fps"]),
                            ref["unet.out"])
        assert_close_to_ref(dc.denoise(ref["unet.x_t"], ref["unet.t"], ref["unet.context"], None, None),
                            ref["unet_fps_default.out"], name="fps=None -> 16")


@pytest.mark.parametrize("case", ["A", "B"])
def test_ddim_cases(ref_vc2, case):
    dc, ref, manifest = ref_vc2
    spec = next(c for c in manifest["cases"] if c["id"] == case)
    k = f"case{case}."
    steps = []
    with torch.no_grad():
        out = dynamicrafter.sample_ddim(dc, ref[k + "x_T"], ref[k + "cond.c_crossattn"], ref[k + "uncond.c_crossattn"],
                                        None, concat=None, fs=ref[k + "fps"], steps=spec["steps"],
                                        cfg_text=spec["cfg_scale"], eta=spec["eta"], spacing="uniform",
                                        callback=lambda i, n, x, x0: steps.append(x))
        for i, x in enumerate(steps):
            assert_close_to_ref(x, ref[f"{k}step{i:02d}.x_prev"], rel=1e-3, name=f"step {i}")
        assert_close_to_ref(out, ref[k + "samples"], rel=1e-3)
        assert_close_to_ref(dc.decode(out), ref[k + "video"], rel=1e-3)


def test_text_to_video_pipeline_refuses_an_image_model_without_image(ref_v):
    dc = ref_v[0]
    with pytest.raises(ValueError, match="give it an image"):
        dynamicrafter.animate(dc, None, "a prompt", frames=2, height=64, width=64, steps=1)


def test_text_to_video_animate_and_cli(ref_vc2, tmp_path):
    dc = ref_vc2[0]
    video = dynamicrafter.animate(dc, None, PROMPT, frames=4, height=64, width=64, steps=3, seed=1)
    assert video.shape == (1, 3, 4, 64, 64) and torch.isfinite(video).all()
    from dynamicrafter.cli import main
    out = tmp_path / "t2v.mp4"
    assert main(["animate", "--ckpt", str(_reference_file("tiny_vc2", "model.safetensors")), "--prompt", PROMPT,
                 "--frames", "4", "--height", "64", "--width", "64", "--steps", "2", "--out", str(out)]) == 0
    assert dynamicrafter.video.read_video(out).shape == (4, 64, 64, 3)
