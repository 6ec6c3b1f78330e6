"""Fast paths for the UNet forward that keep its math: regional torch.compile of the repeated
blocks. The eager model (the parity path) is untouched until one of these is called.

Regional compilation compiles each repeated block class (ResBlock, SpatialTransformer,
TemporalTransformer) instead of the whole UNet: every instance of a class runs the same code
object, and torch inlines module parameters as graph inputs, so blocks of the same class and
shape share one compiled graph. First use compiles one graph per (class, shape) instead of one
huge graph, and inductor's on-disk cache (on by default) keeps them for the next run.
"""
from __future__ import annotations

from typing import Optional

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


def compile_unet(model: nn.Module, mode: Optional[str] = None, backend: str = "inductor",
                 fullgraph: bool = True, dynamic: Optional[bool] = False) -> nn.Module:
    """Compile the repeated blocks of `model` (a DynamiCrafter, or its UNet3D) in place and return
    it. `mode`, `backend`, `dynamic` as torch.compile's; `fullgraph=True` fails loudly on a graph
    break instead of splitting a block. `dynamic=False`: one graph per block shape, which a
    sampling run (the same shapes every step) compiles once. Idempotent; `uncompile_unet` undoes it."""
    unet = getattr(model, "unet", model)
    if not isinstance(unet, UNet3D):
        raise TypeError(f"compile_unet needs a DynamiCrafter model or its UNet3D, got {type(model).__name__}")
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), RECOMPILE_LIMIT))
    for block in regions(unet):
        block.compile(mode=mode, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return model


def uncompile_unet(model: nn.Module) -> nn.Module:
    """Back to eager (the blocks' compiled call is dropped; their parameters were never copied)."""
    for block in regions(getattr(model, "unet", model)):
        block._compiled_call_impl = None
    return model


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in regions(getattr(model, "unet", model)))
