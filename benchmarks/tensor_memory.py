"""How much memory activations take, measured on any device (CPU included).

`TensorMemory` counts the bytes of every tensor created while it is active and still alive (the
memory a caching allocator must hold at least), and keeps the peak. On `meta` tensors it counts a
forward without computing it (seconds at any size), which `fused_attention()` keeps faithful to
CPU and GPU: `benchmarks/memory_estimate.py` uses both on the UNet, and the ComfyUI memory
estimate comes from its figures.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@contextlib.contextmanager
def fused_attention():
    """Make SDPA on meta tensors allocate what the CPU and GPU kernels allocate (the output and
    its log-sum-exp) instead of the math fallback's whole attention matrix, which torch picks for
    meta and no device runs. Other devices and masked calls are untouched."""
    sdpa = F.scaled_dot_product_attention

    def counted(q, k, v, attn_mask=None, *args, **kwargs):
        if q.device.type == "meta" and attn_mask is None and not args and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        return sdpa(q, k, v, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa

class TensorMemory(TorchDispatchMode):
    """with TensorMemory() as m: ...  -> m.peak, m.current: bytes of the live storages of tensors
    created inside (views count once; tensors made before, such as weights, not at all)."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._bytes: dict[int, int] = {}    # storage -> bytes, for storages allocated inside
        self._refs: dict[int, int] = {}     # storage -> live tensors using it

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        return storage.data_ptr() if t.device.type != "meta" else id(storage)

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= self._bytes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {self._key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            key = self._key(t)
            if key not in self._bytes:
                if key in inputs:       # a view of a tensor made outside: not ours
                    continue
                self._bytes[key] = t.untyped_storage().nbytes()
                self.current += self._bytes[key]
                self.peak = max(self.peak, self.current)
            self._refs[key] = self._refs.get(key, 0) + 1
            weakref.finalize(t, self._release, key)
        return out
