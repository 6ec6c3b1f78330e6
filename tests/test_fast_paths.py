"""The UNet's fast paths against eager on the tiny model: regional torch.compile (fullgraph per
block, no recompiles across timesteps / fs, stated bounds) and the attention-function hook a host
(ComfyUI) installs. Eager fp32 itself is the parity path (test_parity.py) and is not touched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import dynamicrafter
from dynamicrafter.models import attention as attention_mod
from dynamicrafter.config import tiny_config
from dynamicrafter.models.speed import compile_unet, is_compiled, regions, uncompile_unet
from dynamicrafter.models.unet import ResBlock, SpatialTransformer


def tiny(frames=2):
    torch.manual_seed(0)
    dc = dynamicrafter.DynamiCrafter(tiny_config(frames=frames)).eval()
    with torch.no_grad():
        for p in dc.parameters():   # official zero-inits would hide a wiring error
            p.add_(torch.randn_like(p) * 0.02)
    return dc


def inputs(frames=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, frames, 8, 8, generator=g)
    concat = torch.randn(1, 4, frames, 8, 8, generator=g)
    ctx = torch.randn(2, 77 + 16 * frames, 64, generator=g)     # two guidance branches, one call
    return x, concat, ctx


def test_regional_compile_is_fullgraph_exact_and_never_recompiles_across_steps():
    """Dynamo's own backend ("eager") isolates what compile_unet adds: every block traces as one
    graph (fullgraph=True raises on a break), replays the eager ops exactly, and a later step at
    another timestep and fs reuses the graphs (error_on_recompile raises otherwise)."""
    from torch._dynamo.utils import counters
    dc, (x, concat, ctx) = tiny(), inputs()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = [dc.denoise(x, torch.tensor([t]), ctx, concat, torch.tensor([fs])) for t, fs in ((900, 24), (300, 10))]
        compile_unet(dc, backend="eager")
        assert is_compiled(dc) and len(regions(dc.unet)) > 10
        first = dc.denoise(x, torch.tensor([900]), ctx, concat, torch.tensor([24]))
        graphs = counters["stats"]["unique_graphs"]
        assert 0 < graphs <= len(regions(dc.unet))      # blocks of one class and shape share a graph
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = dc.denoise(x, torch.tensor([300]), ctx, concat, torch.tensor([10]))
        assert counters["stats"]["unique_graphs"] == graphs
    torch.testing.assert_close(first, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(second, ref[1], rtol=0, atol=0)
    uncompile_unet(dc)
    assert not is_compiled(dc)
    torch._dynamo.reset()


def test_inductor_blocks_stay_within_fp32_rounding_of_eager():
    """Inductor fuses and reorders float32 arithmetic: a ResBlock (GroupNorm32, SiLU, 3x3 convs,
    the temporal conv stack) and a SpatialTransformer (LayerNorm, attention, GEGLU) stay within
    2e-5 of eager relative to the output's magnitude (measured: about 1e-6)."""
    dc = tiny(frames=4)
    res = next(m for m in regions(dc.unet) if isinstance(m, ResBlock) and hasattr(m, "temopral_conv"))
    st = next(m for m in regions(dc.unet) if isinstance(m, SpatialTransformer))
    g = torch.Generator().manual_seed(2)
    xr = torch.randn(4, res.in_layers[2].in_channels, 8, 8, generator=g)
    emb = torch.randn(4, res.emb_layers[1].in_features, generator=g)
    xs = torch.randn(4, st.norm.num_channels, 8, 8, generator=g)
    ctx = torch.randn(4, 77 + 16, 64, generator=g)
    torch._dynamo.reset()
    with torch.no_grad():
        ref_r, ref_s = res(xr, emb, 4), st(xs, ctx)
        res.compile(fullgraph=True, dynamic=False)
        st.compile(fullgraph=True, dynamic=False)
        out_r, out_s = res(xr, emb, 4), st(xs, ctx)
    for out, ref in ((out_r, ref_r), (out_s, ref_s)):
        err = float((out - ref).abs().max() / ref.abs().max())
        assert err < 2e-5, err
    torch._dynamo.reset()


def test_compile_unet_names_what_it_needs():
    with pytest.raises(TypeError, match="DynamiCrafter model or its UNet3D"):
        compile_unet(torch.nn.Linear(2, 2))


def test_attention_function_hook_reaches_every_unet_attention_and_is_restored():
    """A host's attention (ComfyUI's optimized_attention) replaces the built-in SDPA in every
    self/cross attention of the UNet while installed; SDPA in the same layout gives the same
    output bit for bit, and leaving the block restores the built-in path."""
    dc, (x, concat, ctx) = tiny(), inputs()
    calls = []

    def host_sdpa(q, k, v, heads):
        calls.append(q.shape)
        q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    args = (x, torch.tensor([500]), ctx, concat, torch.tensor([24]))
    with torch.no_grad():
        ref = dc.denoise(*args)
        with attention_mod.attention_function(host_sdpa):
            hooked = dc.denoise(*args)
        assert attention_mod._OVERRIDE is None
        n = len(calls)
        again = dc.denoise(*args)
    assert n > 0 and len(calls) == n
    n_attn = sum(1 for m in dc.unet.modules() if type(m).__name__ == "CrossAttention")
    assert n >= n_attn          # every attention layer (image cross-attention: two calls)
    torch.testing.assert_close(hooked, ref, rtol=0, atol=0)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
