"""Run config parsing and the atomic checkpoint store (no model needed)."""
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from training import checkpoint as ck
from training.config import TrainConfig, load_config


def test_yaml_toml_and_overrides(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text(textwrap.dedent("""
        model: {tiny: true}
        data: {csv: data/x.csv, height: 64, width: 64}
        optim: {lr: 1.0e-4, warmup_steps: 10}
        run: {stage: 1, global_batch: 8, micro_batch: 2}
    """))
    cfg = load_config(str(y), ["run.max_steps=7", "optim.lr=3e-5", "optim.betas=[0.8, 0.9]", "eval.prompts=[a, b]"])
    assert cfg.run.stage == 1 and cfg.run.max_steps == 7 and cfg.optim.lr == 3e-5
    assert cfg.optim.betas == (0.8, 0.9) and cfg.eval.prompts == ["a", "b"]
    assert cfg.accumulation(world=2) == 2 and cfg.accumulation(world=1) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        cfg.accumulation(world=3)
    t = tmp_path / "run.toml"
    t.write_text('[model]\ntiny = true\n[run]\nstage = 2\nprecision = "bf16"\n')
    cfg2 = load_config(str(t), ["data.csv=x.csv"])
    assert cfg2.run.stage == 2 and cfg2.run.precision == "bf16"
    assert TrainConfig.from_dict(cfg2.to_dict()).to_dict() == cfg2.to_dict()


@pytest.mark.parametrize("override,match", [
    ("run.stag=1", "unknown config key run.stag"),
    ("runs.stage=1", "unknown config section"),
    ("run.stage=4", "run.stage must be 1, 2 or 3"),
    ("run.precision=fp16", "precision"),
    ("data.uncond_prob=0.5", "uncond_prob"),
    ("stage=1", "section.key=value"),
])
def test_bad_config_is_explained(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, ["model.tiny=true", "data.csv=x.csv", override])


def test_config_needs_a_model_and_data():
    with pytest.raises(ValueError, match="model.init"):
        load_config(None, ["data.csv=x.csv"])
    with pytest.raises(ValueError, match="set data.csv"):
        load_config(None, ["model.tiny=true"])


def _save(run, step, tensors):
    return ck.save_sharded(tensors, {"step": step}, run, step, rank=0)


def test_sharded_store_keep_last_and_latest(tmp_path):
    run = str(tmp_path)
    for step in (2, 4, 6, 8):
        _save(run, step, {"trainable/w": torch.full((3,), float(step)), "optim/w/step": torch.tensor(float(step))})
        ck.prune(run, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(run)] == [6, 8]
    latest = ck.load_latest(run)
    assert latest["step"] == 8 and latest["path"] == ck.checkpoint_path(run, 8)
    assert sorted(os.listdir(latest["path"])) == [".metadata", "__0_0.distcp", ck.META]
    full = ck.read_all(latest["path"])
    assert full["trainable/w"].tolist() == [8.0] * 3 and float(full["optim/w/step"]) == 8.0
    assert ck.read_all(latest["path"], prefix="optim/").keys() == {"optim/w/step"}
    target = {"trainable/w": torch.zeros(3)}           # load fills the caller's tensors in place
    ck.load_sharded(latest["path"], target)
    assert target["trainable/w"].tolist() == [8.0] * 3
    # a newest checkpoint whose meta.pt is truncated (e.g. disk full on an odd filesystem) falls back
    path10 = _save(run, 10, {"trainable/w": torch.ones(3)})
    with open(os.path.join(path10, ck.META), "wb") as fh:
        fh.write(b"PK\x03\x04 truncated")
    assert ck.load_latest(run)["step"] == 8
    # temporaries are never listed and are cleaned up
    os.makedirs(ck.checkpoint_path(run, 12) + ck.TMP_MARK + "save")
    assert 12 not in [s for s, _ in ck.list_checkpoints(run)]
    assert ck.remove_stale_temporaries(run) == ["step_00000012" + ck.TMP_MARK + "save"]


def test_single_file_checkpoints_of_the_old_format_are_refused_with_a_message(tmp_path):
    os.makedirs(ck.checkpoint_dir(str(tmp_path)))
    torch.save({"step": 2}, os.path.join(ck.checkpoint_dir(str(tmp_path)), "step_00000002.pt"))
    with pytest.raises(ck.ResumeError, match="older version.*new run.run_dir"):
        ck.load_latest(str(tmp_path))
    from training import export      # and export says it in one line, not a traceback
    with pytest.raises(SystemExit, match="^error: .*older version"):
        export.main([str(tmp_path), "--out", str(tmp_path / "m.safetensors")])


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    path = str(tmp_path / "meta" / ck.META)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ck.atomic_save({"step": 3, "x": Boom()}, path)
    assert os.listdir(os.path.dirname(path)) == []


def test_sigkill_during_save_never_leaves_a_loadable_partial(tmp_path):
    run = str(tmp_path)
    code = textwrap.dedent(f"""
        import torch
        from training import checkpoint as ck
        ck.save_sharded({{"trainable/w": torch.ones(1000)}}, {{"step": 1}}, {run!r}, 1, rank=0)
        ck.save_sharded({{"trainable/w": torch.ones(100000) * 2}}, {{"step": 2}}, {run!r}, 2, rank=0)
        print("not reached")
    """)
    env = dict(os.environ, DCTRAIN_FAULT="kill_in_save:2")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == -9, p.stderr
    names = sorted(os.listdir(ck.checkpoint_dir(run)))
    assert names == ["step_00000001", "step_00000002" + ck.TMP_MARK + "save"]
    partial = os.path.join(ck.checkpoint_dir(run), names[1])
    assert os.path.getsize(os.path.join(partial, "__0_0.distcp")) > 100000   # the shard was written
    latest = ck.load_latest(run)
    assert latest["step"] == 1 and ck.read_all(latest["path"])["trainable/w"].tolist() == [1.0] * 1000
    ck.remove_stale_temporaries(run)
    assert os.listdir(ck.checkpoint_dir(run)) == ["step_00000001"]


def test_rng_state_roundtrip_through_safe_load(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    path = str(tmp_path / "r.pt")
    ck.atomic_save({"rng": state}, path)
    ck.set_rng_state(torch.load(path, weights_only=True)["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_eight_bit_adam_needs_bitsandbytes_and_says_so(monkeypatch):
    import builtins
    from training.train import make_optimizer
    real_import = builtins.__import__

    def no_bnb(name, *a, **kw):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    cfg = load_config(None, ["model.tiny=true", "data.csv=x.csv", "optim.name=adamw8bit"])
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg)
    plain = make_optimizer([torch.nn.Parameter(torch.zeros(2))],
                           load_config(None, ["model.tiny=true", "data.csv=x.csv"]))
    assert isinstance(plain, torch.optim.AdamW)
