"""Reading torch `.ckpt` / `.pt` / `.pth` / `.bin` files so that loading has no effect but
returning tensors.

Only torch's zip format (what `torch.save` writes since torch 1.6) is read, and only by torch's
own weights-only unpickler (`torch.load(weights_only=True)`). Before torch sees the file:

1. the zip directory is checked: every record stored uncompressed, lying inside the file and
   named once (no duplicate or case-variant names, which torch's zip reader and Python's could
   resolve to different records);
2. the pickle (`data.pkl`) is scanned without running it (`pickletools` only parses): every
   storage it declares must have a `data/<key>` record of exactly the declared byte size, every
   call's arguments must be a literal tuple (never `f(*list)` or a computed argument tuple, and
   no constructor gets a shape built by `torch.Size`), the
   constructors torch would let it call (`bytearray`, `torch.Tensor`, storages, codecs, ...)
   may not ask for more memory than a small budget proportional to the pickle's size, and it
   may not name a module torch never lets a checkpoint name (`os`, `sys`, `posix`, `nt`).

Objects torch refuses (Lightning callbacks, OmegaConf hyper-parameters, any class of the
training code) get inert stand-ins, registered with torch's `safe_globals` context manager for
exactly the names torch lists as unsafe (`get_unsafe_globals_in_checkpoint`) and only for the
duration of this load: a stand-in accepts and drops any arguments and state, and nothing the
file names is imported, called or changed. After loading, no tensor may hold more elements than
the bytes behind it (expanded views would turn a few bytes into gigabytes on the first copy).

Legacy (pre-1.6, non-zip) torch files are refused with the one-line conversion to run where
the file is trusted.
"""
from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from math import prod
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import CheckpointError

# The pickle may ask torch for at most this much memory beyond the tensors read from the file
# (whose sizes are checked against the file's records): a budget, not a typical size.
PICKLE_MEMORY_BASE = 1 << 20
PICKLE_MEMORY_PER_BYTE = 16
BLOCKED_MODULES = ("os", "sys", "posix", "nt")   # torch refuses these names even when allowlisted
LEGACY_MAGIC = bytes.fromhex("80028a0a6cfc9c46f9206aa85019")   # pickled torch legacy magic number
ZIP_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")

CONVERT_HINT = ('convert it once, where you trust the file: python -c "import torch; '
                "torch.save(torch.load('OLD', weights_only=True), 'NEW.ckpt')\" (writes the zip format), "
                "or save its state dict as .safetensors")


def load_torch_file(path) -> Any:
    """The object a torch zip checkpoint holds, read as described in the module docstring.
    Raises CheckpointError for anything else."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{path.name} is not a torch zip checkpoint ({_describe_head(head)}); "
                              f"only torch's zip format is loaded: {CONVERT_HINT}")
    with open(path, "rb") as f:
        check_torch_zip(f, path.stat().st_size, path.name)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    stand_ins = [(_stand_in(name), name) for name in unsafe]
    with torch.serialization.safe_globals(stand_ins):
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return obj


def check_torch_zip(f, size: int, source: str) -> None:
    """The pre-checks of the module docstring on an open torch zip file (or a slice of a file,
    as inside a sharded training checkpoint) of `size` bytes; raises CheckpointError."""
    pickle_bytes, records = _read_zip_directory(f, size, source)
    storages = scan_pickle(pickle_bytes, source)
    for key, nbytes in storages.items():
        have = records.get(f"data/{key}")
        if have is None:
            raise CheckpointError(f"{source}: the pickle declares storage {key!r} but the file has no "
                                  f"data/{key} record; the file is truncated or crafted")
        if have != nbytes:
            raise CheckpointError(f"{source}: storage {key!r} is declared as {nbytes} bytes but its record "
                                  f"holds {have}; the file is truncated or crafted")


def check_tensor_bytes(sd: dict, source: str) -> None:
    """Every tensor must be strided and have as many bytes behind it as elements it shows."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        if v.layout != torch.strided:
            raise CheckpointError(f"{source}: tensor {k!r} is {v.layout}, not a dense tensor")
        need = v.numel() * v.element_size()
        have = v.untyped_storage().nbytes()
        if need > have:
            raise CheckpointError(f"{source}: tensor {k!r} of shape {tuple(v.shape)} needs {need} bytes but only "
                                  f"{have} are stored (an expanded view); the file is crafted")


# ----------------------------------------------------------------------------- zip directory

def _describe_head(head: bytes) -> str:
    if head.startswith(LEGACY_MAGIC):
        return "torch's legacy pre-1.6 format, whose storage sizes cannot be checked before torch allocates them"
    if head[:1] == b"\x80":
        return "a bare pickle"
    return "unknown format"


def _read_zip_directory(f, size: int, name: str) -> tuple[bytes, dict]:
    """data.pkl's bytes and {record name under the archive folder: size}, after checking that
    every record is stored uncompressed inside the file (so no record inflates when read) and
    that no two records share a name, even up to case (torch's zip reader and Python's could
    then read different ones)."""
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
            if not infos:
                raise CheckpointError(f"{name}: empty zip archive")
            prefix = infos[0].filename.split("/", 1)[0] + "/"
            records, seen = {}, set()
            for info in infos:
                folded = info.filename.casefold()
                if folded in seen:
                    raise CheckpointError(f"{name}: record {info.filename!r} appears twice (or in two letter "
                                          f"cases); torch.save writes each record once, so the file is crafted")
                seen.add(folded)
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise CheckpointError(f"{name}: record {info.filename!r} is compressed; torch writes "
                                          f"records uncompressed, so the file was not written by torch.save")
                f.seek(info.header_offset)
                header = f.read(ZIP_LOCAL_HEADER.size)
                if len(header) != ZIP_LOCAL_HEADER.size:
                    raise CheckpointError(f"{name}: record {info.filename!r} lies outside the file")
                name_len, extra_len = ZIP_LOCAL_HEADER.unpack(header)[-2:]
                end = info.header_offset + ZIP_LOCAL_HEADER.size + name_len + extra_len + info.file_size
                if end > size:
                    raise CheckpointError(f"{name}: record {info.filename!r} declares {info.file_size} bytes "
                                          f"but the file ends before them; it is truncated or crafted")
                if info.filename.startswith(prefix):
                    records[info.filename[len(prefix):]] = info.file_size
            if "data.pkl" not in records:
                raise CheckpointError(f"{name}: no data.pkl record; not a torch checkpoint")
            pickle_bytes = zf.read(prefix + "data.pkl")
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{name}: broken zip archive ({e}); the file is truncated or not a checkpoint") \
            from e
    return pickle_bytes, records


class FileSlice(io.RawIOBase):
    """Bytes [offset, offset + length) of an open binary file as a seekable file of their own."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, {0: pos, 1: self.pos + pos, 2: self.length + pos}[whence])
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


# ----------------------------------------------------------------------------- pickle scan

class _Global(str):
    """A global the pickle names (not resolved: only its name)."""


class _Value:
    """Anything the scan does not need to look into, with the bytes it may hold."""
    __slots__ = ("size",)

    def __init__(self, size: int):
        self.size = size


class _Shape(_Value):
    """The result of a torch.Size call: a shape whose element count the scan cannot see."""
    __slots__ = ()


def _computed_shape(v) -> bool:
    return isinstance(v, _Shape) or (isinstance(v, (tuple, list)) and any(_computed_shape(x) for x in v))


class _Tuple(tuple):
    size: int = 0


class _List(list):
    size: int = 0


_MARK = object()


def _size(v) -> int:
    if isinstance(v, (_Value, _Tuple, _List)):
        return v.size
    if isinstance(v, (str, bytes)):
        return len(v)
    return 8


def _tuple(items) -> _Tuple:
    t = _Tuple(items)
    t.size = 8 * len(t) + sum(_size(x) for x in t)
    return t


def _ints(args) -> list[int]:
    """Integers passed as sizes: the arguments and those inside tuple arguments."""
    out = []
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool):
            out.append(a)
        elif isinstance(a, tuple):
            out += [x for x in a if isinstance(x, int) and not isinstance(x, bool)]
    return out


def _allocating_names() -> set:
    from torch import _weights_only_unpickler as wo
    allowed = wo._get_allowed_globals()
    sized = {"builtins.bytearray", "torch.Tensor"}
    sized |= {name for name, v in allowed.items() if v in torch._tensor_classes or v in torch._storage_classes
              or isinstance(v, torch.serialization.StorageType)}
    return sized


def _call_bytes(name: str, args: tuple, sized: set) -> int:
    """An upper bound of the memory `name(*args)` allocates, for the callables torch allows."""
    if name in sized:
        ints = _ints(args)
        rest = sum(_size(a) for a in args if not isinstance(a, (int, tuple)))
        return 16 * (prod(max(0, i) for i in ints) if ints else 0) + 16 * rest
    if name == "_codecs.encode":        # the most expanding codec (unicode_escape) makes 10 bytes of 1
        return 10 * sum(_size(a) for a in args) + 64
    if name == "torch._utils._rebuild_qtensor" and len(args) > 2 and isinstance(args[2], tuple):
        return 16 * prod(max(0, i) for i in _ints([args[2]]))
    if name in ("torch._utils._rebuild_device_tensor_from_cpu_tensor",
                "torch._utils._rebuild_device_tensor_from_numpy") and args:
        return 16 * _size(args[0])
    if name == "torch._tensor._rebuild_from_type_v2" and len(args) > 2 and isinstance(args[0], _Global):
        inner = args[2] if isinstance(args[2], tuple) else ()
        return _call_bytes(str(args[0]), inner, sized)
    return 0


def _result_size(name: str, args: tuple) -> int:
    """What a call's result may hold: a rebuilt tensor its (possibly expanded) element count."""
    if name.startswith("torch._utils._rebuild_tensor") and len(args) > 2 and isinstance(args[2], tuple):
        return 16 * prod(max(0, i) for i in _ints([args[2]]))
    return sum(_size(a) for a in args)


def _storage_dtype(name: str) -> Optional[torch.dtype]:
    if name in ("torch.storage.UntypedStorage", "torch.UntypedStorage"):
        return torch.uint8
    for dtype, cls in torch.storage._dtype_to_storage_type_map().items():
        if name == f"torch.{cls}":
            return dtype
    return None


def scan_pickle(data: bytes, source: str = "checkpoint") -> dict:
    """Walk a torch pickle without running it: the storages it declares ({key: bytes}),
    refusing opcodes torch's weights-only unpickler does not know, blocked modules and calls
    that could allocate more than the budget. Memory used is proportional to len(data)."""
    from torch._utils import IMPORT_MAPPING, NAME_MAPPING

    budget = PICKLE_MEMORY_BASE + PICKLE_MEMORY_PER_BYTE * len(data)
    sized = _allocating_names()
    spent = 0
    stack: list = []
    marks: list = []
    memo: dict = {}
    storages: dict = {}

    def pop_mark():
        nonlocal stack
        items, stack = stack, marks.pop()
        return items

    def refuse(why):
        raise CheckpointError(f"{source}: {why}; the file is not a plain checkpoint, refusing it")

    try:
        for op, arg, _pos in pickletools.genops(data):
            code = op.name
            if code == "PROTO" or code == "STOP":
                continue
            if code == "GLOBAL":
                module, name = arg.split(" ", 1)
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
                if module.split(".")[0] in BLOCKED_MODULES:
                    refuse(f"it names {module}.{name} (module '{module}' can run commands or change the process, "
                           f"and torch never loads it)")
                stack.append(_Global(f"{module}.{name}"))
            elif code in ("BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING"):
                stack.append(arg)
            elif code in ("NONE", "NEWTRUE", "NEWFALSE"):
                stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[code])
            elif code == "EMPTY_TUPLE":
                stack.append(_tuple(()))
            elif code in ("EMPTY_LIST",):
                stack.append(_List())
            elif code in ("EMPTY_DICT", "EMPTY_SET"):
                stack.append(_Value(64))
            elif code == "MARK":
                marks.append(stack)
                stack = []
            elif code == "TUPLE":
                items = pop_mark()      # (pop_mark rebinds `stack`: take the items first)
                stack.append(_tuple(items))
            elif code in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(code[-1])
                items = stack[-n:]
                del stack[-n:]
                stack.append(_tuple(items))
            elif code in ("BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif code in ("BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif code in ("APPEND", "SETITEM", "SETITEMS", "APPENDS"):
                if code == "APPEND":
                    items = [stack.pop()]
                elif code == "SETITEM":
                    items = [stack.pop(), stack.pop()]
                else:
                    items = pop_mark()
                target = stack[-1]
                grown = 8 * len(items) + sum(_size(x) for x in items)
                if isinstance(target, (_List, _Value)):
                    target.size += grown
                if isinstance(target, _List) and code in ("APPEND", "APPENDS"):
                    target.extend(items)
            elif code == "BUILD":
                stack.pop()
            elif code in ("REDUCE", "NEWOBJ"):
                args = stack.pop()
                func = stack.pop()
                name = str(func) if isinstance(func, _Global) else ""
                if not isinstance(args, _Tuple):     # f(*list), f(*dict), f(*result of a call)
                    refuse(f"it calls {name or 'a computed function'} with arguments that are not a literal "
                           f"tuple, which torch.save never writes and whose memory cannot be bounded")
                if name in sized and any(_computed_shape(a) for a in args):
                    refuse(f"it calls {name} with a computed shape (torch.Size built by the pickle), which "
                           f"torch.save never writes and whose memory cannot be bounded")
                cost = _call_bytes(name, args, sized)
                spent += cost
                if spent > budget:
                    refuse(f"its pickle asks for about {spent} bytes of memory through {name or 'a call'}, "
                           f"more than a {len(data)}-byte pickle may ({budget})")
                size = max(cost, _result_size(name, args))
                stack.append(_Shape(size) if name == "torch.Size" else _Value(size))
            elif code == "BINPERSID":
                pid = stack.pop()
                storages_key = _storage_record(pid, refuse)
                key, nbytes = storages_key
                if storages.setdefault(key, nbytes) != nbytes:
                    refuse(f"storage {key!r} is declared with two different sizes")
                stack.append(_Value(nbytes))
            else:
                refuse(f"its pickle uses opcode {code}, which torch's weights-only unpickler does not accept")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: its pickle is malformed ({type(e).__name__}: {e}); "
                              f"the file is truncated or not a checkpoint") from e
    return storages


def _storage_record(pid, refuse) -> tuple[str, int]:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
        refuse(f"it declares a persistent object {pid!r:.80} that is not a storage")
    _, storage_type, key, _location, numel = pid
    dtype = _storage_dtype(str(storage_type)) if isinstance(storage_type, _Global) else None
    if dtype is None or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        refuse(f"it declares a malformed storage {pid!r:.120}")
    return key, numel * torch._utils._element_size(dtype)


# ----------------------------------------------------------------------------- stand-ins

def _stand_in(full_name: str) -> type:
    """A fresh, inert class to register under `full_name` for one load: building, calling or
    giving it state stores nothing and runs nothing of what the name refers to."""
    label = full_name.rpartition(".")[2] or "object"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return f"<inert stand-in for {full_name}>"

    return type(f"InertStandIn_{label}", (), {"__slots__": (), "__new__": __new__, "__init__": __init__,
                                                "__setstate__": __setstate__, "__repr__": __repr__,
                                                "__module__": __name__, "stands_for": full_name})
