"""Checkpoint formats and variants: full-size official layouts, Lightning
.ckpt with extras, DeepSpeed dicts, fp16/bf16 safetensors, pruned files, old key names, the
256 gates, eps models, and clear errors for files that are not DynamiCrafter."""
import csv
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

import dynamicrafter
from dynamicrafter import CheckpointError
from dynamicrafter.checkpoints.loader import model_from_state_dict
from dynamicrafter.config import PRESETS, tiny_config
from dynamicrafter.sampling.schedule import schedule_buffers

import comfy_runtime
from conftest import _reference_file

LAYOUTS = comfy_runtime.reference_dir() / "layouts"
EXPECTED = {  # layout -> (detected name, parameterization, zero_snr, rescale base, default fs, fs meaning)
    "256": ("256", "eps", False, None, 3, "frame_stride"),
    "512": ("512", "v", True, 0.7, 24, "fps"),
    "1024": ("1024", "v", True, 0.3, 10, "fps"),
    "512_interp": ("512", "v", True, 0.7, 24, "fps"),   # same weights layout as 512: override to pick interp
}
CONFIG_OF_LAYOUT = {"256": (False, "eps", None), "512": (True, "v", 0.7), "1024": (True, "v", 0.3),
                    "512_interp": (True, "v", 0.7)}


def layout_state_dict(name):
    """Meta tensors of the real full-size checkpoint's shapes; the small schedule buffers get
    the values the official code stores for that config."""
    path = LAYOUTS / f"full_{name}_keys.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found (shared reference layouts)")
    zero_snr, param, base = CONFIG_OF_LAYOUT[name]
    buffers = schedule_buffers(zero_snr, param, base)
    sd = {}
    with open(path) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            shape = json.loads(row["shape"])
            sd[row["key"]] = buffers[row["key"]] if row["kind"] == "buffer" else torch.empty(shape, device="meta")
    return sd


@pytest.mark.parametrize("name", list(EXPECTED))
def test_full_size_official_layouts_build_with_every_key(name):
    sd = layout_state_dict(name)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    model = model_from_state_dict(dict(sd), device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    v = model.variant
    assert (v["name"], v["parameterization"], v["zero_snr"], v["dynamic_rescale_base"], v["default_fs"],
            v["fs_meaning"]) == EXPECTED[name]
    unet_params = sum(p.numel() for p in model.unet.parameters())
    assert unet_params == (1_438_854_996 if name == "256" else 1_438_854_980)
    cfg = model.cfg
    assert cfg.unet.num_head_channels == 64 and cfg.text.text_heads == 16 and cfg.vision.vision_heads == 16
    assert cfg.resampler.heads == 12 and cfg.resampler.video_length == 16


def test_interp_override_sets_interp_defaults():
    model = model_from_state_dict(layout_state_dict("512_interp"), device="meta",
                                  variant_overrides={"name": "512_interp"})
    assert model.variant["name"] == "512_interp" and model.variant["default_fs"] == 10
    assert model.variant["parameterization"] == "v"   # the weights' schedule is kept
    assert model.unet.cfg.default_fs == 10


# ----------------------------------------------------------------------------- tiny variants

class LightningHParams:
    """Stands for the OmegaConf/Lightning objects a real .ckpt pickles beside the weights."""

    def __init__(self, lr):
        self.lr = lr


class Exploit:
    """A pickle that would run a command if the loader executed pickled code (through a module
    torch does not block, so the loader must neutralise it itself)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


class ShellExploit(Exploit):
    """The same through os.system: torch never loads a file naming it, neither do we."""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = dynamicrafter.DynamiCrafter(cfg).eval()
    with torch.no_grad():   # official zero-inits (out convs, gates) would hide wiring bugs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _denoise_once(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    t_frames = cfg.variant.frames
    x = torch.randn(1, 4, t_frames, 8, 8, generator=g)
    n_ctx = 77 + (16 * t_frames if cfg.resampler else 0)
    ctx = torch.randn(1, n_ctx, cfg.unet.context_dim, generator=g)
    concat = torch.randn(1, 4, t_frames, 8, 8, generator=g) if cfg.unet.in_channels == 8 else None
    with torch.no_grad():
        return model.denoise(x, torch.tensor([500]), ctx, concat, torch.tensor([3]))


@pytest.fixture(scope="module")
def tiny_256_style():
    """eps, no zero-SNR, learnable tanh gates: the 256 model in miniature."""
    cfg = tiny_config(parameterization="eps", zero_snr=False, dynamic_rescale_base=None,
                      default_fs=3, fs_meaning="frame_stride")
    cfg = replace(cfg, unet=replace(cfg.unet, image_gate=True, default_fs=3))
    return _random_model(cfg)


def test_lightning_ckpt_with_extras_and_old_key_name_loads_without_running_code(tmp_path, tiny_256_style):
    model = tiny_256_style
    sd = {k.replace("fps_embedding.", "framestride_embed."): v for k, v in model.state_dict().items()}
    assert any("framestride_embed" in k for k in sd) and any(k.endswith("attn2.alpha") for k in sd)
    marker = tmp_path / "pwned"
    ckpt = {"state_dict": sd, "epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.9.3",
            "hyper_parameters": LightningHParams(1e-4), "callbacks": {"ModelCheckpoint": {"best": None}},
            "optimizer_states": [Exploit(marker)]}
    path = tmp_path / "dc256_tiny.ckpt"
    torch.save(ckpt, path)
    loaded = dynamicrafter.load_model(path)
    assert not marker.exists(), "loading executed code from the checkpoint"
    v = loaded.variant
    assert (v["parameterization"], v["zero_snr"], v["dynamic_rescale_base"], v["fs_meaning"], v["default_fs"]) == \
        ("eps", False, None, "frame_stride", 3)
    assert loaded.cfg.unet.image_gate
    assert torch.equal(_denoise_once(loaded), _denoise_once(model))
    ckpt["optimizer_states"] = [ShellExploit(marker)]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="posix.system"):
        dynamicrafter.load_model(path)
    assert not marker.exists(), "loading executed code from the checkpoint"


def test_gate_is_tanh_alpha_plus_one(tiny_256_style):
    from dynamicrafter.models.unet import CrossAttention
    attn = next(m for m in tiny_256_style.unet.modules() if isinstance(m, CrossAttention) and hasattr(m, "alpha"))
    x, ctx = torch.randn(2, 5, attn.to_q.in_features), torch.randn(2, 77 + 16, attn.to_k.in_features)
    with torch.no_grad():
        attn.alpha.fill_(0.3)
        gated = attn(x, ctx)
        attn.alpha.fill_(0.0)
        plain = attn(x, ctx)
        attn.alpha.fill_(-100.0)   # tanh -> -1: the image branch vanishes
        text_only = attn(x, ctx)
    # out = to_out(text + g*img) is affine in g: gated - text_only = (tanh(.3)+1) * (plain - text_only)
    g = torch.tanh(torch.tensor(0.3)) + 1
    torch.testing.assert_close(gated - text_only, g * (plain - text_only), rtol=1e-4, atol=1e-5)


def test_bare_and_deepspeed_dicts(tmp_path):
    model = _random_model(tiny_config())
    sd = model.state_dict()
    torch.save(sd, tmp_path / "bare.pt")
    torch.save({"module": {"_forward_module." + k: v for k, v in sd.items()}}, tmp_path / "ds.ckpt")
    ref = _denoise_once(model)
    for name in ("bare.pt", "ds.ckpt"):
        assert torch.equal(_denoise_once(dynamicrafter.load_model(tmp_path / name)), ref), name


def test_vae_norm_groups_travel_in_the_file(tmp_path):
    """A small VAE's GroupNorm group count is not in its weights: it must come back from the
    file's config metadata, or every decode would silently change."""
    cfg = tiny_config()
    cfg = replace(cfg, vae=replace(cfg.vae, norm_groups=8))
    model = _random_model(cfg)
    assert model.first_stage_model.decoder.norm_out.num_groups == 8
    back = dynamicrafter.load_model(dynamicrafter.save_checkpoint(model, tmp_path / "g8.safetensors"))
    assert back.cfg.vae.norm_groups == 8
    z = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.decode(z)
        assert torch.equal(back.decode(z), ref)
        model.first_stage_model.apply(
            lambda m: setattr(m, "num_groups", 32) if isinstance(m, torch.nn.GroupNorm) else None)
        assert (model.decode(z) - ref).abs().max() > 1e-3     # the count matters


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_reduced_precision_files_and_inference(tmp_path, dtype, tol):
    """fp16/bf16 files load; inference in that dtype stays within `tol` (relative to the output's
    max) of fp32 on the tiny model."""
    model = _random_model(tiny_config())
    path = dynamicrafter.save_checkpoint(model, tmp_path / "half.safetensors", dtype=dtype)
    half = dynamicrafter.load_model(path, dtype=dtype)
    assert half.dtype == dtype and half.alphas_cumprod.dtype == torch.float32
    ref = _denoise_once(model)
    out = _denoise_once(half)
    assert out.dtype == torch.float32
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < tol, f"{dtype}: relative error {err:.2e}"
    # fp32 load of the half file: only the weight rounding differs
    assert (_denoise_once(dynamicrafter.load_model(path)) - ref).abs().max() / ref.abs().max() < tol


def test_pruned_unet_and_resampler_file(tmp_path, tiny_v_state_dict):
    sd = {k: v for k, v in tiny_v_state_dict.items()
          if k.startswith(("model.diffusion_model.", "image_proj_model."))}
    save_file({k.removeprefix("model."): v.half() for k, v in sd.items()}, str(tmp_path / "pruned.safetensors"))
    model = dynamicrafter.load_model(tmp_path / "pruned.safetensors")
    assert model.vae is None and model.text_encoder is None and model.image_encoder is None
    assert model.variant["parameterization"] == "v" and model.variant["zero_snr"]
    with pytest.raises(dynamicrafter.MissingComponentError, match="no VAE"):
        model.decode(torch.zeros(1, 4, 2, 8, 8))


def test_variant_override_changes_schedule():
    model = model_from_state_dict(layout_state_dict("512"), device="meta",
                                  variant_overrides={"parameterization": "eps", "zero_snr": False})
    assert model.variant["parameterization"] == "eps" and not model.variant["zero_snr"]
    with pytest.raises(ValueError, match="unknown variant fields"):
        model_from_state_dict(layout_state_dict("512"), device="meta", variant_overrides={"fps": 3})


# ----------------------------------------------------------------------------- bad files

def test_truncated_file_gives_clear_error(tmp_path, tiny_v_state_dict):
    src = comfy_runtime.reference_dir() / "tiny_v" / "model.safetensors"
    data = src.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or not a model checkpoint"):
        dynamicrafter.load_model(tmp_path / "cut.safetensors")
    torch.save({"state_dict": {k: v for k, v in tiny_v_state_dict.items() if "output_blocks.11" not in k}},
               tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="missing"):
        dynamicrafter.load_model(tmp_path / "partial.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        dynamicrafter.load_model(tmp_path / "nope.ckpt")


def test_foreign_checkpoints_are_named(tmp_path):
    sd_image = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
                "model.diffusion_model.middle_block.0.in_layers.0.weight": torch.zeros(1280)}
    save_file(sd_image, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(CheckpointError, match="image .*checkpoint"):
        dynamicrafter.load_model(tmp_path / "sd15.safetensors")
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="VAE"):
        dynamicrafter.load_model(tmp_path / "vae.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 8, 3, 3),
               "model.diffusion_model.input_blocks.1.0.time_stack.0.weight": torch.zeros(4)},
              str(tmp_path / "svd.safetensors"))
    with pytest.raises(CheckpointError, match="Stable Video Diffusion"):
        dynamicrafter.load_model(tmp_path / "svd.safetensors")


def test_presets_are_consistent():
    assert PRESETS["256"].fs_meaning == "frame_stride" and PRESETS["512"].fs_meaning == "fps"
    assert PRESETS["1024"].dynamic_rescale_base == 0.3 and PRESETS["512"].dynamic_rescale_base == 0.7


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only (a no-op elsewhere)")
def test_converted_file_pages_are_given_back_and_the_file_still_reads(tmp_path):
    """A converted source tensor's file pages leave this process (a 10 GB fp32 file loaded as fp16
    otherwise stays resident until the load ends); the mapping stays valid (read again = same
    values), and a tensor that is not a view of a file is never touched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dynamicrafter.checkpoints.mapped import MappedPages
    save_file({"w": torch.arange(16 * 2**20, dtype=torch.float32)}, str(tmp_path / "w.safetensors"))   # 64 MiB
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        source = f.get_tensor("w")
        anonymous = torch.arange(16 * 2**20, dtype=torch.float32)
        pages = MappedPages()
        touched = _rss_mib()
        half = source.half()                       # reads every page of the file
        assert _rss_mib() - touched > 56           # the 64 MiB of file pages (the fp16 copy may reuse freed memory)
        before = _rss_mib()
        pages.release(source)
        pages.release(anonymous)
        assert before - _rss_mib() > 56 and pages.released > 60 * 2**20
        assert torch.equal(source, anonymous) and torch.equal(half, anonymous.half())


def test_loading_as_fp16_releases_the_fp32_pages(tmp_path):
    """load_model converts tensor by tensor and gives each fp32 source's pages back at once."""
    import dynamicrafter.checkpoints.loader as checkpoint
    released = []
    original = checkpoint.MappedPages

    class Counting(original):
        def release(self, t):
            super().release(t)
            released.append(self.released)
    checkpoint.MappedPages = Counting
    try:
        dc = dynamicrafter.load_model(_reference_file("tiny_v", "model.safetensors"), dtype=torch.float16)
    finally:
        checkpoint.MappedPages = original
    assert dc.unet.time_embed[0].weight.dtype == torch.float16
    assert released and released[-1] > 0.5 * sum(p.numel() * 4 for p in dc.parameters())
