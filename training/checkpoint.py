"""Training checkpoints: sharded (torch.distributed.checkpoint), atomic, keep-last-K,
newest-valid discovery, RNG capture.

A checkpoint is a folder ``<run_dir>/checkpoints/step_00001234/``:

    .metadata          DCP's index: every tensor's global shape and which file holds which piece
    __<rank>_0.distcp  one file per process, written by that process: its shards of the
                       trainable weights, optimizer states and EMA (a tensor every process holds
                       whole, as under DDP, is written once, by one of them)
    meta.pt            what is not sharded (rank 0): step, configs, LR schedule, optimizer
                       hyperparameters, EMA counters, every process's RNG states

Every process writes into ``step_00001234.tmp-save/``; when all have finished (and fsync'ed),
rank 0 adds ``meta.pt`` and renames the folder (atomic on POSIX), so a crash at any moment
leaves the previous checkpoints and at most a temporary folder, which is ignored and removed
on the next start. A process reads only the pieces of its own shards (DCP reshards, so any
number of processes can resume). ``read_all`` reads a whole checkpoint in one process (export,
tests). Small files (``meta.pt``, the latent cache) go through ``atomic_save``; everything is
read back with ``weights_only=True``: only tensors and plain containers, nothing that executes
code.

Fault injection for the crash tests: ``DCTRAIN_FAULT=kill_in_save:<step>`` SIGKILLs every
process after its shards of that step are written but before the folder is complete;
``DCTRAIN_FAULT=kill_after_step:<step>`` SIGKILLs it right after that optimizer step.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import re
import shutil
import signal
import warnings
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("training.checkpoint")

class ResumeError(ValueError):
    """The run directory's checkpoint cannot be resumed with this config; the message says why."""


_NAME = re.compile(r"^step_(\d{8})$")
TMP_MARK = ".tmp-"
META = "meta.pt"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(run_dir), f"step_{step:08d}")


def fault(kind: str, step: int) -> bool:
    spec = os.environ.get("DCTRAIN_FAULT", "")
    return any(f == f"{kind}:{step}" for f in spec.split(","))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path: str, step: Optional[int] = None) -> None:
    """torch.save(obj) to `path` atomically (temp file in the same folder + fsync + os.replace).
    With `step`, the kill_in_save fault SIGKILLs half-way through the write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            if step is not None and fault("kill_in_save", step):
                buf = io.BytesIO()
                torch.save(obj, buf)
                data = buf.getvalue()
                fh.write(data[: len(data) // 2])
                fh.flush()
                os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


# ------------------------------------------------------------------------------- sharded checkpoints

def save_sharded(tensors: dict, meta: dict, run_dir: str, step: int, rank: int, barrier=None) -> str:
    """Collective: every process passes its own `tensors` (flat name -> tensor or DTensor shard)
    and they are written into the step's folder, one file per process; rank 0's `meta` goes
    beside them and the folder is renamed into place only when complete. `barrier` (under
    torchrun) holds every process until rank 0 has renamed it. Returns the checkpoint's path."""
    import torch.distributed.checkpoint as dcp

    final = checkpoint_path(run_dir, step)
    tmp = f"{final}{TMP_MARK}save"
    if rank == 0 and os.path.exists(tmp):      # left by a crash (normally removed at start)
        shutil.rmtree(tmp)
    # no process writes before rank 0 has joined the planning collective, so after the removal
    with _quiet_single():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=_single())
    if fault("kill_in_save", step):
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        atomic_save(meta, os.path.join(tmp, META))
        _fsync_dir(tmp)
        if os.path.exists(final):              # a redone step (its old folder was unreadable)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoint_dir(run_dir))
    if barrier is not None:
        barrier()
    return final


def load_sharded(path: str, tensors: dict) -> None:
    """Collective under torchrun: fill each of this process's `tensors` (flat name -> tensor or
    DTensor shard, allocated as the run holds them) from the checkpoint, reading only the pieces
    it needs; a name the checkpoint lacks is an error."""
    import torch.distributed.checkpoint as dcp
    with _quiet_single():
        dcp.load(tensors, storage_reader=dcp.FileSystemReader(path), no_dist=_single())


def _single() -> bool:
    """No process group: this process reads and writes alone (one process, or the exporter)."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_single():
    """DCP warns on every single-process save/load that it assumes one process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def read_all(path: str, prefix: str = "") -> dict:
    """Every tensor of a sharded checkpoint (under `prefix`), whole, in this one process: the
    consolidation export uses. Not collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(path)
    out = {k: torch.empty(md.size, dtype=md.properties.dtype)
           for k, md in reader.read_metadata().state_dict_metadata.items()
           if isinstance(md, TensorStorageMetadata) and k.startswith(prefix)}
    with _quiet_single():
        dcp.load(out, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return out


def read_meta(path: str) -> dict:
    meta = torch.load(os.path.join(path, META), map_location="cpu", weights_only=True)
    meta["path"] = path
    return meta


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints, oldest first."""
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return []
    out = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d) if (m := _NAME.match(n))]
    return sorted(out)


def remove_stale_temporaries(run_dir: str) -> list[str]:
    d = checkpoint_dir(run_dir)
    removed = []
    if os.path.isdir(d):
        for n in os.listdir(d):
            if TMP_MARK in n:
                p = os.path.join(d, n)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
                removed.append(n)
    if removed:
        log.warning("removed %d incomplete checkpoint(s) from an interrupted save: %s", len(removed), removed)
    return removed


def load_latest(run_dir: str) -> Optional[dict]:
    """The `meta.pt` of the newest complete checkpoint (with its "path"); unreadable ones (e.g.
    a disk that filled up) are skipped with a warning. None when the run has none. The tensors
    stay on disk until `load_sharded`."""
    d = checkpoint_dir(run_dir)
    if os.path.isdir(d) and not list_checkpoints(run_dir) and any(n.endswith(".pt") for n in os.listdir(d)):
        raise ResumeError(f"{d} holds single-file checkpoints (step_*.pt) of an older version of the trainer, "
                          "which cannot resume them; use a new run.run_dir")
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            if not os.path.exists(os.path.join(path, ".metadata")):
                raise FileNotFoundError("no .metadata")
            meta = read_meta(path)
        except Exception as err:  # noqa: BLE001
            log.warning("checkpoint %s cannot be read (%s: %s); trying an older one", path, type(err).__name__, err)
            continue
        if meta.get("step") != step:
            log.warning("checkpoint %s holds step %s, not %d; ignored", path, meta.get("step"), step)
            continue
        return meta
    return None


def prune(run_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path)


# ------------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    mt, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
