"""What the CPU can show of running on GPUs that lack float64 (Apple MPS) or draw noise on
another device: no float64 torch op while sampling or decoding (a TorchFunctionMode that fails on
any float64 input or output), no float64 buffer on a loaded model, the VAE's posterior noise
from a CPU generator whatever the model's device, and the device/dtype helper."""
from __future__ import annotations

import pytest
import torch
from conftest import _reference_file, load_reference
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import dynamicrafter
from dynamicrafter import devices
from dynamicrafter.models.tooncrafter import decode_keyframe_clip
from dynamicrafter.models.vae import posterior_sample

PROMPT = "a boat drifts across a calm lake"


def _is_f64(x) -> bool:
    return x is torch.float64 or (isinstance(x, torch.Tensor) and x.dtype == torch.float64)


class NoFloat64(TorchFunctionMode):
    """Raises on the first torch function whose inputs or outputs hold a float64 tensor (or that is
    asked for dtype float64): what MPS cannot run."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(_is_f64(x) for x in tree_leaves((args, kwargs))):
            raise AssertionError(f"float64 torch op: {getattr(func, '__qualname__', func)} (a float64 input)")
        out = func(*args, **kwargs)
        if any(_is_f64(x) for x in tree_leaves(out)):
            raise AssertionError(f"float64 torch op: {getattr(func, '__qualname__', func)} (a float64 output)")
        return out


@pytest.fixture(scope="module")
def tiny_v():
    return load_reference("tiny_v")[0]


@pytest.fixture(scope="module")
def tiny_toon():
    dc = dynamicrafter.load_model(_reference_file("tiny_toon", "model.safetensors"),
                                  config=_reference_file("tiny_toon", "config.yaml"))
    return dc, load_reference("tiny_toon")[1]


def _image(seed: int, h: int = 64, w: int = 128) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(dc, frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, frames, 8, 16, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the mode itself

def test_the_mode_fails_on_float64_inputs_outputs_and_requests():
    x = torch.ones(3)
    with NoFloat64():
        (x * 2).sum()                       # float32 passes
        for op in (lambda: x.double(), lambda: x.to(torch.float64), lambda: torch.zeros(2, dtype=torch.float64)):
            with pytest.raises(AssertionError, match="float64 torch op"):
                op()
    y = torch.ones(2, dtype=torch.float64)
    with NoFloat64(), pytest.raises(AssertionError, match="float64 input"):
        y + 1


# ----------------------------------------------------------------------------- decoding (this branch)

def test_models_hold_no_float64_tensors(tiny_v, tiny_toon):
    for dc in (tiny_v, tiny_toon[0]):
        tensors = [*dc.named_parameters(), *dc.named_buffers(), *dc.state_dict().items()]   # non-persistent too
        f64 = [k for k, v in tensors if v.dtype == torch.float64]
        assert not f64, f64


def test_dynamicrafter_encode_and_decode_run_no_float64_op(tiny_v):
    with torch.inference_mode(), NoFloat64():
        z = tiny_v.encode_first_stage(_image(0), generator=torch.Generator().manual_seed(1))
        video = tiny_v.decode(_latents(tiny_v, 3))
        tiled = tiny_v.decode(_latents(tiny_v, 2), tile=8)
    assert z.shape == (1, 4, 8, 16) and video.shape == (1, 3, 3, 64, 128) and tiled.shape == (1, 3, 2, 64, 128)


def test_tooncrafter_decode_runs_no_float64_op(tiny_toon):
    """The dual-reference decoder's clip-wide GroupNorm statistics ran ~4,900 float64 ops per
    full-size decode; the references, the decode and the official middle re-decode run none now."""
    dc, ref = tiny_toon
    t = dc.variant["frames"]
    with torch.inference_mode(), NoFloat64():
        refs = dc.encode_references(ref["input.image_first"], ref["input.image_last"])
        video = decode_keyframe_clip(dc, _latents(dc, t), refs, frames_per_batch=3)
    assert video.shape == (1, 3, t, 64, 128) and torch.isfinite(video).all()


# ----------------------------------------------------------------------------- sampling + decoding
# Both need the sampler without float64 (h-noise's sampling.py change): they fail in sampling until then.

def test_dynamicrafter_animate_runs_no_float64_op(tiny_v):
    with NoFloat64():
        video = dynamicrafter.animate(tiny_v, _image(2), PROMPT, height=64, width=128, steps=2, eta=1.0,
                                      cfg_img=1.5, seed=4)
    assert torch.isfinite(video).all()


def test_tooncrafter_animate_runs_no_float64_op(tiny_toon):
    dc, ref = tiny_toon
    with NoFloat64():
        video = dynamicrafter.animate(dc, ref["input.image_first"], PROMPT, end_image=ref["input.image_last"],
                                      height=64, width=128, steps=2, eta=1.0, seed=3)
    assert torch.isfinite(video).all()


# ----------------------------------------------------------------------------- VAE noise

class RecordDraws(TorchFunctionMode):
    """Notes the device every torch.randn is asked to draw on."""

    def __init__(self):
        super().__init__()
        self.devices = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn:
            self.devices.append(torch.device(kwargs.get("device") or "cpu").type)
        return func(*args, **kwargs)


def test_posterior_noise_comes_from_the_generators_device():
    """A CPU generator (core ComfyUI's convention) with moments on another device: the draw is
    made on the CPU and moved ('meta' stands in for a GPU; drawing on CUDA with a CPU generator raises)."""
    moments = torch.randn(2, 8, 4, 4)
    got = posterior_sample(moments, generator=torch.Generator().manual_seed(7))
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, mean + torch.exp(0.5 * logvar) * noise)
    with RecordDraws() as draws:
        on_meta = posterior_sample(moments.to("meta"), generator=torch.Generator().manual_seed(7))
    assert draws.devices == ["cpu"]
    assert on_meta.device.type == "meta" and on_meta.shape == mean.shape


# ----------------------------------------------------------------------------- device / dtype helper

def test_compute_dtype_per_device(monkeypatch):
    assert devices.compute_dtype("cpu") == torch.float32
    assert isinstance(devices.autocast("cpu"), type(devices.autocast("cpu", torch.float32)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.compute_dtype("cuda") == torch.bfloat16 and devices.compute_dtype("cuda:1") == torch.bfloat16
    assert devices.default_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert devices.compute_dtype("cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: major <= 13)
    assert devices.compute_dtype("mps") == torch.float16          # macOS 13: no bf16 on MPS
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True)
    assert devices.compute_dtype("mps") == torch.bfloat16
    with devices.autocast("cpu", torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
