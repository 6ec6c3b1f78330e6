"""Crafted LoRAs, videos and configs (issue #28): each is refused with one line naming the problem,
before any work sized by the file (peak memory growth measured as VmHWM), and nothing is dropped
silently."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import dynamicrafter
from dynamicrafter.config import tiny_config
from dynamicrafter.checkpoints.lora import LoraError

MAX_PEAK_GROWTH_KB = 200 * 1024
LAYER = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"


def hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return dynamicrafter.DynamiCrafter(tiny_config()).eval()


def plain_lora(model, rank=2, alpha=2.0):
    w = dict(model.unet.named_parameters())["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"]
    return {f"{LAYER}.lora_down.weight": torch.randn(rank, w.shape[1]) * 0.01,
            f"{LAYER}.lora_up.weight": torch.randn(w.shape[0], rank) * 0.01,
            f"{LAYER}.alpha": torch.tensor(alpha)}


def refused(model, tmp_path, tensors, match, strength=1.0):
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, str(path))
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    hwm = hwm_kb()
    with pytest.raises(LoraError, match=match) as err:
        dynamicrafter.load_lora(model, path, strength)
    assert hwm_kb() - hwm < MAX_PEAK_GROWTH_KB
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())


def test_plain_lora_still_merges(model, tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file(plain_lora(model), str(path))
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    before = dict(model.unet.named_parameters())[name].clone()
    dynamicrafter.load_lora(model, path, 0.5)
    after = dict(model.unet.named_parameters())[name]
    assert not torch.equal(before, after) and torch.isfinite(after).all()
    dynamicrafter.load_lora(model, path, -0.5)       # undo (up to rounding)
    torch.testing.assert_close(dict(model.unet.named_parameters())[name], before)


def test_lora_shapes_are_checked_before_any_product(model, tmp_path):
    # 104 KB of adapters whose product would be 26000 x 26000 floats (2.7 GB)
    big = {f"{LAYER}.lora_down.weight": torch.zeros(1, 26000), f"{LAYER}.lora_up.weight": torch.zeros(26000, 1)}
    refused(model, tmp_path, big, r"do not fit the layer's weight")
    bad_rank = plain_lora(model)
    bad_rank[f"{LAYER}.lora_up.weight"] = torch.zeros(bad_rank[f"{LAYER}.lora_up.weight"].shape[0], 3)
    refused(model, tmp_path, bad_rank, r"do not fit")
    alpha = plain_lora(model)
    alpha[f"{LAYER}.alpha"] = torch.zeros(4)
    refused(model, tmp_path, alpha, r"alpha has shape \(4,\), not a single number")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_alpha_strength_or_weights_are_refused(model, tmp_path, value):
    refused(model, tmp_path, plain_lora(model, alpha=value),
            r"alpha is (nan|inf); a LoRA scale must be a finite number")
    refused(model, tmp_path, plain_lora(model), r"strength is (nan|inf)", strength=value)
    nan_up = plain_lora(model)
    nan_up[f"{LAYER}.lora_up.weight"][0, 0] = value
    refused(model, tmp_path, nan_up, r"NaN or infinite values")


@pytest.mark.parametrize("key,kind", [
    (f"{LAYER}.dora_scale", "DoRA"), (f"{LAYER}.hada_w1_a", "LoHa"), (f"{LAYER}.lokr_w1", "LoKr"),
    (f"{LAYER}.lora_mid.weight", "lora_mid"), (f"{LAYER}.lora_weird", "unknown kind"),
])
def test_unsupported_adapter_kinds_are_refused_by_name(model, tmp_path, key, kind):
    tensors = plain_lora(model)
    tensors[key] = torch.ones(1, 4)
    refused(model, tmp_path, tensors, kind)


# ----------------------------------------------------------------------------- videos

def _gif_declaring(width: int, height: int) -> bytes:
    """A two-frame 2x2 GIF whose logical screen (what FFmpeg reports) says width x height."""
    import io
    import struct
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, "GIF", save_all=True, append_images=[Image.new("RGB", (2, 2), "red")])
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


CRAFTED_VIDEOS = {
    "huge.gif": (_gif_declaring(8192, 8192), "declares 8192x8192 frames"),
    "concat.mp4": (b"ffconcat version 1.0\nfile /dev/zero\nfile /etc/hostname\n", "not a video file in a supported"),
    "playlist.mp4": (b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:9/a.ts\n#EXT-X-ENDLIST\n",
                     "not a video file in a supported"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED_VIDEOS))
def test_crafted_videos_are_refused_before_decoding(tmp_path, name):
    import time

    from dynamicrafter.video import VideoError, read_video
    from training.data import decode_frames, probe_video
    data, why = CRAFTED_VIDEOS[name]
    path = tmp_path / name
    path.write_bytes(data)
    hwm, t0 = hwm_kb(), time.monotonic()
    for read in (read_video, probe_video, lambda p: decode_frames(p, [0, 1])):
        with pytest.raises(VideoError, match=why) as err:
            read(str(path))
        assert "\n" not in str(err.value)
    assert hwm_kb() - hwm < MAX_PEAK_GROWTH_KB and time.monotonic() - t0 < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_real_videos_still_read(tmp_path):
    import numpy as np

    from dynamicrafter.video import read_video, save_video
    from training.data import decode_frames, probe_video
    frames = np.random.default_rng(0).integers(0, 255, (5, 32, 48, 3), dtype=np.uint8)
    for suffix in (".mp4", ".gif"):
        path = save_video(frames, tmp_path / f"ok{suffix}")
        assert read_video(path).shape == (5, 32, 48, 3)
        assert probe_video(str(path))[0] == 5 and decode_frames(str(path), [4, 0]).shape == (2, 32, 48, 3)


# ----------------------------------------------------------------------------- configs and metadata

YAML = """model:
  params:
    unet_config:
      params: {model_channels: 64, %s}
    img_cond_stage_config:
      params: {arch: %s}
"""


@pytest.mark.parametrize("unet,arch,why", [
    ("num_heads: 0", "ViT-H-14", "unet num_heads is 0; it must be a whole number from 1 to 1024"),
    ("num_head_channels: -8", "ViT-H-14", "num_head_channels is -8"),
    ("num_head_channels: text", "ViT-H-14", "num_head_channels is 'text'"),
    ("num_heads: 3", "ViT-H-14", "model_channels 64 is not a multiple of num_heads 3"),
    ("num_head_channels: 32", "../../../../etc/passwd", "is not an OpenCLIP architecture name"),
    ("num_head_channels: 32", "/tmp/secret", "is not an OpenCLIP architecture name"),
])
def test_yaml_values_are_range_checked_and_arch_is_a_name(tmp_path, unet, arch, why):
    from dynamicrafter import CheckpointError
    from dynamicrafter.checkpoints.official_config import read_inference_config
    path = tmp_path / "inference.yaml"
    path.write_text(YAML % (unet, arch))
    with pytest.raises(CheckpointError, match=why) as err:
        read_inference_config(path)
    assert "\n" not in str(err.value)


def test_arch_json_beside_the_yaml_is_range_checked(tmp_path):
    import json

    from dynamicrafter import CheckpointError
    from dynamicrafter.checkpoints.official_config import read_inference_config
    (tmp_path / "MyArch.json").write_text(json.dumps({"vision_cfg": {"width": 64, "head_width": 0},
                                                      "text_cfg": {"heads": 4}}))
    path = tmp_path / "inference.yaml"
    path.write_text(YAML % ("num_head_channels: 32", "MyArch"))
    with pytest.raises(CheckpointError, match="MyArch vision_cfg.head_width is 0"):
        read_inference_config(path)
    (tmp_path / "MyArch.json").write_text(json.dumps({"vision_cfg": {"width": 64, "head_width": 16}}))
    assert read_inference_config(path) == {"unet_head_channels": 32, "vision_heads": 4}


def test_big_yaml_is_refused_before_parsing(tmp_path):
    import time

    from dynamicrafter import CheckpointError
    from dynamicrafter.checkpoints.official_config import read_inference_config
    path = tmp_path / "inference.yaml"
    path.write_text("model:\n  params:\n    junk: [" + "1, " * 7_000_000 + "1]\n")    # 21 MB
    hwm, t0 = hwm_kb(), time.monotonic()
    with pytest.raises(CheckpointError, match="more than a model config holds"):
        read_inference_config(path)
    assert time.monotonic() - t0 < 2 and hwm_kb() - hwm < MAX_PEAK_GROWTH_KB


@pytest.mark.parametrize("field,value", [("resolution", [4096, 4096]), ("frames", 1000)])
def test_metadata_defaults_are_bounded_like_user_input(field, value):
    import dataclasses
    import json

    from dynamicrafter.checkpoints.metadata import MetadataError, parse_config_metadata
    d = tiny_config().to_dict()
    d["variant"][field] = value
    with pytest.raises(MetadataError, match=f"variant.{field}"):
        parse_config_metadata(json.dumps(d))
    assert dataclasses.is_dataclass(parse_config_metadata(json.dumps(tiny_config().to_dict())))


def test_videocrafter_init_refuses_unknown_tensors(tmp_path):
    from dynamicrafter import CheckpointError
    from training.modeling import load_init
    torch.manual_seed(0)
    vc = dynamicrafter.DynamiCrafter(tiny_config(family="videocrafter", frames=4))
    donor = dynamicrafter.save_checkpoint(dynamicrafter.DynamiCrafter(tiny_config(frames=4)),
                                          tmp_path / "dc.safetensors")
    sd = {k: v.contiguous() for k, v in vc.state_dict().items()}
    sd["model.diffusion_model.motion_adapter.0.weight"] = torch.zeros(4, 4)
    save_file(sd, str(tmp_path / "vc.safetensors"))
    with pytest.raises(CheckpointError, match="motion_adapter"):
        load_init(str(tmp_path / "vc.safetensors"), [str(donor)], frames=4)


# ----------------------------------------------------------------------------- one message everywhere

def test_node_library_and_trainer_refuse_a_crafted_checkpoint_with_the_same_line(comfy, comfy_base, capsys):
    """A .ckpt with a second data.pkl: the loader node (real ComfyUI executor), the library and the
    trainer's model.init all refuse it with the same one line."""
    import io
    import warnings
    import zipfile

    from test_comfy_nodes import _error_of, tiny_prompt

    from dynamicrafter import CheckpointError
    from training.config import load_config
    from training.modeling import build_model
    from training.train import user_errors
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1)}}, buf)
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "a") as z:
        warnings.simplefilter("ignore")
        prefix = z.namelist()[0].split("/")[0]
        z.writestr(f"{prefix}/data.pkl", b"\x80\x02cbuiltins\nbytearray\n(J\xff\xff\xff\x7ftR.")
    path = comfy_base / "models" / "checkpoints" / "twice.ckpt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError) as lib:
        dynamicrafter.load_model(path)
    line = str(lib.value)
    assert "appears twice" in line and "\n" not in line
    node = _error_of(comfy, tiny_prompt(comfy, "DynamiCrafter image to video.json", ckpt="twice.ckpt"))
    assert line in node, node
    cfg = load_config(None, ["data.csv=x.csv", f"model.init={path}"])
    with pytest.raises(SystemExit), user_errors():
        build_model(cfg)
    assert capsys.readouterr().err.strip() == f"error: {line}"
