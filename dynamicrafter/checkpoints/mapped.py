"""Give back the pages of a memory-mapped checkpoint once its tensors have been converted.

Both readers map the file instead of reading it (safetensors, `torch.load(mmap=True)`): a tensor
kept in the file's dtype stays a view of the file, read lazily; but a tensor converted to another
dtype (fp32 file -> fp16/bf16/fp8 weights) leaves the file pages it was read from resident in this
process until the whole mapping closes, i.e. until the last tensor of the file is gone. A 10.4 GB
fp32 file loaded as fp16 so held 15.4 GB, most of it pages nobody would read again.

`MappedPages` notes the file mappings of this process (Linux: /proc/self/maps) and `release(t)`
drops the pages that lie wholly inside a source tensor (madvise MADV_DONTNEED). These are clean
file pages (nothing writes to a checkpoint's tensors while it loads), so the mapping stays valid:
a page touched again, by a tensor sharing it, is read from the file again. Tensors outside a file mapping (an
in-memory state dict) are never touched. Elsewhere than Linux it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch

MADV_DONTNEED = 4
PAGE = mmap.PAGESIZE


def _file_ranges() -> list[tuple[int, int]]:
    """(start, end) of every file-backed mapping of this process."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


class MappedPages:
    """pages = MappedPages()  (after the file is opened) ... pages.release(source_tensor)."""

    def __init__(self):
        self.enabled = sys.platform.startswith("linux")
        self.ranges = _file_ranges() if self.enabled else []
        self.released = 0          # bytes given back
        if self.enabled:
            self._madvise = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def release(self, t: torch.Tensor) -> None:
        """Drop the resident pages wholly inside `t`'s storage if it is a view of a mapped file."""
        if not self.enabled or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return
        first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE     # whole pages only
        if last > first and self._madvise(first, last - first, MADV_DONTNEED) == 0:
            self.released += last - first

    def release_module(self, module: torch.nn.Module) -> None:
        """Release every parameter and buffer of a module that is being discarded."""
        for t in [*module.parameters(), *module.buffers()]:
            self.release(t)
