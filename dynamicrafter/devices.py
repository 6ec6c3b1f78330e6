"""Which device and which compute dtype: one place, for every backend torch runs on.

    default_device()          cuda > xpu > mps > cpu, the first one available
    compute_dtype(device)     bf16 where the device runs it, else fp16, fp32 on the CPU
    autocast(device, dtype)   torch.autocast for that device type (a no-op for fp32)

Half precision on the CPU is slow and inexact, so the CPU computes in fp32. MPS runs bf16 from
macOS 14 on (torch reports it), older Macs fp16; MPS has no float64 at all.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch


def default_device() -> torch.device:
    """The first accelerator torch sees (cuda, xpu, mps), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def supports_bf16(device) -> bool:
    """Whether `device` computes in bfloat16 natively (the CPU emulates it: False)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available() and torch.xpu.is_bf16_supported()
    if kind == "mps":
        return torch.backends.mps.is_available() and torch.backends.mps.is_macos_or_newer(14, 0)
    return False


def compute_dtype(device) -> torch.dtype:
    """bf16 where supported, else fp16 on an accelerator, fp32 on the CPU (and unknown devices)."""
    kind = torch.device(device).type
    if supports_bf16(device):
        return torch.bfloat16
    if kind in ("cuda", "xpu", "mps"):
        return torch.float16
    return torch.float32


def autocast(device, dtype: Optional[torch.dtype] = None):
    """torch.autocast on `device`'s type in `dtype` (default compute_dtype(device)); fp32 runs as is."""
    dtype = compute_dtype(device) if dtype is None else dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
