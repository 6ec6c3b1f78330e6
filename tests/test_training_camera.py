"""CamI2V camera-control fine-tuning (run.camera): the pose-file dataset, the synthetic rooms, the trainable
set (exactly the camera modules), gradient flow, a DynamiCrafter start (fresh modules, official init and
layout) and the export that dynamicrafter.load_model reads back as family "cami2v"."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from conftest import _reference_file
from safetensors import safe_open

import dynamicrafter
from dynamicrafter import camera as geometry
from dynamicrafter.checkpoints.loader import model_from_state_dict
from dynamicrafter.config import with_camera
from dynamicrafter.model import DynamiCrafter
from dynamicrafter.sampling.schedule import schedule_buffers
from training import synthetic_camera
from training.camera import camera_names, is_camera_parameter
from training.config import ConfigError, load_config
from training.data import DatasetError, collate, make_dataset
from training.stages import StageSettings, stage_loss
from training.train import run

import comfy_runtime

HERE = os.path.dirname(__file__)
TINY_CAMERA = os.path.join(HERE, "..", "training", "configs", "tiny_camera.yaml")
LAYOUTS = comfy_runtime.reference_dir() / "layouts"


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    """Three 12-frame synthetic camera clips, 64x64."""
    return synthetic_camera.generate_dataset(str(tmp_path_factory.mktemp("rooms")), 3, height=64, width=64,
                                             frames=12, seed=1)


def camera_config(csv_path, run_dir, init, *extra):
    return load_config(TINY_CAMERA, [f"data.csv={csv_path}", f"run.run_dir={run_dir}", f"model.init={init}",
                                     "run.max_steps=2", *extra])


def snapshot(dc):
    return {k: v.detach().clone() for k, v in dc.state_dict().items()}


def assert_only_camera_changed(before, after, dc):
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    camera = set(camera_names(dc))
    assert changed == camera, (sorted(changed - camera)[:3], sorted(camera - changed)[:3])


def assert_gradient_reaches_exactly_the_camera_modules(dc, csv_path):
    ds = make_dataset(csv_path, frames=8, height=64, width=64, max_stride=1)
    loss = stage_loss(dc, collate([ds[5]]), StageSettings(stage=3, seed=3, uncond_prob=0.0, camera=True))
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in dc.named_parameters() if p.grad is not None}
    # pose-encoder levels deeper than the deepest UNet level with camera modules feed nothing (tiny_v:
    # its 128-wide levels are as wide as init_attn and get no camera modules, MODEL-SPEC-CAMI2V §6.2)
    deepest = max(t.camera_level for t in dc.unet.modules()
                  if any(hasattr(b, "pluker_projection") for b in getattr(t, "transformer_blocks", [])))
    unused = tuple(f"pose_encoder.encoder_down_{kind}_blocks.{level}." for kind in ("conv", "attention")
                   for level in range(deepest + 1, len(dc.cfg.camera.channels)))
    assert set(grads) == {n for n in camera_names(dc) if not n.startswith(unused)}
    groups = {"pose_encoder.": 0.0, ".pluker_projection.": 0.0, ".epipolar.": 0.0}
    for n, g in grads.items():
        for k in groups:
            if k in n:
                groups[k] += float(g.abs().sum())
    assert all(v > 0 for v in groups.values()), groups


# ----------------------------------------------------------------------------- data

def test_pose_file_dataset_follows_the_stride_and_the_crop(tmp_path):
    """Clips of a 64x96 room cropped to 64x64: RT are the pose rows of the sampled frames, and K is the
    camera that renders the cropped pixels (the room rendered anew with K matches the frames)."""
    csv_path = synthetic_camera.generate_dataset(str(tmp_path), 1, height=64, width=96, frames=12, seed=4)
    row = next(csv.DictReader(open(csv_path)))
    rows = geometry.read_pose_rows(tmp_path / row["poses"])
    ds = make_dataset(csv_path, frames=4, height=64, width=64, max_stride=3, seed=2)
    strides = set()
    for k in range(4):
        item = ds[k]
        w2c = geometry.w2c_from_rows(rows).float()
        start = int(torch.argmin((w2c - item["RT"][0]).abs().flatten(1).sum(1)))
        want = w2c[start + item["stride"] * torch.arange(4)]
        assert torch.equal(item["RT"], want)
        strides.add(item["stride"])
        K = item["K"][0]
        assert K.tolist() == [[48.0, 0.0, 32.0], [0.0, 48.0, 32.0], [0.0, 0.0, 1.0]]   # f = 0.5 * 96, crop 16 px
    assert len(strides) > 1
    scene = synthetic_camera.make_scene(synthetic_camera.RoomSpec(row["move"], int(row["seed"])))
    frame = ((item["video"][:, 0].permute(1, 2, 0) + 1) * 127.5).numpy()
    c2w = np.linalg.inv(item["RT"][0].double().numpy())
    right = synthetic_camera.render_view(c2w, scene, 64, 64, focal=48.0).astype(np.float64)
    wrong = synthetic_camera.render_view(c2w, scene, 64, 64, focal=32.0).astype(np.float64)
    err, err_wrong = np.abs(frame - right).mean(), np.abs(frame - wrong).mean()
    assert err < 6.0 and err_wrong > 3 * err, (err, err_wrong)


def test_pose_files_are_checked(tmp_path, rooms):
    from training.data import read_annotations
    from training.train import check_camera_records
    lines = open(rooms).read().splitlines()
    no_poses = tmp_path / "no_poses.csv"
    no_poses.write_text("video,caption\n" + "\n".join(",".join(line.split(",")[:2]) for line in lines[1:]) + "\n")
    with pytest.raises(DatasetError, match="poses"):
        check_camera_records(read_annotations(str(no_poses), os.path.dirname(rooms)), str(no_poses))
    bad = tmp_path / "bad.txt"
    bad.write_text("https://x\n0 0.5 0.5 0.5 0.5 0 0 1 0 0\n")
    with pytest.raises(ValueError, match="rows of 19 numbers"):
        geometry.read_pose_rows(bad)
    with pytest.raises(ValueError, match="fx, fy > 0"):
        geometry.pixel_intrinsics(torch.zeros(1, 4), (64, 64))


def test_camera_runs_refuse_what_does_not_go_with_them(tmp_path):
    base = ["data.csv=x.csv", "model.tiny=true"]
    for extra, word in (("run.train_all=true", "train_all"), ("run.stage=2", "run.stage=3"),
                        ("run.interp_prob=0.5", "interp_prob"), ("data.cache_dir=c", "cache_dir"),
                        ("data.frames=24", "data.frames")):
        with pytest.raises(ConfigError, match=word):
            load_config(TINY_CAMERA, base + [extra])


# ----------------------------------------------------------------------------- the official layout

def layout(name):
    path = LAYOUTS / f"{name}_keys.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found (shared reference layouts)")
    with open(path) as f:
        return {row["key"]: tuple(json.loads(row["shape"])) for row in csv.DictReader(f, delimiter="\t")}


@pytest.mark.parametrize("name", ["256", "512"])
def test_a_dynamicrafter_gets_exactly_the_official_camera_modules(name):
    """DynamiCrafter 256/512 + with_camera has the released CamI2V's keys and shapes (meta device)."""
    shapes = layout(f"full_{name}")
    buffers = schedule_buffers(*((False, "eps", None) if name == "256" else (True, "v", 0.7)))
    sd = {k: buffers[k] if k in buffers else torch.empty(s, device="meta") for k, s in shapes.items()}
    base = model_from_state_dict(sd, device="meta")
    cfg = with_camera(base.cfg)
    with torch.device("meta"):
        cam = DynamiCrafter(cfg)
    assert {k: tuple(v.shape) for k, v in cam.state_dict().items()} == layout(f"full_cami2v_{name}")
    assert cfg.variant.family == "cami2v" and cfg.variant.name == f"cami2v_{name}"
    assert cfg.variant.parameterization == base.cfg.variant.parameterization


# ----------------------------------------------------------------------------- training

def test_cami2v_fine_tune_trains_only_the_camera_modules_and_exports_the_official_layout(tmp_path, rooms):
    init = _reference_file("tiny_cami2v", "model.safetensors")
    cfg = camera_config(rooms, str(tmp_path / "run"), init,
                        f"model.init_config={_reference_file('tiny_cami2v', 'config.yaml')}")
    start = dynamicrafter.load_model(init, config=_reference_file("tiny_cami2v", "config.yaml"))
    result = run(cfg)
    dc = result["model"]
    assert np.isfinite(result["loss"])
    assert set(result["trainable"]) == set(camera_names(dc)) and len(result["trainable"]) == 268
    assert_only_camera_changed(snapshot(start), snapshot(dc), dc)
    assert_gradient_reaches_exactly_the_camera_modules(dc, rooms)
    # export: the official key set, the trained weights, read back as CamI2V with its epipolar settings
    with safe_open(str(init), "pt") as ref, safe_open(result["export"], "pt") as out:
        assert set(out.keys()) == set(ref.keys())
    back = dynamicrafter.load_model(result["export"])
    assert back.variant["family"] == "cami2v" and back.cfg.camera == dc.cfg.camera
    trained = dc.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in back.state_dict().items())


def test_dynamicrafter_start_gets_fresh_camera_modules_and_trains(tmp_path, rooms):
    init = _reference_file("tiny_v", "model.safetensors")
    cfg = camera_config(rooms, str(tmp_path / "run"), init)
    base = dynamicrafter.load_model(init)
    result = run(cfg)
    dc = result["model"]
    assert np.isfinite(result["loss"])
    cam = dc.cfg.camera
    assert (cam.origin_h, cam.origin_w, cam.mask_resolutions, cam.heads) == (64, 64, (8, 4, 2), 4)
    assert cam.channels == (32, 64, 128, 128) and dc.variant["family"] == "cami2v"
    # blocks as wide as init_attn (8 heads x 16 = 128) get none (MODEL-SPEC-CAMI2V §6.2)
    blocks = {n.split(".transformer_blocks")[0] for n in camera_names(dc) if ".pluker_projection." in n}
    assert len(blocks) == 10 and not any(b.startswith("model.diffusion_model.middle_block") for b in blocks)
    before = snapshot(base)
    after = snapshot(dc)
    assert all(torch.equal(before[k], after[k]) for k in before)      # the DynamiCrafter weights stay
    assert set(after) - set(before) == {k for k in after if is_camera_parameter(k) or k.endswith("pos_encoder.pe")}
    assert_gradient_reaches_exactly_the_camera_modules(dc, rooms)
    back = dynamicrafter.load_model(result["export"])
    assert back.variant["family"] == "cami2v" and back.cfg.camera == cam
    assert all(torch.equal(v, after[k]) for k, v in back.state_dict().items())


def test_fresh_camera_modules_start_from_the_dynamicrafter_output():
    """Official init: zero pluker_projection and epipolar output, so step 0 is the DynamiCrafter model."""
    from training.camera import add_camera_control
    base = dynamicrafter.load_model(_reference_file("tiny_v", "model.safetensors"))
    dc = add_camera_control(base, (64, 64))
    regs = [m.epipolar.epipolar_attn.register_tokens for m in dc.unet.modules() if hasattr(m, "epipolar")]
    assert regs and all(float(r.std()) > 0.5 for r in regs)         # N(0, 1), not zeros
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, 8, generator=g)
    ctx = torch.randn(1, 77 + 16 * 8, 64, generator=g)
    concat = torch.randn(1, 4, 8, 8, 8, generator=g)
    RT = geometry.trajectory("orbit left", 8).float()
    K = geometry.intrinsics(64, 64, frames=8)
    with torch.no_grad():
        cam = dc.encode_camera(RT, K, (64, 64), generator=g)
        with_cam = dc.denoise(x, 500, ctx, concat, fs=10, camera=cam)
        assert base.cfg.camera is None and cam.masks
        assert torch.equal(with_cam, base.denoise(x, 500, ctx, concat, fs=10))
