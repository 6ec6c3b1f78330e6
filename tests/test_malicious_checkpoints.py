"""Crafted checkpoints, written byte by byte (pickle opcodes by hand, in torch's zip container,
torch's legacy container and as a bare pickle; nothing here pickles a real malicious object),
for each way a pickle has been used against a loader:

- state changes through BUILD / __setstate__ on globals a loader allows (a function's
  __defaults__, a class's methods), which would alter every later load in the process;
- the legacy format's persistent_load('module') branch, which can write a file;
- huge allocations from tiny files (a storage declared larger than its bytes, constructors and
  codecs called with huge sizes, expanded views);
- code execution (os.system, subprocess, eval, exec).

Every file must be refused with a CheckpointError, and afterwards, in the same process, a
benign file must load with the right values, the targets must be unchanged, no file may have
appeared and peak memory (VmHWM) may have grown by less than a few MB. The loads run in a
fresh subprocess so that the memory peak and the process state are this test's alone."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import dynamicrafter
from dynamicrafter import CheckpointError

REPO = Path(__file__).resolve().parents[1]
MAX_PEAK_GROWTH_MB = 4

# ----------------------------------------------------------------------------- pickle opcodes

PROTO, STOP, MARK, TUPLE, TUPLE1, TUPLE2 = b"\x80\x02", b".", b"(", b"t", b"\x85", b"\x86"
REDUCE, BUILD, NEWOBJ, BINPERSID = b"R", b"b", b"\x81", b"Q"
EMPTY_DICT, EMPTY_TUPLE, EMPTY_LIST, SETITEM, SETITEMS, APPENDS = b"}", b")", b"]", b"s", b"u", b"e"
NONE, FALSE, TRUE = b"N", b"\x89", b"\x88"


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def integer(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + REDUCE


def mapping(*pairs: tuple[bytes, bytes]) -> bytes:
    return EMPTY_DICT + MARK + b"".join(k + v for k, v in pairs) + SETITEMS


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    return tup(text("storage"), glob("torch", kind), text(key), text("cpu"), integer(numel)) + BINPERSID


def tensor(key: str, numel: int, size: tuple, stride: tuple) -> bytes:
    return call(glob("torch._utils", "_rebuild_tensor_v2"), storage(key, numel), integer(0),
                tup(*map(integer, size)), tup(*map(integer, stride)), FALSE,
                call(glob("collections", "OrderedDict")))


def pickle_of(body: bytes) -> bytes:
    return PROTO + body + STOP


# ----------------------------------------------------------------------------- containers

def zip_container(pkl: bytes, records: dict | None = None, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", b"little")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def legacy_container(pkl: bytes, storages: dict | None = None) -> bytes:
    """torch's pre-1.6 layout: magic, protocol, sys info, the object, storage keys, then each
    storage as an 8-byte element count and its bytes."""
    storages = storages or {}
    sys_info = mapping((text("protocol_version"), integer(1001)), (text("little_endian"), TRUE),
                       (text("type_sizes"), mapping((text("short"), integer(2)), (text("int"), integer(4)),
                                                    (text("long"), integer(4)))))
    keys = EMPTY_LIST + MARK + b"".join(text(k) for k in storages) + APPENDS
    out = pickle_of(integer(LEGACY_MAGIC)) + pickle_of(integer(1001)) + pickle_of(sys_info) + pkl + pickle_of(keys)
    for numel, data in storages.values():
        out += struct.pack("<q", numel) + data
    return out


# ----------------------------------------------------------------------------- payloads

def as_state_dict(body: bytes) -> bytes:
    return pickle_of(mapping((text("state_dict"), mapping((text("model.diffusion_model.input_blocks.0.0.weight"),
                                                           body)))))


PATCHED_DEFAULTS = tup(text("patched"),)
PAYLOADS = {
    # BUILD with slot state: setattr(function, '__defaults__', ...) on an allowed function
    "build_function_defaults": pickle_of(glob("torch._utils", "_rebuild_tensor_v2")
                                         + tup(NONE, mapping((text("__defaults__"), PATCHED_DEFAULTS))) + BUILD),
    # BUILD on a class: replace a method every later load calls
    "build_class_method": pickle_of(glob("torch", "Tensor") + tup(NONE, mapping(
        (text("set_"), glob("torch._utils", "_rebuild_tensor")))) + BUILD),
    # __setstate__ of the allowed class OrderedDict called on the class itself
    "setstate_on_class": pickle_of(glob("collections", "OrderedDict")
                                   + mapping((text("__getitem__"), glob("torch", "Size"))) + BUILD),
    # BUILD on a stand-in class (an unknown name) to smuggle state through it
    "build_on_unknown_class": pickle_of(glob("omegaconf.dictconfig", "DictConfig")
                                        + tup(NONE, mapping((text("__init__"), glob("torch", "Size")))) + BUILD),
    # persistent_load('module'): the legacy loader's source check can write <class>.patch
    "persistent_module": pickle_of(tup(text("module"), glob("torch.nn.modules.linear", "Linear"), text("evil.py"),
                                       text("class Linear: pass\n")) + BINPERSID),
    # a storage declared as 4 GiB over a 4-byte record
    "huge_storage": as_state_dict(tensor("0", 2 ** 30, (2 ** 30,), (1,))),
    # constructors torch allows, called with huge sizes (bytearray fills its bytes)
    "huge_bytearray": pickle_of(call(glob("builtins", "bytearray"), integer(2 ** 30))),
    "huge_untyped_storage": pickle_of(call(glob("torch.storage", "UntypedStorage"), integer(2 ** 34))),
    "huge_tensor_new": pickle_of(glob("torch", "Tensor") + tup(integer(2 ** 16), integer(2 ** 16)) + NEWOBJ),
    # 40 nested hex encodings double 2 bytes 40 times
    "codec_chain": pickle_of(glob("_codecs", "encode") * 40 + call(glob("_codecs", "encode"), text("ab"),
                                                                   text("latin1"))
                             + (text("hex_codec") + TUPLE2 + REDUCE) * 40),
    # calls whose arguments are not a literal tuple: f(*list), f(*result of a call)
    "bytearray_star_list": pickle_of(glob("builtins", "bytearray") + EMPTY_LIST + MARK + integer(2 ** 31 + 2 ** 29)
                                     + APPENDS + REDUCE),
    "codec_star_call": pickle_of(glob("_codecs", "encode") + call(glob("builtins", "set"), EMPTY_LIST) + REDUCE),
    # a constructor given a shape the pickle computed (torch.Size), whose element count the scan cannot see
    "tensor_of_computed_size": pickle_of(glob("torch", "Tensor") + tup(call(glob("torch", "Size"),
                                                                            tup(integer(2 ** 16), integer(2 ** 16))))
                                         + NEWOBJ),
    # a 4-byte storage shown as a 65536 x 65536 expanded view (16 GiB on its first copy)
    "expanded_view": as_state_dict(tensor("0", 1, (2 ** 16, 2 ** 16), (0, 0))),
    # code execution
    "os_system": pickle_of(call(glob("os", "system"), text("touch MARKER"))),
    "posix_system": pickle_of(call(glob("posix", "system"), text("touch MARKER"))),
    "subprocess_call": pickle_of(call(glob("subprocess", "call"), tup(text("touch"), text("MARKER")))),
    "builtins_eval": pickle_of(call(glob("builtins", "eval"), text("open('MARKER', 'w')"))),
    "builtins_exec": pickle_of(call(glob("builtins", "exec"), text("open('MARKER', 'w')"))),
    "popen_newobj": pickle_of(glob("subprocess", "Popen") + tup(tup(text("touch"), text("MARKER"))) + NEWOBJ),
}
FOUR_BYTES = {"0": b"\0\0\0\0"}
# what each payload's refusal says in a zip container
ZIP_REFUSAL = {
    "build_function_defaults": "Can only build", "build_class_method": "Can only build",
    "setstate_on_class": "Can only build", "build_on_unknown_class": "Can only build",
    "persistent_module": "not a storage", "huge_storage": "declared as 4294967296 bytes but its record holds 4",
    "huge_bytearray": "asks for about", "huge_untyped_storage": "asks for about",
    "huge_tensor_new": "asks for about", "codec_chain": "asks for about",
    "bytearray_star_list": "not a literal tuple", "codec_star_call": "not a literal tuple",
    "tensor_of_computed_size": "computed shape", "expanded_view": "an expanded view",
    "os_system": "names os.system", "posix_system": "names posix.system", "subprocess_call": "no state dict",
    "builtins_eval": "no state dict", "builtins_exec": "no state dict", "popen_newobj": "no state dict",
}


def crafted_files(folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """{label: (file, expected refusal text)} for every payload in every container."""
    out = {}
    for name, pkl in PAYLOADS.items():
        pkl = (pkl.replace(text("touch MARKER"), text(f"touch {marker}"))
               .replace(text("open('MARKER', 'w')"), text(f"open('{marker}', 'w')"))
               .replace(text("MARKER"), text(str(marker))))
        for container, data, expect in (
                ("zip", zip_container(pkl, FOUR_BYTES), ZIP_REFUSAL[name]),
                ("legacy", legacy_container(pkl, {"0": (1, b"\0\0\0\0")}), "legacy pre-1.6 format"),
                ("pickle", pkl, "a bare pickle")):
            path = folder / f"{name}.{container}.ckpt"
            path.write_bytes(data)
            out[f"{name}/{container}"] = (path, expect)
    return out


# ----------------------------------------------------------------------------- the check

PROBE = r"""
import json, os, sys, collections, torch, dynamicrafter
from torch import _weights_only_unpickler as wo

def hwm_kb():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1])

def snapshot():
    return {"defaults": repr(torch._utils._rebuild_tensor_v2.__defaults__),
            "tensor": sorted((k, id(v)) for k, v in vars(torch.Tensor).items()),
            "ordered_dict": sorted((k, id(v)) for k, v in vars(collections.OrderedDict).items()),
            "allowed": sorted((k, id(v)) for k, v in wo._get_allowed_globals().items()),
            "user_allowed": sorted(map(repr, torch.serialization.get_safe_globals()))}

files, benign, expected = json.loads(sys.argv[1])
dynamicrafter.read_state_dict(benign)      # warm up imports, the scan and allocator pools
before, hwm0 = snapshot(), hwm_kb()
results = {}
for label, (path, _) in files.items():
    try:
        dynamicrafter.load_model(path)
        results[label] = "LOADED"
    except dynamicrafter.CheckpointError as e:
        results[label] = "CheckpointError: " + str(e)
    except BaseException as e:
        results[label] = f"{type(e).__name__}: {e}"
hwm1 = hwm_kb()
after = torch.load(benign, weights_only=True)
print(json.dumps({"results": results, "peak_growth_kb": hwm1 - hwm0, "unchanged": snapshot() == before,
                  "benign_ok": all(torch.equal(after[k], torch.tensor(v)) for k, v in expected.items()),
                  "cwd": sorted(os.listdir("."))}))
"""


def test_crafted_checkpoints_are_refused_and_leave_no_trace(tmp_path):
    marker = tmp_path / "cwd" / "pwned"
    (tmp_path / "cwd").mkdir()
    (tmp_path / "files").mkdir()
    files = crafted_files(tmp_path / "files", marker)
    expected = {"w": [1.5, -2.0, 3.25], "n": [7]}
    benign = tmp_path / "files" / "benign.pt"
    torch.save({k: torch.tensor(v) for k, v in expected.items()}, benign)
    arg = json.dumps([{k: (str(p), e) for k, (p, e) in files.items()}, str(benign), expected])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, arg], cwd=tmp_path / "cwd", env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {label: got for label, got in report["results"].items()
             if not (got.startswith("CheckpointError: ") and files[label][1] in got)}
    assert not wrong, json.dumps(wrong, indent=1)
    assert report["unchanged"], "a payload changed torch, OrderedDict or the safe-globals registry"
    assert report["benign_ok"], "a benign weights-only load after the payloads returned other values"
    assert report["cwd"] == [], f"files appeared: {report['cwd']}"
    assert not marker.exists()
    assert report["peak_growth_kb"] < MAX_PEAK_GROWTH_MB * 1024, f"peak memory grew {report['peak_growth_kb']} kB"
    assert len(files) == 3 * len(PAYLOADS)
    print(f"{len(files)} crafted files refused; peak memory growth {report['peak_growth_kb']} kB")


def test_crafted_zip_structure_is_refused(tmp_path):
    """Compressed records (a zip bomb inflates when read) and records beyond the file's end."""
    pkl = as_state_dict(tensor("0", 1, (1,), (1,)))
    (tmp_path / "deflated.ckpt").write_bytes(zip_container(pkl, FOUR_BYTES, compress=True))
    with pytest.raises(CheckpointError, match="is compressed"):
        dynamicrafter.read_state_dict(tmp_path / "deflated.ckpt")
    data = zip_container(pkl, {"0": b"\0" * 4096})
    start = data.index(b"\0" * 4096)
    (tmp_path / "cut.ckpt").write_bytes(data[:start + 100] + data[start + 4096:])   # record body cut short
    with pytest.raises(CheckpointError):
        dynamicrafter.read_state_dict(tmp_path / "cut.ckpt")
    (tmp_path / "missing.ckpt").write_bytes(zip_container(pkl, {}))
    with pytest.raises(CheckpointError, match="no data/0 record"):
        dynamicrafter.read_state_dict(tmp_path / "missing.ckpt")


def test_duplicate_and_case_variant_records_are_refused(tmp_path):
    """Python's zip reader (the pre-check) and torch's could pick different records of one name:
    a second data.pkl, a DATA.PKL beside data.pkl, a second data/0 (a tensor reading other bytes)."""
    import warnings
    benign = as_state_dict(tensor("0", 1, (1,), (1,)))
    bomb = pickle_of(call(glob("builtins", "bytearray"), integer(2 ** 31)))
    cases = {"data.pkl": ("archive/data.pkl", bomb), "DATA.PKL": ("archive/DATA.PKL", bomb),
             "data/0": ("archive/data/0", b"\1" * 4)}
    for label, (name, data) in cases.items():
        raw = zip_container(benign, FOUR_BYTES)
        buf = io.BytesIO(raw)
        with warnings.catch_warnings(), zipfile.ZipFile(buf, "a") as z:
            warnings.simplefilter("ignore")          # zipfile warns of the duplicate name it writes
            z.writestr(name, data)
        path = tmp_path / f"dup_{label.replace('/', '_')}.ckpt"
        path.write_bytes(buf.getvalue())
        with pytest.raises(CheckpointError, match="appears twice") as err:
            dynamicrafter.read_state_dict(path)
        assert "\n" not in str(err.value)


def test_hand_written_benign_zip_loads_exactly(tmp_path):
    """The opcode writer above produces what torch writes: a tensor loads with its bytes."""
    values = torch.tensor([1.0, -2.0, 0.5])
    pkl = as_state_dict(tensor("0", 3, (3,), (1,)))
    (tmp_path / "ok.ckpt").write_bytes(zip_container(pkl, {"0": values.numpy().tobytes()}))
    sd, _ = dynamicrafter.read_state_dict(tmp_path / "ok.ckpt")
    assert torch.equal(sd["model.diffusion_model.input_blocks.0.0.weight"], values)


def test_legacy_file_is_refused_with_a_conversion_that_works(tmp_path):
    sd = {"a": torch.arange(4.0)}
    old = tmp_path / "old.ckpt"
    torch.save(sd, old, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy") as err:
        dynamicrafter.read_state_dict(old)
    command = str(err.value).split('python -c "', 1)[1].split('"', 1)[0]
    new = tmp_path / "new.ckpt"
    subprocess.run([sys.executable, "-c", command.replace("OLD", str(old)).replace("NEW.ckpt", str(new))],
                   check=True, timeout=120)
    assert torch.equal(dynamicrafter.read_state_dict(new)[0]["a"], sd["a"])


def test_lightning_objects_become_inert_stand_ins(tmp_path):
    """Unknown classes (Lightning/OmegaConf objects) are built as stand-ins that keep nothing,
    and the registration does not outlive the load."""
    hparams = glob("omegaconf.dictconfig", "DictConfig") + EMPTY_TUPLE + NEWOBJ + mapping(
        (text("_content"), mapping((text("lr"), integer(3))))) + BUILD
    body = mapping((text("state_dict"), mapping((text("w"), tensor("0", 1, (1,), (1,))))),
                   (text("hyper_parameters"), hparams),
                   (text("callbacks"), call(glob("pytorch_lightning.callbacks", "ModelCheckpoint"), text("x"))))
    (tmp_path / "pl.ckpt").write_bytes(zip_container(pickle_of(body), FOUR_BYTES))
    from dynamicrafter.checkpoints.torch_files import load_torch_file
    registered = set(torch.serialization.get_safe_globals())
    obj = load_torch_file(tmp_path / "pl.ckpt")
    assert torch.equal(obj["state_dict"]["w"], torch.zeros(1))
    for name in ("hyper_parameters", "callbacks"):
        assert type(obj[name]).__name__.startswith("InertStandIn_") and not hasattr(obj[name], "__dict__")
    assert set(torch.serialization.get_safe_globals()) == registered
