"""Where a training process runs: rank, world size and device (torchrun or a single process),
the collectives the trainer uses, and FSDP2 sharding of the UNet."""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Env:
    """Where this process runs: rank, world size, device, bf16 autocast or not."""
    rank: int
    world: int
    device: torch.device
    bf16: bool
    accum: int                 # micro-batches per optimizer step on each process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()


def setup_distributed(device_pref: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


def all_mean(x: torch.Tensor, world: int) -> float:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return float(x)


def broadcast_from_rank0(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_fsdp(dc) -> list:
    """FSDP2 over the UNet blocks, the UNet and the Resampler. Returns the 0-dim trainable
    parameters (the gates), which FSDP leaves whole: their gradients are averaged by hand."""
    from torch.distributed.fsdp import fully_shard
    unet = dc.unet
    scalars = {p for p in unet.parameters() if p.ndim == 0}
    can_skip = "ignored_params" in inspect.signature(fully_shard).parameters
    kw = {"ignored_params": scalars} if scalars and can_skip else {}
    if scalars and not kw:
        raise RuntimeError("this torch's fully_shard cannot skip the 0-dim gate parameters; use run.distributed=ddp")
    for block in list(unet.input_blocks) + [unet.middle_block] + list(unet.output_blocks):
        fully_shard(block, **kw)
    fully_shard(unet, **kw)
    if dc.image_proj_model is not None:
        fully_shard(dc.image_proj_model)
    return [p for p in scalars if p.requires_grad]
