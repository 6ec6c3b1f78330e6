"""Guidance branches share one UNet call (layers before the first cross-attention run once) and
large blocks run a few videos at a time without autograd: both must equal plain separate calls."""
import torch

import dynamicrafter
from dynamicrafter.models import unet as unet_mod
from dynamicrafter.config import tiny_config


def test_shared_prefix_and_video_slicing_equal_separate_calls(monkeypatch):
    torch.manual_seed(0)
    dc = dynamicrafter.DynamiCrafter(tiny_config(frames=4)).eval()
    with torch.no_grad():
        for p in dc.parameters():   # official zero-inits would hide a wiring error
            p.add_(torch.randn_like(p) * 0.02)
    b, k = 2, 3
    x = torch.randn(b, 4, 4, 8, 8)
    concat = torch.randn(b, 4, 4, 8, 8)
    t = torch.tensor([900, 20])
    fs = torch.tensor([24, 10])
    contexts = torch.randn(k * b, 77 + 64, 64)
    with torch.no_grad():
        separate = torch.cat([dc.denoise(x, t, contexts[i * b:(i + 1) * b], concat, fs) for i in range(k)])
        shared = dc.denoise(x, t, contexts, concat, fs)
        monkeypatch.setattr(unet_mod, "SLICE_ELEMENTS", 1000)   # force one video per slice
        sliced = dc.denoise(x, t, contexts, concat, fs)
    torch.testing.assert_close(shared, separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced, separate, rtol=1e-5, atol=1e-5)
    # with autograd (training) nothing is sliced and gradients flow through the shared prefix
    out = dc.denoise(x, t, contexts, concat, fs)
    out.square().mean().backward()
    assert dc.unet.input_blocks[0][0].weight.grad is not None
