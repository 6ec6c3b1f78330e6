"""Crafted training checkpoints (issue #28): a run folder copied from someone else must resume and
export without running code, allocating per the file, following its paths or taking its
optimizer flags. Each crafted file is loaded in one fresh subprocess (peak memory measured as
VmHWM growth, a marker file that a payload would create checked afterwards); each refusal is one
line naming what is wrong."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from training import checkpoint as ck
from training.config import load_config

REPO = Path(__file__).resolve().parents[1]
MAX_PEAK_GROWTH_MB = 200


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def trainee(cfg, seed: float = 0.0):
    """What restore()/save() use of a Trainee: one trainable tensor, its AdamW and LR schedule."""
    from training.optim import lr_factor, make_optimizer
    p = torch.nn.Parameter(torch.full((4,), seed))
    opt = make_optimizer([p], cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    dc = types.SimpleNamespace(cfg=types.SimpleNamespace(to_dict=lambda: {}))
    return types.SimpleNamespace(named=[("w", p)], opt=opt, sched=sched, ema=None, dc=dc)


def make_run(run_dir: Path, **over):
    """A real one-step checkpoint of a one-tensor run; returns (cfg, its folder)."""
    from training.distributed import Env
    from training.state import save
    cfg = load_config(None, ["model.tiny=true", "data.csv=x.csv", f"run.run_dir={run_dir}", "optim.lr=0.1",
                             *[f"{k}={v}" for k, v in over.items()]])
    t = trainee(cfg, 1.0)
    t.named[0][1].grad = torch.ones(4)
    t.opt.step()
    t.sched.step()
    save(cfg, Env(0, 1, torch.device("cpu"), False, 1), t, 1)
    return cfg, ck.checkpoint_path(str(run_dir), 1)


def rewrite_meta(folder: str, edit) -> None:
    path = os.path.join(folder, ck.META)
    meta = torch.load(path, weights_only=True)
    edit(meta)
    torch.save(meta, path)


def rewrite_index(folder: str, edit) -> None:
    """Re-pickle DCP's .metadata (we wrote it, so plain pickle is fine here) after `edit`."""
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as fh:
        md = pickle.load(fh)
    edit(md)
    with open(path, "wb") as fh:
        pickle.dump(md, fh)


PROBE = r"""
import json, os, sys, torch
from training import checkpoint as ck
from dynamicrafter.config import CheckpointError

def hwm_kb():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmHWM")).split()[1])

cases = json.loads(sys.argv[1])
ck.read_all(cases.pop("_benign")[1])        # warm up imports and allocator pools
results = {}
for label, (how, path) in cases.items():
    before = hwm_kb()
    try:
        if how == "read_all":
            ck.read_all(path)
        elif how == "load_sharded":
            ck.load_sharded(path, {"trainable/w": torch.zeros(4)})
        else:
            ck.read_meta(path)
        results[label] = ["LOADED", 0]
    except (ck.ResumeError, CheckpointError) as e:
        results[label] = [f"{type(e).__name__}: {e}", hwm_kb() - before]
    except BaseException as e:
        results[label] = [f"UNEXPECTED {type(e).__name__}: {e}", hwm_kb() - before]
print(json.dumps(results))
"""


def test_crafted_training_checkpoints_are_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    _, benign = make_run(tmp_path / "benign")
    cases, expect = {"_benign": ["", benign]}, {}

    def crafted(label, how, why, edit_index=None, edit_meta=None, index_bytes=None):
        _, folder = make_run(tmp_path / label)
        if edit_index:
            rewrite_index(folder, edit_index)
        if edit_meta:
            rewrite_meta(folder, edit_meta)
        if index_bytes is not None:
            Path(folder, ".metadata").write_bytes(index_bytes)
        cases[label] = [how, folder]
        expect[label] = why

    touch = text(f"touch {marker}")
    crafted("index_runs_a_command", "load_sharded", "names posix.system",
            index_bytes=b"\x80\x02" + glob("posix", "system") + b"(" + touch + b"tR.")
    crafted("index_subprocess", "read_all", "names subprocess.Popen",
            index_bytes=b"\x80\x02" + glob("subprocess", "Popen") + b"((" + text("touch") + text(str(marker))
            + b"ttR.")
    crafted("index_bytearray_bomb", "read_all", "names builtins.bytearray",
            index_bytes=b"\x80\x02" + glob("builtins", "bytearray") + b"(J\xff\xff\xff\x7ftR.")

    def outside(md):
        for info in md.storage_data.values():
            info.relative_path = "../../benign/checkpoints/step_00000001/__0_0.distcp"
    crafted("index_path_outside", "load_sharded", "not a __<rank>_<n>.distcp file", edit_index=outside)

    def transform(md):
        for info in md.storage_data.values():
            info.transform_descriptors = ["zstd"]
    crafted("index_transform", "load_sharded", "storage transforms", edit_index=transform)

    def huge(md):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        for v in md.state_dict_metadata.values():
            v.size = torch.Size([60000, 60000])
            v.chunks = [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([60000, 60000]))]
    crafted("index_huge_shape", "read_all", "shard files hold", edit_index=huge)

    def past_end(md):
        for info in md.storage_data.values():
            info.length = 1 << 40
    crafted("index_record_past_end", "load_sharded", "does not hold", edit_index=past_end)

    blob = _zip_pickle(b"\x80\x02" + glob("builtins", "bytearray") + b"(J\xff\xff\xff\x7ftR.")

    def shard_bomb(md):
        for info in md.storage_data.values():
            info.offset, info.length = 0, len(blob)
    crafted("shard_record_bomb", "load_sharded", "asks for about", edit_index=shard_bomb)
    Path(cases["shard_record_bomb"][1], "__0_0.distcp").write_bytes(blob)

    crafted("meta_bytearray_bomb", "read_meta", "not a literal tuple")
    Path(cases["meta_bytearray_bomb"][1], ck.META).write_bytes(_zip_pickle(
        b"\x80\x02" + glob("builtins", "bytearray") + b"]" + b"(J\xff\xff\xff\x7feR."))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {k: v for k, v in results.items() if expect[k] not in v[0] or "UNEXPECTED" in v[0] or "\n" in v[0]}
    assert not wrong, json.dumps(wrong, indent=1)
    grown = {k: v[1] for k, v in results.items() if v[1] > MAX_PEAK_GROWTH_MB * 1024}
    assert not grown, f"peak memory grew (kB): {grown}"
    assert not marker.exists()


def _zip_pickle(pkl: bytes) -> bytes:
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


def test_restore_takes_hyperparameters_and_flags_from_the_config_not_the_file(tmp_path):
    from training.distributed import Env
    from training.state import restore
    cfg, folder = make_run(tmp_path / "run")

    def flags(meta):
        for g in meta["optimizer"]["param_groups"]:
            g.update(maximize=True, lr=100.0, betas=(0.0, 0.0), eps=1.0, weight_decay=5.0, amsgrad=True)
        meta["scheduler"]["base_lrs"] = [100.0]
        meta["scheduler"]["evil"] = "x"
    rewrite_meta(folder, flags)
    t = trainee(cfg)
    restore(ck.read_meta(folder), cfg, Env(0, 1, torch.device("cpu"), False, 1), t)
    g = t.opt.param_groups[0]
    assert g["maximize"] is False and g["amsgrad"] is False and g["betas"] == tuple(cfg.optim.betas)
    assert g["eps"] == cfg.optim.eps and g["weight_decay"] == cfg.optim.weight_decay
    assert t.sched.base_lrs == [0.1] and not hasattr(t.sched, "evil")
    assert torch.equal(t.named[0][1].detach(), ck.read_all(folder)["trainable/w"])    # the shard's values
    assert int(t.opt.state[t.named[0][1]]["step"]) == 1


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["optimizer"]["layout"]["w"].update(exp_avg={"like_param": False, "shape": [60000, 60000],
                                                             "dtype": "float32", "on_cpu": True}),
     "optimizer.layout['w']['exp_avg'] shape [60000, 60000] is larger than parameter 'w'"),
    (lambda m: m["optimizer"]["layout"]["w"].update(evil={"value": 1}), "adamw keeps no state 'evil'"),
    (lambda m: m["optimizer"]["layout"].update(other={}), "names 'other', not a trainable parameter"),
    (lambda m: m["optimizer"]["layout"]["w"]["step"].update(dtype="float64x"), "dtype 'float64x' is none of"),
    (lambda m: m.update(step=10 ** 15), "step 1000000000000000 is out of range"),
    (lambda m: m.update(rng=[{"torch": torch.zeros(3)}]), "rng holds no valid"),
    (lambda m: m.update(config="[1]"), "config is not the trainer's config"),
])
def test_restore_checks_what_the_file_declares_before_allocating(tmp_path, edit, field):
    from training.distributed import Env
    from training.state import restore
    cfg, folder = make_run(tmp_path / "run")
    rewrite_meta(folder, edit)
    with pytest.raises(ck.ResumeError) as err:
        restore(ck.read_meta(folder), cfg, Env(0, 1, torch.device("cpu"), False, 1), trainee(cfg))
    assert field in str(err.value) and "\n" not in str(err.value)


def test_export_follows_no_path_outside_the_run_folder(tmp_path):
    from training import export
    run = tmp_path / "run"
    make_run(run)
    folder = ck.checkpoint_path(str(run), 1)

    def init_outside(m):
        c = json.loads(m["config"])
        c["model"].update(tiny=False, init="../elsewhere/private.safetensors")
        m["config"] = json.dumps(c)
    rewrite_meta(folder, init_outside)
    out = tmp_path / "out.safetensors"
    with pytest.raises(SystemExit, match=r"^error: .*model.init='\.\./elsewhere/private.safetensors', outside the "
                                         r"run folder.*--init PATH"):
        export.main([str(run), "--out", str(out)])

    def huge_tiny(m):
        c = json.loads(m["config"])
        c["model"].update(tiny=True, init=None, tiny_overrides={"unet": {"model_channels": 4096}})
        m["config"] = json.dumps(c)
    rewrite_meta(folder, huge_tiny)
    with pytest.raises(SystemExit, match=r"^error: .*M-parameter model, not a tiny one"):
        export.main([str(run), "--out", str(out)])
    assert not out.exists()
