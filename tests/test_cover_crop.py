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
