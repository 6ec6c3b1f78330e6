"""The UNet's fast paths against eager on the tiny model: regional torch.compile (fullgraph per
block, no recompiles across timesteps / fs, stated bounds), the attention-function hook a host
(ComfyUI) installs, fused projections, channels-last convolutions, fp8 matrix products and the
one switch over them (prepare_for_speed), each with its stated bound. Eager fp32 itself is the
parity path (test_parity.py) and is not touched."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import dynamicrafter
from dynamicrafter.models import attention as attention_mod
from dynamicrafter.config import tiny_config
from dynamicrafter.models import ops
from dynamicrafter.models.speed import (compile_unet, fuse_projections, is_compiled, is_fused, prepare_for_speed,
                                        regions, uncompile_unet, use_channels_last, use_fp8_matmul)
from dynamicrafter.models.unet import CrossAttention, ResBlock, SpatialTransformer


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


# ------------------------------------------------------------------------------ fused projections

def rel_max(out, ref) -> float:
    return float((out - ref).abs().max() / ref.abs().max())


def rel_rms(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def attentions(dc):
    return [m for m in dc.unet.modules() if isinstance(m, CrossAttention)]


def test_fused_projections_stay_within_bound_keep_the_state_dict_and_follow_weight_changes(tmp_path):
    """fuse_projections: q/k/v of every self-attention and the text / image k/v of every
    cross-attention as one product each, within 1e-5 of eager relative to the output's magnitude
    (measured on the CPU: 0, the same dot products). The official keys and values of the
    state_dict stay, each original weight is a view of its group's one storage (no memory added),
    and what changes weights afterwards reaches the fused product: a LoRA merged by load_lora
    (in place), load_state_dict (a copy into the views) and a swapped Parameter (ComfyUI's weight
    patching). Unfused again, the forward is eager's bit for bit."""
    from safetensors.torch import save_file
    from dynamicrafter.checkpoints.lora import load_lora, lora_key
    dc, (x, concat, ctx) = tiny(), inputs()
    args = (x, torch.tensor([500]), ctx, concat, torch.tensor([24]))
    state = {k: v.clone() for k, v in dc.state_dict().items()}
    with torch.no_grad():
        ref = dc.denoise(*args)
        assert fuse_projections(dc) == len(attentions(dc)) and is_fused(dc)
        fused = dc.denoise(*args)
        assert rel_max(fused, ref) < 1e-5
        after = dc.state_dict()
        assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
        cross = next(a for a in attentions(dc) if a.image_kv)
        qkv = attentions(dc)[0].fused_qkv
        assert attentions(dc)[0].to_k.weight.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
        assert {"fused_kv", "fused_kv_ip"} <= set(vars(cross))

        # a LoRA on one image key projection, merged in place: the fused product sees it
        name = next(n for n, m in dc.unet.named_modules() if m is cross)
        g = torch.Generator().manual_seed(3)
        w = cross.to_k_ip.weight
        lora = {f"{lora_key(name + '.to_k_ip')}.lora_down.weight": torch.randn(2, w.shape[1], generator=g),
                f"{lora_key(name + '.to_k_ip')}.lora_up.weight": torch.randn(w.shape[0], 2, generator=g) * 0.1}
        save_file(lora, str(tmp_path / "lora.safetensors"))
        load_lora(dc, tmp_path / "lora.safetensors")
        with_lora = dc.denoise(*args)
        fuse_projections(dc, False)
        assert rel_max(with_lora, dc.denoise(*args)) < 1e-5 and rel_max(with_lora, ref) > 1e-3
        fuse_projections(dc)

        dc.load_state_dict(state)      # copies into the views: back to the base weights
        torch.testing.assert_close(dc.denoise(*args), fused, rtol=0, atol=0)
        base = cross.to_v_ip.weight.detach().clone()
        cross.to_v_ip.weight = torch.nn.Parameter(base * 2, requires_grad=False)      # a swap
        swapped = dc.denoise(*args)
        assert rel_max(swapped, fused) > 1e-3
        fuse_projections(dc, False)
        assert not is_fused(dc) and rel_max(swapped, dc.denoise(*args)) < 1e-5
        cross.to_v_ip.weight = torch.nn.Parameter(base, requires_grad=False)
        torch.testing.assert_close(dc.denoise(*args), ref, rtol=0, atol=0)


def test_fused_projections_trace_fullgraph_and_match_fused_eager():
    """Under torch.compile the fused groups stack their weights inside the graph (no storage
    bookkeeping to break it): fullgraph per block, the fused eager result exactly under Dynamo."""
    dc, (x, concat, ctx) = tiny(), inputs()
    args = (x, torch.tensor([500]), ctx, concat, torch.tensor([24]))
    torch._dynamo.reset()
    with torch.no_grad():
        fuse_projections(dc)
        ref = dc.denoise(*args)
        compile_unet(dc, backend="eager")
        out = dc.denoise(*args)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = dc.denoise(x, torch.tensor([300]), ctx, concat, torch.tensor([10]))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert again.shape == ref.shape
    uncompile_unet(dc)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ channels-last

def test_channels_last_stays_within_fp32_rounding_and_spares_the_token_copy():
    """use_channels_last: the UNet's activations and every 2-D / 3-D convolution weight (or only
    the activations) channels-last; outputs within 2e-5 of eager relative to the output's
    magnitude (measured on the CPU: 3e-6, other conv kernels). Every spatial transformer then
    gets channels-last input, whose (n, h*w, c) token layout is a view instead of a copy. The
    state_dict holds the same values; off again, eager bit for bit."""
    dc, (x, concat, ctx) = tiny(), inputs()
    args = (x, torch.tensor([500]), ctx, concat, torch.tensor([24]))
    state = {k: v.clone() for k, v in dc.state_dict().items()}
    seen = []
    def record(module, args):
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    hooks = [m.register_forward_pre_hook(record) for m in dc.unet.modules() if isinstance(m, SpatialTransformer)]
    with torch.no_grad():
        ref = dc.denoise(*args)
        assert not all(seen)       # (1x1 frames at the deepest level are both layouts at once)
        seen.clear()
        convs = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) for m in dc.unet.modules())
        assert use_channels_last(dc) == convs
        out = dc.denoise(*args)
        assert seen and all(seen)
        assert rel_max(out, ref) < 2e-5
        assert all(torch.equal(dc.state_dict()[k], v) for k, v in state.items())
        use_channels_last(dc, False)
        torch.testing.assert_close(dc.denoise(*args), ref, rtol=0, atol=0)
        # activations only (ComfyUI's switch): the layout passes from conv to conv, so every level
        # must be wider than 1x1 (ambiguous layout, and upsampled contiguous): a 16x16 latent
        big = [torch.nn.functional.interpolate(t[0], scale_factor=2)[None] for t in (x, concat)]
        big_args = (big[0], torch.tensor([500]), ctx, big[1], torch.tensor([24]))
        big_ref = dc.denoise(*big_args)
        seen.clear()
        assert use_channels_last(dc, weights=False) == 0
        assert rel_max(dc.denoise(*big_args), big_ref) < 2e-5 and all(seen)
        use_channels_last(dc, False)
    for h in hooks:
        h.remove()


# ------------------------------------------------------------------------------ fp8 matrix products

def fp8_copy(dc):
    """The model as load_model(..., weight_dtype=float8_e4m3fn) makes it: matrices stored fp8."""
    from dynamicrafter.checkpoints.loader import model_from_state_dict
    return model_from_state_dict(dict(dc.state_dict()), weight_dtype=torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_stays_within_the_input_rounding_bound(dtype):
    """One fp8 product (input rounded to e4m3 with one per-call scale, weight fp8 as stored)
    against the upcast product of the same fp8 weight: e4m3 rounds each input by at most 2^-4
    relative, an RMS of 2^-4/sqrt(3) = 3.6%; the output's RMS error stays below 4% (measured 2.7%)."""
    if not ops.fp8_matmul_supported(torch.device("cpu")):
        pytest.skip("this torch has no CPU torch._scaled_mm")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 128, generator=g) * 0.05).to(torch.float8_e4m3fn)
    bias = torch.randn(256, generator=g)
    x = torch.randn(4, 77, 128, generator=g).to(dtype)
    out = ops.fp8_linear(x, w, bias)
    ref = F.linear(x.float(), w.float(), bias)
    assert out.dtype == dtype and out.shape == (4, 77, 256)
    assert rel_rms(out, ref) < 0.04


def test_fp8_matmul_picks_fp8_layers_where_supported_and_falls_back_exactly():
    """use_fp8_matmul sets the fp8-stored Linear layers whose sides are multiples of 16 on a
    device with torch._scaled_mm (this CPU: every Linear of the tiny UNet) and none of an
    fp32 model. The UNet output then stays within 15% RMS of the upcast path (measured 11% on
    this random tiny model, less than the 17% fp8 storage itself moves it from fp32). Where the
    device has no fp8 product (CUDA before 8.9) nothing is set: the upcast path, bit for bit."""
    dc, (x, concat, ctx) = tiny(), inputs()
    args = (x, torch.tensor([500]), ctx, concat, torch.tensor([24]))
    assert use_fp8_matmul(dc) == 0
    d8 = fp8_copy(dc)
    linears = [m for m in d8.unet.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        upcast = d8.denoise(*args)
        if ops.fp8_matmul_supported(torch.device("cpu")):
            assert use_fp8_matmul(d8) == sum(ops.fp8_matmul_fits(m) for m in linears) > 0
            assert rel_rms(d8.denoise(*args), upcast) < 0.15
            use_fp8_matmul(d8, False)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ops, "_fp8_matmul_supported", lambda device_type, index: False)
            assert use_fp8_matmul(d8) == 0
        torch.testing.assert_close(d8.denoise(*args), upcast, rtol=0, atol=0)


def test_fp8_matmul_selection_follows_the_chip():
    """CUDA before compute capability 8.9 has no fp8 product: refused without trying a kernel."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
        mp.setattr(torch.version, "hip", None)
        ops._fp8_matmul_supported.cache_clear()
        assert not ops._fp8_matmul_supported("cuda", 0)
    ops._fp8_matmul_supported.cache_clear()


# ------------------------------------------------------------------------------ the one switch

def test_prepare_for_speed_sets_each_fast_path_and_off_restores_eager():
    dc, (x, concat, ctx) = tiny(), inputs()
    args = (x, torch.tensor([500]), ctx, concat, torch.tensor([24]))
    with torch.no_grad():
        ref = dc.denoise(*args)
        done = prepare_for_speed(dc, fuse=True, channels_last=True, fp8_matmul=True)
        assert done["fused"] == len(attentions(dc)) and done["channels_last"] > 0
        assert done["fp8_matmul"] == 0 and done["compiled"] == 0      # fp32 weights: nothing for fp8
        assert rel_max(dc.denoise(*args), ref) < 2e-5
        prepare_for_speed(dc)
        assert not is_fused(dc) and not is_compiled(dc)
        torch.testing.assert_close(dc.denoise(*args), ref, rtol=0, atol=0)
    with pytest.raises(TypeError, match="DynamiCrafter model or its UNet3D"):
        prepare_for_speed(torch.nn.Linear(2, 2), fuse=True)


def test_cli_speed_flags_prepare_the_loaded_model(tmp_path, monkeypatch, tiny_ckpt):
    """`animate --weight-dtype fp8_e4m3fn --speed fuse channels_last fp8_matmul` loads the tiny
    checkpoint with fp8 matrices and hands the pipeline a model with those fast paths on (every
    switch name is a prepare_for_speed keyword)."""
    import inspect
    from dynamicrafter import cli, pipeline
    from dynamicrafter.models.speed import FAST_PATHS
    assert set(FAST_PATHS) <= set(inspect.signature(prepare_for_speed).parameters)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["animate", "--ckpt", "m", "--out", "o.mp4", "--speed", "warp"])
    seen = {}

    class Handed(Exception):
        pass

    def recording_animate(dc, *a, **kw):
        seen.update(fused=is_fused(dc), channels_last=dc.unet.channels_last,
                    fp8=[m.fp8_matmul for m in dc.unet.modules() if isinstance(m, ops.cast.Linear)],
                    weight=dc.unet.input_blocks[1][0].in_layers[2].weight.dtype)
        raise Handed
    monkeypatch.setattr(pipeline, "animate", recording_animate)
    with pytest.raises(Handed):
        cli.main(["animate", "--ckpt", str(tiny_ckpt), "--prompt", "x", "--out", str(tmp_path / "o.png"),
                  "--weight-dtype", "fp8_e4m3fn", "--speed", "fuse", "channels_last", "fp8_matmul"])
    assert seen["fused"] and seen["channels_last"] and seen["weight"] == torch.float8_e4m3fn
    assert seen["fp8"] and all(seen["fp8"]) == ops.fp8_matmul_supported(torch.device("cpu"))
