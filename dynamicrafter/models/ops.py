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
        fp8_matmul = False      # per layer, set by speed.use_fp8_matmul: an fp8 product instead of the upcast

        def forward(self, x):
            if self.fp8_matmul:
                return fp8_linear(x, self.weight.to(x.device), self.bias)
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


# ------------------------------------------------------------------------------ fp8 matrix products

FP8_MAX = 448.0     # the largest finite float8_e4m3fn


def fp8_matmul_supported(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` multiplies float8_e4m3fn matrices on this device: CUDA needs
    compute capability 8.9 (Ada, Hopper) or later; other devices (the CPU in torch 2.4+) are asked
    once with a tiny product."""
    device = torch.device(device)
    return _fp8_matmul_supported(device.type, device.index)


@functools.lru_cache(maxsize=None)
def _fp8_matmul_supported(device_type: str, index) -> bool:
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device_type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(index) < (8, 9):
        return False
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """x @ weight.T + bias with `weight` stored in float8_e4m3fn (scale 1, as the loader stores it)
    and x quantized to float8_e4m3fn with one scale per call (its largest magnitude maps to 448):
    one fp8 matrix product accumulated in float32, returned in x's dtype. The input rounding (3
    mantissa bits) is what this trades for the fp8 rate: see tests/test_fast_paths.py's bound."""
    rows = x.reshape(-1, x.shape[-1])
    amax = rows.abs().amax().float().clamp(min=1e-12)
    scale_x = amax / FP8_MAX
    x8 = (rows * (FP8_MAX / amax).to(rows.dtype)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    one = torch.ones((), device=x.device)
    out = torch._scaled_mm(x8, weight.t(), scale_a=scale_x, scale_b=one, out_dtype=x.dtype)
    if bias is not None:
        out = out + bias.to(out)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_matmul_fits(layer: nn.Module) -> bool:
    """A Linear whose stored matrix is float8_e4m3fn and whose sides are multiples of 16 (what
    the fp8 kernels take)."""
    return (isinstance(layer, nn.Linear) and layer.weight.dtype == torch.float8_e4m3fn
            and layer.in_features % 16 == 0 and layer.out_features % 16 == 0)


# ------------------------------------------------------------------------------ fused projections

def fusable(layers) -> bool:
    """Linear layers that compute with their stored `.weight` as it is (or only cast it): not
    ComfyUI layers that cast, stream or patch their weights at call time (--lowvram, manual
    cast, LoRA applied on the fly), whose weights only their own forward knows how to read."""
    return all(isinstance(layer, nn.Linear) and not (getattr(layer, "comfy_cast_weights", False)
                                                     or getattr(layer, "weight_function", None)
                                                     or getattr(layer, "bias_function", None))
               for layer in layers)


def fuse_weights(layers) -> torch.Tensor:
    """Move the layers' matrices into one storage, stacked along their outputs, and make each
    layer's weight a view of its rows (the Parameter objects and their names stay: state_dict,
    LoRA merges and load_state_dict copies read and write the fused storage). Returns it."""
    with torch.no_grad():
        fused = torch.cat([layer.weight for layer in layers])
        start = 0
        for layer in layers:
            rows = layer.weight.shape[0]
            layer.weight.data = fused[start:start + rows]
            start += rows
    return fused


def still_fused(fused: torch.Tensor, layers) -> bool:
    """Whether every layer's weight is still its view of `fused` (a device move or a replaced
    Parameter gives the layer a storage of its own)."""
    row_bytes = fused.stride(0) * fused.element_size()
    start = 0
    for layer in layers:
        w = layer.weight
        if w.device != fused.device or w.dtype != fused.dtype or w.data_ptr() != fused.data_ptr() + start * row_bytes:
            return False
        start += w.shape[0]
    return True


def fused_linear(x: torch.Tensor, layers, owner: nn.Module, name: str) -> tuple:
    """(layer(x) for layer in layers) as one matrix product over the stacked weights, split back.
    `owner` keeps the fused storage as its attribute `name` (a plain tensor: not in its
    state_dict), rebuilt here when a move or a swap broke it; under autograd or torch.compile the
    stack is made per call instead (the graph then sees the parameters themselves)."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        weight = torch.cat([layer.weight for layer in layers])
    else:
        weight = owner.__dict__.get(name)
        if weight is None or not still_fused(weight, layers):
            weight = owner.__dict__[name] = fuse_weights(layers)
    biases = [layer.bias for layer in layers]
    bias = None if all(b is None for b in biases) else torch.cat(
        [torch.zeros(layer.out_features, device=x.device, dtype=x.dtype) if b is None else b.to(x)
         for layer, b in zip(layers, biases)])
    if getattr(layers[0], "fp8_matmul", False):
        out = fp8_linear(x, weight.to(x.device), bias)
    else:
        out = F.linear(x, weight.to(device=x.device, dtype=x.dtype), bias)
    return out.split([layer.out_features for layer in layers], dim=-1)
