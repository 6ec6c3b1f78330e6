"""Training checkpoints: atomic writes, keep-last-K, newest-valid discovery, RNG capture.

A checkpoint is ``<run_dir>/checkpoints/step_00001234.pt``. It is written to a temporary
name in the same folder, flushed and fsync'ed, then renamed with ``os.replace`` (atomic on
POSIX), and the folder is fsync'ed: a crash at any moment leaves either the previous set
of checkpoints or the previous set plus the complete new one, never a half-written
``step_*.pt``. Temporary files from a crashed write are ignored and removed on the next
start. Files are read back with ``torch.load(weights_only=True)``: only tensors and plain
containers, nothing that executes code.

Fault injection for the crash tests: ``DCTRAIN_FAULT=kill_in_save:<step>`` SIGKILLs the
process half-way through writing the checkpoint of that step;
``DCTRAIN_FAULT=kill_after_step:<step>`` SIGKILLs it right after that optimizer step.
"""
from __future__ import annotations

import io
import logging
import os
import random
import re
import signal
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("training.checkpoint")

class ResumeError(ValueError):
    """The run directory's checkpoint cannot be resumed with this config; the message says why."""


_NAME = re.compile(r"^step_(\d{8})\.pt$")
TMP_MARK = ".tmp-"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(run_dir), f"step_{step:08d}.pt")


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
    """torch.save(obj) to `path` atomically (temp file in the same folder + fsync + os.replace)."""
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
                os.unlink(os.path.join(d, n))
                removed.append(n)
    if removed:
        log.warning("removed %d incomplete checkpoint file(s) from an interrupted save: %s", len(removed), removed)
    return removed


def load_checkpoint(path: str) -> dict:
    # mmap: processes on one node share the page cache instead of each holding a copy
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_latest(run_dir: str) -> Optional[dict]:
    """The newest checkpoint that loads; unreadable ones (e.g. a disk that filled up) are
    skipped with a warning. None when the run has none."""
    for step, path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
        except Exception as err:  # noqa: BLE001
            log.warning("checkpoint %s cannot be read (%s: %s); trying an older one", path, type(err).__name__, err)
            continue
        if state.get("step") != step:
            log.warning("checkpoint %s holds step %s, not %d; ignored", path, state.get("step"), step)
            continue
        state["path"] = path
        return state
    return None


def prune(run_dir: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        os.unlink(path)


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
