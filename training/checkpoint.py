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
tests). Small files (``meta.pt``, the latent cache) go through ``atomic_save``. Nothing read back
can execute code or allocate more than the files hold: ``meta.pt`` goes through the library's
``.ckpt`` pre-checks (dynamicrafter/checkpoints/torch_files.py) before torch's weights-only unpickler; DCP's
``.metadata`` index, a plain pickle, is read by ``SafeReader`` with an unpickler that can build only
DCP's own metadata classes, then checked (every record a ``__<rank>_<n>.distcp`` file of this folder,
inside it, no transforms, shapes within bounds), and each tensor record is pre-checked like a
``.ckpt`` before torch loads it.

Fault injection for the crash tests: ``DCTRAIN_FAULT=kill_in_save:<step>`` SIGKILLs every
process after its shards of that step are written but before the folder is complete;
``DCTRAIN_FAULT=kill_after_step:<step>`` SIGKILLs it right after that optimizer step.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import pickle
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


METADATA_MAX_BYTES = 64 << 20       # DCP's index: ~1 KB per tensor; a big run's is a few MB
_SHARD_FILE = re.compile(r"^__\d{1,6}_\d{1,6}\.distcp$")
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata index and nothing else: only its own classes, torch dtypes/Size/layouts
    and plain containers can be named; anything else is refused before it is imported."""

    def find_class(self, module, name):
        if name in _DCP_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise ResumeError(f"{self.source}: the checkpoint index names {module}.{name}, which DCP never writes; "
                          "the checkpoint is crafted or corrupt, refusing it")


def _shape(v, what: str, source: str) -> tuple:
    if not (isinstance(v, torch.Size) and all(type(i) is int and 0 <= i < 1 << 40 for i in v) and len(v) <= 8):
        raise ResumeError(f"{source}: {what} is not a plausible tensor shape; the checkpoint is crafted or corrupt")
    return tuple(v)


def check_metadata(md, folder: str, source: str) -> None:
    """Refuse an index that points outside `folder`, uses storage transforms, or declares shapes
    or byte ranges no DCP save writes."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorStorageMetadata)

    def bad(why):
        raise ResumeError(f"{source}: {why}; the checkpoint is crafted or corrupt, refusing it")
    if type(md) is not Metadata or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        bad("the index is not DCP metadata")
    for key, tmd in md.state_dict_metadata.items():
        if not isinstance(key, str):
            bad(f"tensor name {key!r:.60} is not a string")
        if isinstance(tmd, BytesStorageMetadata):
            continue
        if type(tmd) is not TensorStorageMetadata or not isinstance(tmd.properties.dtype, torch.dtype) \
                or not isinstance(tmd.chunks, list):
            bad(f"{key!r} has malformed metadata")
        size = _shape(tmd.size, f"{key!r}'s shape", source)
        for c in tmd.chunks:
            if type(c) is not ChunkStorageMetadata:
                bad(f"{key!r} has a malformed chunk")
            off, n = _shape(c.offsets, f"{key!r}'s chunk", source), _shape(c.sizes, f"{key!r}'s chunk", source)
            if len(off) != len(size) or len(n) != len(size) or any(o + k > s for o, k, s in zip(off, n, size)):
                bad(f"a chunk of {key!r} lies outside its shape {size}")
    sizes = {}
    for index, info in md.storage_data.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo:
            bad("a storage record is malformed")
        name = info.relative_path
        if not isinstance(name, str) or not _SHARD_FILE.match(name):
            bad(f"a record names the file {name!r:.80}, not a __<rank>_<n>.distcp file of the checkpoint folder")
        if info.transform_descriptors:
            bad(f"a record of {name} asks for storage transforms {info.transform_descriptors!r:.80}, which the "
                "trainer never writes")
        if name not in sizes:
            file = os.path.join(folder, name)
            sizes[name] = os.path.getsize(file) if os.path.isfile(file) else -1
        if not (type(info.offset) is int and type(info.length) is int and info.offset >= 0 and info.length >= 0
                and info.offset + info.length <= sizes[name]):
            bad(f"a record declares bytes {info.offset}+{info.length} that {name} does not hold")


@functools.cache
def _safe_reader_class():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    from dynamicrafter.config import CheckpointError
    from dynamicrafter.checkpoints.torch_files import FileSlice, check_torch_zip

    class SafeReader(dcp.FileSystemReader):
        """DCP's FileSystemReader, but .metadata is read by _MetadataUnpickler and checked by
        check_metadata, and each tensor record is pre-checked before torch's weights-only load."""

        def read_metadata(self, *args, **kwargs):
            file = os.path.join(self.path, ".metadata")
            size = os.path.getsize(file)
            if size > METADATA_MAX_BYTES:
                raise ResumeError(f"{file}: {size} bytes, more than a checkpoint index holds "
                                  f"({METADATA_MAX_BYTES}); refusing it")
            with open(file, "rb") as fh:
                unpickler = _MetadataUnpickler(fh)
                unpickler.source = file
                try:
                    md = unpickler.load()
                except ResumeError:
                    raise
                except Exception as err:  # noqa: BLE001 - whatever a malformed pickle raises
                    raise ResumeError(f"{file}: unreadable checkpoint index ({type(err).__name__}: "
                                      f"{str(err)[:120]})") from None
            check_metadata(md, str(self.path), file)
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

        def _slice_file(self, file, sinfo):
            view = FileSlice(file, sinfo.offset, sinfo.length)
            try:
                check_torch_zip(view, sinfo.length, f"{sinfo.relative_path} at byte {sinfo.offset}")
            except CheckpointError as err:
                raise ResumeError(f"{os.path.join(self.path, sinfo.relative_path)}: {err}") from None
            view.seek(0)
            return io.BufferedReader(view)

    return SafeReader


def safe_reader(path: str):
    """The storage reader every load of a training checkpoint goes through (see the docstring)."""
    return _safe_reader_class()(path)


def load_sharded(path: str, tensors: dict) -> None:
    """Collective under torchrun: fill each of this process's `tensors` (flat name -> tensor or
    DTensor shard, allocated as the run holds them) from the checkpoint, reading only the pieces
    it needs; a name the checkpoint lacks is an error."""
    import torch.distributed.checkpoint as dcp
    safe_reader(path).read_metadata()        # a crafted index is refused here, in our words
    with _quiet_single(), _our_errors():
        dcp.load(tensors, storage_reader=safe_reader(path), no_dist=_single())


@contextlib.contextmanager
def _our_errors():
    """DCP wraps what a storage reader raises per rank; a ResumeError comes out as itself."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        yield
    except CheckpointException as err:
        for failure in err.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure     # (exception, traceback)
            if isinstance(inner, ResumeError):
                raise inner from None
        raise


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
    mds = {k: md for k, md in safe_reader(path).read_metadata().state_dict_metadata.items()
           if isinstance(md, TensorStorageMetadata) and k.startswith(prefix)}
    need = sum(math.prod(md.size) * md.properties.dtype.itemsize for md in mds.values())
    have = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".distcp"))
    if need > have:
        raise ResumeError(f"{path}: its index declares {need} bytes of tensors but its shard files hold {have}; "
                          "the checkpoint is crafted or corrupt, refusing it")
    out = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in mds.items()}
    with _quiet_single(), _our_errors():
        dcp.load(out, storage_reader=safe_reader(path), no_dist=True)
    return out


def read_meta(path: str) -> dict:
    from dynamicrafter.config import CheckpointError
    from dynamicrafter.checkpoints.torch_files import load_torch_file
    file = os.path.join(path, META)
    try:
        meta = load_torch_file(file)
    except CheckpointError as err:
        raise ResumeError(f"{path}: {err}") from None
    if not isinstance(meta, dict):
        raise ResumeError(f"{file} holds a {type(meta).__name__}, not the trainer's checkpoint record")
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


def valid_rng_state(state) -> bool:
    """Whether `state` has the form rng_state() writes (so set_rng_state cannot fail half-way)."""
    try:
        n, p = state["numpy"], state["python"]
        ok = (isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
              and state["torch"].shape == torch.get_rng_state().shape
              and isinstance(n["keys"], torch.Tensor) and n["keys"].shape == (624,)
              and type(n["pos"]) is int and type(n["has_gauss"]) is int and type(n["cached"]) is float
              and type(p["version"]) is int and isinstance(p["state"], torch.Tensor) and p["state"].shape == (625,)
              and (p["gauss"] is None or type(p["gauss"]) is float))
        cuda = state.get("cuda", [])
        return ok and isinstance(cuda, list) and all(isinstance(c, torch.Tensor) and c.dtype == torch.uint8
                                                     and c.numel() <= 1 << 16 for c in cuda)
    except (KeyError, TypeError, AttributeError):
        return False


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
