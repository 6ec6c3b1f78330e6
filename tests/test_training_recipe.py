"""The recipe traps of issue 15: each test failed on the trainer before the fix.

Stage 1 keeps the base objective; EMA warm-up and an export that says which weights it holds;
resume lists config changes and refuses the ones that change the run; ResBlock dropout 0.1;
fp32 stage hand-offs; stage 1's fixed fs; CLIP sees the concat frame of interpolation samples;
seeking decode, trim columns, empty captions, common column names, the CSV read once, sizes
checked at load, and one-line user errors."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from training import synthetic
from training.config import ConfigError, TrainConfig, load_config
from training.data import (DatasetError, VideoDataset, decode_frames, make_dataset, read_annotations,
                           shared_records)
from training.modeling import EMA, build_tiny
from training.stages import StageSettings, draw, prepare_model_for_stage, stage_loss

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIGS = os.path.join(ROOT, "training", "configs")
SMOKE = os.path.join(CONFIGS, "tiny_smoke.yaml")
TINY = yaml.safe_load(open(SMOKE))["model"]["tiny_overrides"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe_clips")
    return synthetic.generate_dataset(str(out), 3, height=32, width=32, frames=8, fps=8, seed=5)


def tiny(frames=4):
    return build_tiny(frames, 0, {k: dict(v) for k, v in TINY.items()})


def batch_of(csv, indices, frames=4):
    from training.data import collate
    ds = make_dataset(csv, frames=frames, height=32, width=32, max_stride=2)
    return collate([ds[k] for k in indices])


# ------------------------------------------------------------------------ 1. stage 1 objective

def test_stage1_keeps_the_base_parameterisation():
    s1 = yaml.safe_load(open(os.path.join(CONFIGS, "stage1.yaml")))
    assert not {"parameterization", "zero_snr"} & set(s1["model"].get("variant", {}))
    s2 = yaml.safe_load(open(os.path.join(CONFIGS, "stage2.yaml")))
    assert s2["model"]["variant"]["parameterization"] == "v" and s2["model"]["variant"]["zero_snr"]
    with pytest.raises(ConfigError, match="switch to v \\+ zero-SNR in stage 2"):
        load_config(None, ["data.csv=x.csv", "model.init=vc2.ckpt", "run.stage=1",
                           "model.variant={parameterization: v, zero_snr: true}"])
    load_config(None, ["data.csv=x.csv", "model.init=vc2.ckpt", "run.stage=2",
                       "model.variant={parameterization: v, zero_snr: true}"])


# ------------------------------------------------------------------------ 2. EMA warm-up

def test_ema_warms_up_so_a_short_finetune_moves_it():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], decay=0.9999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()                       # first update: decay (1+0)/(10+0) = 0.1
    assert torch.allclose(ema.shadow["w"], torch.full((3,), 0.9))
    for _ in range(1999):
        ema.update()
    # share of the initial weights left after 2,000 steps (it was 0.9999**2000 = 82 %)
    assert float(1 - ema.shadow["w"][0]) < 0.01
    assert ema.current_decay() == pytest.approx(2001 / 2010)
    assert "2000 updates" in ema.describe()
    state = ema.state_dict()
    again = EMA([("w", p)], decay=0.9999)
    again.load_state_dict(state)
    assert again.num_updates == 2000


# ------------------------------------------------------------------------ 4. dropout

def test_resblock_dropout_is_configurable_and_official_by_default(clips):
    from dynamicrafter.models.unet import ResBlock
    from training.modeling import build_model

    def dropouts(*overrides):
        cfg = load_config(SMOKE, [f"data.csv={clips}", *overrides])
        dc = build_model(cfg)
        return {layer.p for m in dc.unet.modules() if isinstance(m, ResBlock)
                for layer in m.out_layers if isinstance(layer, torch.nn.Dropout)}

    assert TrainConfig().model.dropout == 0.1
    assert dropouts() == {0.1}
    assert dropouts("model.dropout=0.0") == {0.0}


# ------------------------------------------------------------------------ 5. hand-offs, fs, CLIP frame

def test_stage_handoffs_default_to_fp32():
    assert TrainConfig().run.export_dtype == "fp32"
    for name in ("stage1.yaml", "stage2.yaml"):
        assert yaml.safe_load(open(os.path.join(CONFIGS, name)))["run"]["export_dtype"] == "fp32"


def test_stage1_uses_the_default_fs_whatever_the_clip(clips):
    dc = tiny()
    prepare_model_for_stage(dc, 1)
    st = StageSettings(stage=1, seed=0, uncond_prob=0.0)
    batch = batch_of(clips, [0, 1])
    a = batch | {"fs": torch.tensor([1, 2])}
    b = batch | {"fs": torch.tensor([7, 30])}
    with torch.no_grad():
        la, lb = stage_loss(dc, a, st), stage_loss(dc, b, st)
        default = batch | {"fs": torch.full((2,), int(dc.variant["default_fs"]))}
        ref = stage_loss(dc, default, st)
    assert torch.equal(la, lb) and torch.equal(la, ref)
    # in stage 2 the clip's fs does matter
    dc2 = tiny()
    st2 = StageSettings(stage=2, seed=0, uncond_prob=0.0)
    with torch.no_grad():
        assert not torch.equal(stage_loss(dc2, a, st2), stage_loss(dc2, b, st2))


def test_interpolation_samples_show_clip_the_first_frame(clips, monkeypatch):
    dc = tiny()
    prepare_model_for_stage(dc, 3)
    indices = list(range(4))
    d = draw(0, torch.tensor(indices), latent_shape=(4, 4, 4), frames=4, num_timesteps=1000, uncond_prob=0.0,
             cond_frame="random", query_groups=4, interp_prob=1.0)
    assert (d.cond_frame != 0).any(), "pick indices whose random conditioning frame is not the first"
    batch = batch_of(clips, indices)
    seen = []
    real = dc.encode_clip_image
    monkeypatch.setattr(dc, "encode_clip_image", lambda img: seen.append(img.clone()) or real(img))
    with torch.no_grad():
        stage_loss(dc, batch, StageSettings(stage=3, seed=0, uncond_prob=0.0, interp_prob=1.0))
    assert torch.equal(seen[0], batch["video"][:, :, 0])


# ------------------------------------------------------------------------ 6. data

def test_decoding_seeks_to_the_clip_start(tmp_path):
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 255, (1, 16, 16, 3)) + np.arange(64)[:, None, None, None] * 3).astype(np.uint8)
    path = str(tmp_path / "long.mp4")
    synthetic.write_video(frames, path, fps=8, keyframe_every=8)
    full = decode_frames(path, list(range(64)))
    for wanted in ([50, 52, 54], [3, 4], [0, 7], [56, 63, 63]):
        stats = {}
        got = decode_frames(path, wanted, stats)
        assert np.array_equal(got, full[wanted]), wanted
        # decoding starts at the keyframe before the clip: at most one keyframe interval + the clip
        assert stats["decoded"] <= 8 + wanted[-1] - wanted[0] + 1, (wanted, stats)


def test_trim_columns_empty_captions_and_column_names(tmp_path, clips, caplog):
    videos = [r.path for r in read_annotations(clips)]
    for path_col, cap_col in (("path", "caption"), ("file", "text"), ("video", "prompt")):
        csv_path = tmp_path / f"{path_col}_{cap_col}.csv"
        csv_path.write_text(f"{path_col},{cap_col}\n{videos[0]},a cat\n")
        assert [(r.path, r.caption) for r in read_annotations(str(csv_path))] == [(videos[0], "a cat")]
    trimmed = tmp_path / "trimmed.csv"      # 8 frames at 8 fps: keep [0.5 s, 1.0 s) = frames 4..7
    trimmed.write_text(f"video,caption,start,end\n{videos[0]},a,0.5,1.0\n{videos[1]},,,\n{videos[2]},  ,,\n")
    with caplog.at_level(logging.WARNING, logger="training.data"):
        ds = make_dataset(str(trimmed), frames=4, height=32, width=32, max_stride=1)
    assert "2 of 3 rows have an empty caption" in caplog.text
    full = torch.from_numpy(decode_frames(videos[0], list(range(8)))).permute(3, 0, 1, 2).float() / 127.5 - 1
    first = [ds[k] for k in range(9) if ds[k]["path"] == videos[0]]
    assert first and all(torch.allclose(it["video"], full[:, 4:8], atol=1e-5) for it in first)
    bad = tmp_path / "bad.csv"
    bad.write_text(f"video,caption,start_time,end_time\n{videos[0]},a,2,1\n")
    with pytest.raises(DatasetError, match="line 2: end_time=1.0 is not after start_time=2.0"):
        read_annotations(str(bad))


def test_csv_is_read_and_checked_once_on_rank0(clips, monkeypatch):
    import training.data as data
    rank0 = shared_records(clips, None, rank=0)
    calls = []
    monkeypatch.setattr(data, "read_annotations", lambda *a: calls.append(a))
    monkeypatch.setattr(data.os.path, "isfile", lambda p: calls.append(p))
    got = shared_records(clips, None, rank=1, broadcast=lambda obj: ("ok", rank0) if obj is None else obj)
    assert got == rank0 and calls == []          # rank 1 neither reads the CSV nor stats a video
    ds = make_dataset(clips, records=got, frames=4, height=32, width=32)
    assert isinstance(ds, VideoDataset) and calls == []
    with pytest.raises(DatasetError, match="not found"):    # rank 0's error reaches every rank
        shared_records("absent.csv", None, rank=1, broadcast=lambda obj: ("error", "caption CSV not found: x"))


def test_sizes_checked_at_config_load_with_the_nearest_valid_one():
    with pytest.raises(ConfigError, match="data.height=300 is not a multiple of 64 .*nearest valid: data.height=320"):
        load_config(None, ["model.tiny=true", "data.csv=x.csv", "data.height=300"])
    with pytest.raises(ConfigError, match="data.width=40 is not a multiple of 16.*nearest valid: data.width=(32|48)"):
        load_config(SMOKE, ["data.width=40"])
    assert load_config(SMOKE, ["data.width=48"]).data.width == 48      # two UNet levels: multiples of 16


def _train_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("DCTRAIN_FAULT", None)
    return subprocess.run([sys.executable, "-m", "training.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides,message", [
    (["data.csv=nowhere/absent.csv"], "error: caption CSV not found: nowhere/absent.csv"),
    (["data.height=40"], "error: data.height=40 is not a multiple of 16"),
    (["run.stage=5"], "error: run.stage must be 1, 2 or 3"),
])
def test_user_errors_are_one_line_and_exit_nonzero(tmp_path, overrides, message):
    p = _train_cli(SMOKE, "data.csv=x.csv", f"run.run_dir={tmp_path / 'run'}", *overrides)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(message), p.stderr[-2000:]


# ------------------------------------------------------------------------ 3. resume with changes

def test_resume_lists_changes_and_needs_permission_for_lr(tmp_path, clips):
    run = tmp_path / "run"
    base = [SMOKE, f"data.csv={clips}", f"run.run_dir={run}", "run.stage=2", "run.save_every=1",
            "run.global_batch=2", "run.micro_batch=2", "run.ema_decay=0.9999"]
    p = _train_cli(*base, "run.max_steps=1", f"data.val_csv={clips}", "eval.val_every=1", "eval.val_clips=2")
    assert p.returncode == 0, p.stderr[-3000:]
    val = [json.loads(x) for x in open(run / "log.jsonl") if "val_loss" in x]
    assert len(val) == 1 and val[0]["step"] == 1 and len(val[0]["val_loss_t"]) == 5
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["weights"].startswith("EMA weights (decay 0.9999, 1 updates")
    from safetensors import safe_open
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        assert f.metadata()["training_weights"] == out["weights"]
        assert f.get_tensor("image_proj_model.proj_out.weight").dtype == torch.float32   # fp32 by default

    base += [f"data.val_csv={clips}", "eval.val_every=1", "eval.val_clips=2"]   # not a guarded change
    changed = [*base, "run.max_steps=2", "optim.lr=3e-4"]
    p = _train_cli(*changed)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "optim.lr 0.001 -> 0.0003" in last and "--allow-config-change" in last, last
    p = _train_cli(*changed, "--allow-config-change")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming with config changes" in p.stderr and "run.max_steps: 1 -> 2" in p.stderr
    logged = [r for r in map(json.loads, open(run / "log.jsonl")) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2]
    assert logged[0]["lr"] == pytest.approx(1e-3) and logged[1]["lr"] == pytest.approx(3e-4)
    # a data change is refused too; a change of only max_steps goes through
    other = tmp_path / "other.csv"
    other.write_text(open(clips).read())
    p = _train_cli(*base, "run.max_steps=3", "optim.lr=3e-4", f"data.csv={other}")
    assert p.returncode == 2 and "data.csv" in p.stderr.strip().splitlines()[-1]
    p = _train_cli(*base, "run.max_steps=3", "optim.lr=3e-4")
    assert p.returncode == 0, p.stderr[-3000:]


# ------------------------------------------------------------------------ validation loss

def test_validation_loss_is_fixed_across_runs(clips):
    from training.data import collate
    from training.stages import StageSettings
    from training.modeling import build_model
    from training.train import validation_items, validation_loss
    common = [f"data.csv={clips}", f"data.val_csv={clips}", "eval.val_every=1", "eval.val_clips=2",
              "eval.val_timesteps=[200, 800]", "run.stage=2", "run.micro_batch=1", "run.global_batch=2"]
    cfg = load_config(SMOKE, common)
    other = load_config(SMOKE, [*common, "run.seed=7", "data.uncond_prob=0.2", "run.cond_frame=random"])
    dc = build_model(cfg)
    dc.train()
    a = validation_loss(dc, validation_items(cfg, "frame_stride"), cfg)
    assert dc.training                                          # back in training mode afterwards
    b = validation_loss(dc, validation_items(other, "frame_stride"), other)
    assert a == b                                               # independent of the run's seed and draws
    assert a["val_loss_t"][200] != a["val_loss_t"][800]
    items = validation_items(cfg, "frame_stride")
    dc.eval()
    with torch.no_grad():
        ref = stage_loss(dc, collate(items), StageSettings(stage=2, seed=cfg.eval.seed, uncond_prob=0.0,
                                                           cond_frame="first", fixed_t=800))
    assert float(ref) == pytest.approx(a["val_loss_t"][800], rel=1e-6)
    with pytest.raises(ConfigError, match="needs data.val_csv"):
        load_config(SMOKE, [f"data.csv={clips}", "eval.val_every=5"])


# ------------------------------------------------------------------------ latent / text cache

def test_training_on_the_cache_equals_training_on_the_videos(tmp_path, clips):
    import json as _json

    from training import checkpoint as ck
    from training.cache import Cache, CachedDataset
    from training.data import collate, shared_records
    from training.modeling import build_model
    from training.train import run

    opts = ["run.stage=3", "run.global_batch=2", "run.micro_batch=2", "data.uncond_prob=0.3", "run.interp_prob=0.5"]
    # the same samples give the same loss from the cache as from the videos
    cfg = load_config(SMOKE, [f"data.csv={clips}", *opts])
    dc = build_model(cfg)
    records = shared_records(clips, None)
    kw = dict(frames=4, height=32, width=32, max_stride=2, seed=0)
    cache = Cache(str(tmp_path / "cache"), dc, 32, 32)
    assert cache.build(dc, records) == 3 and cache.build(dc, records) == 0       # built once
    videos, cached = make_dataset(clips, records=records, **kw), CachedDataset(records, cache, **kw)
    st = StageSettings(stage=3, seed=0, uncond_prob=0.3, interp_prob=0.5)
    from training.train import train_mode
    train_mode(dc)       # dropout on: the masks must match too (they follow the tensors' memory layout)
    with torch.no_grad():
        for ks in ([0, 1], [2, 3], [4, 5, 6, 7]):
            torch.manual_seed(ks[0])
            a = stage_loss(dc, collate([videos[k] for k in ks]), st)
            torch.manual_seed(ks[0])
            b = stage_loss(dc, collate([cached[k] for k in ks]), st)
            assert float(a) == pytest.approx(float(b), rel=1e-6, abs=1e-7), ks

    # and a run trains the same from either. Adam's first step is lr * g / (|g| + eps): with the
    # default eps, a gradient element that is rounding noise (the encoders see other batch
    # shapes in the cache, so gradients differ by ~1e-5 relative) becomes a full +-lr step of
    # random sign, and the step-2 loss moved 8e-5 between runs of the suite. eps = 1 makes the
    # step lr * g, smooth in g, so the losses of steps 2 and 3 compare the gradients themselves.
    def train(name, *extra):
        run(load_config(SMOKE, [f"data.csv={clips}", f"run.run_dir={tmp_path / name}", "run.max_steps=3",
                                "run.save_every=3", "run.tensorboard=false", "optim.lr=0.1", "optim.eps=1.0",
                                *opts, *extra]))
        return [r["loss"] for r in map(_json.loads, open(tmp_path / name / "log.jsonl")) if "loss" in r]

    from_videos = train("videos")
    from_cache = train("cached", f"data.cache_dir={tmp_path / 'cache'}")
    assert from_cache == pytest.approx(from_videos, rel=1e-5)
    still = train("still", "optim.lr=0")                       # it trains: the same samples, no steps
    assert still[0] == from_videos[0] and from_videos[2] < still[2] - 0.01
    assert len(glob_cache(tmp_path / "cache")) == 3 and len(from_videos) == 3
    assert ck.load_latest(str(tmp_path / "cached"))["step"] == 3


def glob_cache(root):
    import glob as g
    return sorted(g.glob(str(root / "*" / "videos" / "*.pt")))
