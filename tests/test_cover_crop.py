"""One resize rule for library, trainer and nodes: cover, then centre-crop with torchvision's
CenterCrop rounding (the node half of this is in test_comfy_nodes)."""
import torch
import torchvision.transforms.functional as TF

import training.data
from dynamicrafter.pipeline import cover_crop, fit_image


def rows(h, w):
    """An image whose every row holds its own index, so the crop offset can be read off."""
    return torch.arange(h, dtype=torch.float32).view(1, 1, h, 1).expand(1, 3, h, w).contiguous()


def test_odd_margins_crop_like_torchvision_center_crop():
    for h, target in [(323, 320), (321, 320), (325, 320), (67, 64)]:
        x = rows(h, 64)
        ours = fit_image(x / h * 2 - 1, target, 64)
        official = TF.center_crop(x / h * 2 - 1, [target, 64])
        assert torch.equal(ours, official), h
    assert cover_crop(rows(323, 64), 320, 64)[0, 0, 0, 0] == 2      # 3-row margin: starts at row 2


def test_trainer_uses_the_library_rule():
    # the dataset, the eval images and the VAE helper all crop through this one function
    assert training.data.cover_crop is cover_crop
    frames = rows(323, 64).repeat(4, 1, 1, 1) * 0.5   # (T, 3, H, W) in 0..255 like decoded video
    assert torch.equal(training.data.cover_crop(frames, 320, 64), TF.center_crop(frames, [320, 64]))


# ------------------------------------------------------------------------------ framing: crop, pad, stretch
def bordered(h, w):
    """A grey picture in [-1, 1] with a 4-pixel red strip down its left and right edges."""
    x = torch.full((1, 3, h, w), 0.2)
    x[:, :, :, :4] = x[:, :, :, -4:] = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)
    return x


def test_crop_framing_is_the_cover_crop_bit_for_bit():
    from dynamicrafter.pipeline import frame_image
    for h, w in [(100, 300), (323, 64), (64, 64), (40, 90)]:
        x = torch.rand(2, 3, h, w)
        assert torch.equal(frame_image(x, 64, 128, "crop"), cover_crop(x, 64, 128)), (h, w)
        assert torch.equal(fit_image(x * 2 - 1, 64, 128), cover_crop(x * 2 - 1, 64, 128)), (h, w)


def test_pad_framing_keeps_the_whole_picture_on_a_neutral_border():
    from dynamicrafter.pipeline import frame_image
    wide = bordered(100, 400)                                   # 4:1 into 2:1: crop cuts the strips off
    assert (fit_image(wide, 64, 128)[0, 0] < 0.5).all()
    pad = fit_image(wide, 64, 128, "pad")
    assert pad.shape == (1, 3, 64, 128)
    red = (pad[0, 0] > 0.9) & (pad[0, 1] < -0.9)
    assert red[:, 0].any() and red[:, -1].any()                 # both strips, at the frame's edges
    rows = red.any(1).nonzero().flatten()
    assert rows.min() == 16 and rows.max() == 47                # 32 rows of picture, centred
    assert (pad[:, :, :16] == 0).all() and (pad[:, :, 48:] == 0).all()   # mid-grey border in [-1, 1]
    tall = frame_image(bordered(100, 300).transpose(-1, -2) * 0.5 + 0.5, 128, 64, "pad", fill=0.5)  # [0, 1]
    assert (tall[..., :10] == 0.5).all() and (tall[..., -11:] == 0.5).all()     # 43 of 64 columns of picture
    assert (tall[0, 0, 0, 10:53] > 0.95).all() and (tall[0, 0, -1, 10:53] > 0.95).all()   # the strips, now rows
    same_aspect = torch.rand(1, 3, 96, 192)
    assert torch.equal(frame_image(same_aspect, 64, 128, "pad"), cover_crop(same_aspect, 64, 128))


def test_stretch_framing_and_a_wrong_framing():
    import pytest
    from dynamicrafter.pipeline import frame_image
    out = frame_image(bordered(100, 400), 64, 128, "stretch")
    assert out.shape == (1, 3, 64, 128) and out[0, 0, :, 0].min() > 0.9 and out[0, 0, :, -1].min() > 0.9
    with pytest.raises(ValueError, match=r"framing must be one of \['crop', 'pad', 'stretch'\], got 'fit'"):
        frame_image(out, 64, 128, "fit")


def test_the_cli_offers_the_framings():
    from dynamicrafter.cli import build_parser
    args = ["animate", "--ckpt", "m.safetensors", "--image", "a.png", "--out", "o.mp4"]
    assert build_parser().parse_args(args).framing == "crop"
    assert build_parser().parse_args(args + ["--framing", "pad"]).framing == "pad"
