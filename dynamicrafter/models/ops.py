"""Where the UNet and the resampler get their layer classes: an injectable "operations" namespace.

An operations namespace is any object with the attributes ``Linear``, ``Conv1d``, ``Conv2d``,
``Conv3d``, ``GroupNorm`` and ``LayerNorm`` (constructors as in ``torch.nn``), and optionally
``GroupNorm32`` (a GroupNorm computed in float32, the official ResBlock norm). Three kinds exist:

* ``torch.nn`` (the default): plain layers; the model computes exactly as before.
* :data:`cast` (below): layers that keep their weights in any dtype (fp8 for instance) and cast
  weight and bias to the input's dtype and device at every call, so weights are stored small
  and computed in the compute dtype.
* in ComfyUI, ``comfy.ops`` chosen by ``comfy.ops.pick_operations``: layers ComfyUI's model
  manager can stream to the GPU one by one (``--lowvram``) and cast per layer (fp8 weights).

The model files write ``layers.Linear(...)``; ``layers`` resolves to the namespace active while
the model is being built (:func:`building_with`), so no constructor needs an extra argument.
This module never imports ComfyUI.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVE = contextvars.ContextVar("dynamicrafter_operations", default=None)


@contextlib.contextmanager
def building_with(operations=None):
    """Build layers from `operations` inside this block (None keeps the one already active, or torch.nn)."""
    if operations is None:
        yield
        return
    token = _ACTIVE.set(operations)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active():
    return _ACTIVE.get() or nn


class _Layers:
    """``layers.Linear`` etc.: the class of that name in the namespace active now."""

    def __getattr__(self, name):
        ops = active()
        if name == "GroupNorm32":
            return getattr(ops, "GroupNorm32", None) or float32_group_norm(ops.GroupNorm)
        return getattr(ops, name)


layers = _Layers()


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (the official `GroupNormSpecific`)."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


@functools.lru_cache(maxsize=None)
def float32_group_norm(base: type) -> type:
    """GroupNorm32 on top of a namespace's GroupNorm. A casting GroupNorm casts its weights to the
    (float32) input itself, so the float32 computation is simply its own forward on float32 input."""
    if base is nn.GroupNorm:
        return GroupNorm32

    class CastGroupNorm32(base):
        def forward(self, x):
            return super().forward(x.float()).to(x.dtype)

    CastGroupNorm32.__name__ = CastGroupNorm32.__qualname__ = "GroupNorm32"
    return CastGroupNorm32


# ------------------------------------------------------------------------------ casting layers

def cast_params(module: nn.Module, x: torch.Tensor):
    """(weight, bias) in the dtype and on the device of `x`."""
    weight = module.weight.to(device=x.device, dtype=x.dtype)
    bias = None if module.bias is None else module.bias.to(device=x.device, dtype=x.dtype)
    return weight, bias


class cast:
    """Layers whose stored weights may have any dtype/device; each call computes in the input's."""

    class Linear(nn.Linear):
        def forward(self, x):
            return F.linear(x, *cast_params(self, x))

    class Conv1d(nn.Conv1d):
        def forward(self, x):
            return self._conv_forward(x, *cast_params(self, x))

    class Conv2d(nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, *cast_params(self, x))

    class Conv3d(nn.Conv3d):
        def forward(self, x):
            return self._conv_forward(x, *cast_params(self, x))

    class GroupNorm(nn.GroupNorm):
        def forward(self, x):
            return F.group_norm(x, self.num_groups, *cast_params(self, x), self.eps)

    class LayerNorm(nn.LayerNorm):
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, *cast_params(self, x), self.eps)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_stored_low(key: str, value: torch.Tensor) -> bool:
    """Tensors that a low-precision weight dtype (fp8) applies to: the matrices of the UNet's and
    the resampler's Linear / Conv layers (nearly all their bytes). Biases, norms, the resampler's
    queries and the image gate stay in the compute dtype."""
    return (key.startswith(("model.diffusion_model.", "image_proj_model.")) and key.endswith(".weight")
            and value.ndim >= 2)
