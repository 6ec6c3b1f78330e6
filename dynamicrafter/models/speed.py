"""Fast paths for the UNet forward that keep its math: regional torch.compile of the repeated
blocks. The eager model (the parity path) is untouched until one of these is called.

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

from .unet import ResBlock, SpatialTransformer, TemporalTransformer, UNet3D

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


def compile_regions(model: nn.Module, mode: Optional[str] = None, backend: str = "inductor",
                    fullgraph: bool = True, dynamic: Optional[bool] = False) -> CompiledRegions:
    """Compiled calls of the repeated blocks of `model` (a DynamiCrafter, or its UNet3D), without
    installing them (see `compiled`); nothing compiles before a call. `mode`, `backend`, `dynamic`
    as torch.compile's; `fullgraph=True` fails loudly on a graph break instead of splitting a
    block; `dynamic=False`: one graph per block shape, which a sampling run (the same shapes every
    step) compiles once."""
    unet = getattr(model, "unet", model)
    if not isinstance(unet, UNet3D):
        raise TypeError(f"compile needs a DynamiCrafter model or its UNet3D, got {type(model).__name__}")
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
