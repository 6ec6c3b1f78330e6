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
from dynamicrafter.lora import LoraError

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
    refused(model, tmp_path, plain_lora(model, alpha=value), r"alpha is (nan|inf); a LoRA scale must be a finite number")
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
