"""Fast paths for the UNet forward, each opt-in and each within a stated bound of the eager float32
forward (the parity path, untouched until one of these is called; bounds: tests/test_fast_paths.py):

* `compile_unet`: regional torch.compile of the repeated blocks.
* `fuse_projections`: the q/k/v projections of each self-attention, and the k/v of the text and
  of the image context of each cross-attention, as one matrix product per input.
* `use_channels_last`: the convolutions' weights (and so their outputs) in channels-last layout.
* `use_fp8_matmul`: fp8-stored Linear matrices multiplied by `torch._scaled_mm` in fp8.
* `prepare_for_speed`: the one switch over all four.

Regional compilation compiles each repeated block class (ResBlock, SpatialTransformer,
TemporalTransformer) instead of the whole UNet: every instance of a class runs the same code
object, and torch inlines module parameters as graph inputs, so blocks of the same class and
shape share one compiled graph. First use compiles one graph per (class, shape) instead of one
huge graph, and inductor's on-disk cache (on by default) keeps them for the next run.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from . import ops
from .unet import CrossAttention, ResBlock, SpatialTransformer, TemporalTransformer, UNet3D

REGIONS = (ResBlock, SpatialTransformer, TemporalTransformer)
# one graph per (block class, input shape): the 512 / 1024 UNets have about 12 distinct ResBlock
# shapes; the default limit (8) would silently send the rest back to eager
RECOMPILE_LIMIT = 64


def regions(unet: UNet3D) -> list[nn.Module]:
    """The UNet's repeated blocks, in module order (the unit of regional compilation)."""
    return [m for m in unet.modules() if isinstance(m, REGIONS)]


class CompiledRegions(dict):
    """{block: its compiled call} for one UNet, installed by `compiled` (a dict a host may keep in
    settings it deep-copies, as ComfyUI does with model options: copies share the compiled code)."""

    def __deepcopy__(self, memo):
        return self


def unet_of(model: nn.Module) -> UNet3D:
    unet = getattr(model, "unet", model)
    if not isinstance(unet, UNet3D):
        raise TypeError(f"the fast paths need a DynamiCrafter model or its UNet3D, got {type(model).__name__}")
    return unet


def compile_regions(model: nn.Module, mode: Optional[str] = None, backend: str = "inductor",
                    fullgraph: bool = True, dynamic: Optional[bool] = False) -> CompiledRegions:
    """Compiled calls of the repeated blocks of `model` (a DynamiCrafter, or its UNet3D), without
    installing them (see `compiled`); nothing compiles before a call. `mode`, `backend`, `dynamic`
    as torch.compile's; `fullgraph=True` fails loudly on a graph break instead of splitting a
    block; `dynamic=False`: one graph per block shape, which a sampling run (the same shapes every
    step) compiles once."""
    unet = unet_of(model)
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), RECOMPILE_LIMIT))
    # what nn.Module.compile does, kept aside: the code object (_call_impl) is the same for every block
    return CompiledRegions({block: torch.compile(block._call_impl, mode=mode, backend=backend, fullgraph=fullgraph,
                                                 dynamic=dynamic) for block in regions(unet)})


@contextlib.contextmanager
def compiled(calls: Optional[dict[nn.Module, Callable]]):
    """Inside this block the given blocks run their compiled calls (None or {}: no change)."""
    calls = calls or {}
    previous = {block: block._compiled_call_impl for block in calls}
    try:
        for block, call in calls.items():
            block._compiled_call_impl = call
        yield
    finally:
        for block, call in previous.items():
            block._compiled_call_impl = call


def compile_unet(model: nn.Module, mode: Optional[str] = None, backend: str = "inductor",
                 fullgraph: bool = True, dynamic: Optional[bool] = False) -> nn.Module:
    """Compile the repeated blocks of `model` in place (until `uncompile_unet`) and return it;
    arguments as `compile_regions`."""
    for block, call in compile_regions(model, mode, backend, fullgraph, dynamic).items():
        block._compiled_call_impl = call
    return model


def uncompile_unet(model: nn.Module) -> nn.Module:
    """Back to eager (the blocks' compiled call is dropped; their parameters were never copied)."""
    for block in regions(getattr(model, "unet", model)):
        block._compiled_call_impl = None
    return model


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in regions(getattr(model, "unet", model)))


# ------------------------------------------------------------------------------ fused projections

def fuse_projections(model: nn.Module, on: bool = True) -> int:
    """Compute the projections that read one input as one matrix product: q/k/v of every
    self-attention, k/v of every cross-attention's text context and k/v of its image context.
    The matrices move into one storage per group and the original Parameters become views of
    it, so the state_dict (official key layout), LoRA merges and weight loading see the same
    tensors and no memory is added; a device move or a swapped Parameter is noticed and the
    group fused again at the next forward. ComfyUI layers that cast or patch weights per call
    (--lowvram, manual cast) keep their own path. `on=False` goes back to one product per layer
    (the storage stays shared, which changes nothing). Returns how many attention layers it set."""
    layers = [m for m in unet_of(model).modules() if isinstance(m, CrossAttention)]
    for attn in layers:
        attn.fused = on
        if not on:
            for group in ("fused_qkv", "fused_kv", "fused_kv_ip"):
                attn.__dict__.pop(group, None)
    return len(layers)


def is_fused(model: nn.Module) -> bool:
    return any(getattr(m, "fused", False) for m in unet_of(model).modules() if isinstance(m, CrossAttention))


# ------------------------------------------------------------------------------ channels-last

def use_channels_last(model: nn.Module, on: bool = True, weights: bool = True) -> int:
    """Run the UNet's activations channels-last (`on=False`: back to contiguous): its input is
    made channels-last, and a convolution returns its input's layout, as do the following norms,
    activations, skips and upsampling: the spatial transformers' token layout (n, h*w, c) is then
    a view instead of a copy, and cuDNN runs its NHWC kernels. With `weights`, the 2-D / 3-D
    convolution weights are stored channels-last too (else the kernels convert them per call).
    Values are unchanged (the state_dict holds the same numbers; save after `on=False` for a
    contiguous file). Returns how many convolution weights it converted."""
    unet = unet_of(model)
    unet.channels_last = on
    formats = {nn.Conv2d: torch.channels_last, nn.Conv3d: torch.channels_last_3d}
    n = 0
    for m in unet.modules() if weights else ():
        fmt = next((f for cls, f in formats.items() if isinstance(m, cls)), None)
        if fmt is not None:
            m.weight.data = m.weight.contiguous(memory_format=fmt if on else torch.contiguous_format)
            n += 1
    return n


def fast_path_switches(model: nn.Module, fuse: bool = False, channels_last: bool = False) -> dict[str, bool]:
    """{attribute path under the UNet: value} that turns fused projections and channels-last
    activations on without touching a weight: for a host that sets attributes per run and puts
    them back after (ComfyUI's object patches)."""
    unet = unet_of(model)
    switches = {"channels_last": channels_last}
    switches.update({f"{name}.fused": fuse for name, m in unet.named_modules() if isinstance(m, CrossAttention)})
    return switches


# ------------------------------------------------------------------------------ fp8 matrix products

def use_fp8_matmul(model: nn.Module, on: bool = True) -> int:
    """Multiply the UNet's fp8-stored Linear matrices (weight dtype fp8_e4m3fn, e.g.
    `load_model(..., weight_dtype=torch.float8_e4m3fn)`) in fp8 with `torch._scaled_mm` where the
    device has it (CUDA compute capability 8.9+, the CPU in recent torch): the input is rounded to
    fp8 with one scale per call. Elsewhere, or for matrices that are not fp8 or whose sides are not
    multiples of 16, layers keep today's path (cast to the compute dtype, then multiply). Returns
    how many layers it set (0: nothing to do here)."""
    n = 0
    for m in unet_of(model).modules():
        if isinstance(m, ops.cast.Linear):
            m.fp8_matmul = on and ops.fp8_matmul_fits(m) and ops.fp8_matmul_supported(m.weight.device)
            n += m.fp8_matmul
    return n


# ------------------------------------------------------------------------------ the one switch

FAST_PATHS = ("compile", "fuse", "channels_last", "fp8_matmul")     # prepare_for_speed's switches


def prepare_for_speed(model: nn.Module, compile: bool = False, fuse: bool = False, channels_last: bool = False,
                      fp8_matmul: bool = False, backend: str = "inductor", mode: Optional[str] = None) -> dict:
    """Switch the UNet's fast paths on (False: off) in place, for a model already loaded (and any
    LoRA merged). Returns what each set: {"fused": attention layers, "channels_last":
    convolutions, "fp8_matmul": Linear layers, "compiled": blocks}."""
    unet_of(model)
    done = {"fused": fuse_projections(model, fuse),
            "channels_last": use_channels_last(model, channels_last),
            "fp8_matmul": use_fp8_matmul(model, fp8_matmul)}
    if compile:
        compile_unet(model, mode=mode, backend=backend)
    else:
        uncompile_unet(model)
    done["compiled"] = len(regions(unet_of(model))) if compile else 0
    return done
