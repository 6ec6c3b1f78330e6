"""The UNet / resampler layer namespace (dynamicrafter/models/ops.py) and fp8 weight storage in the library."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dynamicrafter
from dynamicrafter.models import ops
from dynamicrafter.models.unet import UNet3D

# Single UNet forward of the tiny reference model, weights stored low vs fp32 (measured on this
# CPU, fp32 compute): RMS error relative to the output's RMS 0.0010 (fp16), 0.0087 (bf16),
# 0.139 (fp8_e4m3fn), 0.256 (fp8_e5m2). They scale with the format's unit roundoff (2^-11, 2^-8,
# 2^-4, 2^-3): fp8's 3 (2) mantissa bits. Bounds ~1.4x the measured figures.
RMS_BOUND = {torch.float16: 0.0015, torch.bfloat16: 0.013, torch.float8_e4m3fn: 0.2, torch.float8_e5m2: 0.36}


def _layer_classes(module: nn.Module) -> set:
    return {type(m) for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                                                  nn.GroupNorm, nn.LayerNorm))}


def test_default_layers_are_torch_nn():
    with torch.device("meta"):
        dc = dynamicrafter.DynamiCrafter(dynamicrafter.tiny_config(frames=2))
    classes = _layer_classes(dc.unet) | _layer_classes(dc.resampler)
    assert classes == {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, ops.GroupNorm32}


def test_injected_namespace_builds_every_layer():
    cfg = dynamicrafter.tiny_config(frames=2)
    with torch.device("meta"):
        unet = UNet3D(cfg.unet, operations=ops.cast)
    classes = _layer_classes(unet)
    assert classes == {ops.cast.Linear, ops.cast.Conv1d, ops.cast.Conv2d, ops.cast.Conv3d, ops.cast.GroupNorm,
                       ops.cast.LayerNorm, ops.float32_group_norm(ops.cast.GroupNorm)}
    assert ops.active() is nn          # the namespace is only active while building
    with torch.device("meta"):
        dc = dynamicrafter.DynamiCrafter(cfg, operations=ops.cast)
    assert ops.cast.Linear in _layer_classes(dc.resampler) and ops.cast.Linear in _layer_classes(dc.unet)


def _forward(dc, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 4
    x = torch.randn(1, 4, t, 8, 8, generator=g)
    concat = torch.randn(1, 4, t, 8, 8, generator=g)
    tokens = torch.randn(1, 257, dc.cfg.resampler.embedding_dim, generator=g)
    with torch.no_grad():
        ctx = dc.image_context(tokens)
        text = torch.randn(1, 77, ctx.shape[-1], generator=g)
        return dc.denoise(x, torch.tensor([500]), torch.cat([text, ctx], 1), concat=concat, fs=torch.tensor([10]))


@pytest.fixture(scope="module")
def tiny_path():
    from conftest import _reference_file
    return _reference_file("tiny_v", "model.safetensors")


@pytest.fixture(scope="module")
def fp32_out(tiny_path):
    return _forward(dynamicrafter.load_model(tiny_path))


def test_casting_layers_compute_exactly_what_plain_layers_do(tiny_path, fp32_out):
    dc = dynamicrafter.load_model(tiny_path, operations=ops.cast)
    assert torch.equal(_forward(dc), fp32_out)


def _unet_bytes(dc) -> int:
    return sum(t.numel() * t.element_size() for t in dc.unet.state_dict().values())


@pytest.mark.parametrize("weight_dtype", list(RMS_BOUND))
def test_low_precision_weights(tiny_path, fp32_out, weight_dtype):
    """Weights stored in fp16 / bf16 / fp8, computed in fp32: the matrices take the stored dtype
    (fp8: about half of fp16's bytes), the error is bounded as measured."""
    dc = dynamicrafter.load_model(tiny_path, weight_dtype=weight_dtype)
    conv = dc.unet.input_blocks[1][0].in_layers[2]
    assert conv.weight.dtype == weight_dtype and conv.bias.dtype == torch.float32
    assert dc.dtype == torch.float32 and dc.resampler.latents.dtype == torch.float32
    out = _forward(dc)
    assert out.dtype == torch.float32
    rms = float((out - fp32_out).pow(2).mean().sqrt() / fp32_out.pow(2).mean().sqrt())
    assert 0 < rms <= RMS_BOUND[weight_dtype], rms
    if weight_dtype in ops.FP8_DTYPES:
        fp16 = sum(t.numel() * 2 for t in dc.unet.state_dict().values())
        assert _unet_bytes(dc) <= 0.52 * fp16, (_unet_bytes(dc), fp16)   # tiny model: 0.507 (biases, norms)
