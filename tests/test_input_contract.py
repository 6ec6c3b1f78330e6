"""The input contract of the library's public functions (dynamicrafter/contract.py), table-driven:
each row is a call with one argument outside the contract and the ValueError text it must raise
(naming the argument, the value and what is allowed)."""
import pytest
import torch

import dynamicrafter
from dynamicrafter.config import tiny_config


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return (dynamicrafter.DynamiCrafter(tiny_config(frames=2)).eval(),
            dynamicrafter.DynamiCrafter(tiny_config("videocrafter", frames=2)).eval())


IMG = torch.zeros(1, 3, 64, 64)
X_T = torch.zeros(1, 4, 2, 8, 8)
CTX = torch.zeros(1, 77 + 32, 64)


def animate(**kw):
    def run(dc, vc):
        args = dict(image=IMG, prompt="a boat", frames=2, height=64, width=64, steps=1) | kw
        model = vc if args.pop("t2v", False) else dc
        return dynamicrafter.animate(model, args.pop("image"), args.pop("prompt"), **args)
    return run


def conditioning(images=IMG, prompts=("a boat",), frames=2, **kw):
    return lambda dc, vc: dynamicrafter.image_conditioning(dc, images, list(prompts) if isinstance(prompts, tuple)
                                                           else prompts, frames, **kw)


def sample(t2v=False, x_T=X_T, cond=CTX, **kw):
    def run(dc, vc):
        args = dict(concat=None if t2v else torch.zeros(1, 4, 2, 8, 8), fs=24, steps=1, cfg_text=7.5) | kw
        return dynamicrafter.sample_ddim(vc if t2v else dc, x_T, cond, cond, **args)
    return run


ROWS = [
    # animate: images
    (animate(image=(IMG * 127.5 + 127.5).to(torch.uint8)),
     "image must be float in [-1, 1], got torch.uint8 values: convert 0-255 images with image.float() / 127.5 - 1"),
    (animate(image=IMG + 200), "image must be in [-1, 1], got values in [200, 200]: it looks like 0-255: "
                               "use image / 127.5 - 1"),
    (animate(image=torch.zeros(1, 64, 64, 3)), "got a torch.float32 tensor of shape (1, 64, 64, 3) (channels last?)"),
    (animate(image=torch.zeros(1, 4, 64, 64)), "image must be (n, 3, H, W) with 3 (RGB) channels"),
    (animate(image=torch.zeros(3, 64, 64)), "add the batch dimension, image[None]"),
    (animate(image=torch.zeros(1, 3, 0, 0)), "image must have at least one image of at least 1x1 pixels"),
    (animate(image=torch.full((1, 3, 64, 64), float("nan"))), "image must be finite, got 12288 NaN/inf values"),
    (animate(image=torch.zeros(2, 3, 64, 64)), "image must hold 1 image(s), got 2"),
    (animate(image="cat.png"), "image must be a float tensor (n, 3, H, W) in [-1, 1], got str: use "
                               "dynamicrafter.load_image(path)"),
    (animate(image=None), "image is required: this is an image-to-video model"),
    (animate(t2v=True), "image must be None: this is a text-to-video model"),
    (animate(end_image=IMG, loop=True), "loop must be False when an end_image is given"),
    # animate: numbers
    (animate(frames=0), "frames must be an integer in 2..64, got 0"),
    (animate(frames=10_000), "frames must be an integer in 2..64, got 10000"),
    (animate(frames=2.5), "frames must be an integer in 2..64, got 2.5"),
    (animate(frames=2000, window=16), "frames must be an integer in 2..1024 with window=16, got 2000"),
    (animate(frames=100, window=8, window_overlap=8), "window_overlap must be an integer in 0..7"),
    (animate(frames=100, window=8, window_schedule="loop"), "window_schedule must be one of ['uniform', 'looped']"),
    (animate(steps=0), "steps must be an integer in 1..1000, got 0"),
    (animate(fs=0), "fs must be an integer in 1..1000 (this model was trained on 5..30), got 0"),
    (animate(height=100), "height must be a multiple of 64 in 64..4096 for this UNet, got 100 (nearest: 128)"),
    (animate(width=0), "width must be an integer in 64..4096 and a multiple of 64, got 0"),
    (animate(width=1 << 20), "width must be an integer in 64..4096"),
    (animate(cfg_text=float("nan")), "cfg_text must be a finite number in [0.0, 100.0], got nan"),
    (animate(cfg_img=float("inf")), "cfg_img must be a finite number in [0.0, 100.0] or None, got inf"),
    (animate(eta=2), "eta must be a finite number in [0.0, 1.0], got 2"),
    (animate(guidance_rescale=-1.0), "guidance_rescale must be a finite number in [0.0, 1.0], got -1.0"),
    (animate(spacing="cosine"), "spacing must be one of ['uniform', 'uniform_trailing', 'quad'], got 'cosine'"),
    (animate(seed=-1), "seed must be an integer in 0..18446744073709551615, got -1"),
    (animate(prompt=None), "prompt must be a str, got None"),
    (animate(negative_prompt=["a", "b"]), "negative_prompt must be a str, got ['a', 'b']"),
    # image_conditioning
    (conditioning(images=torch.zeros(2, 3, 64, 64)), "prompts must hold one prompt per image (2), got 1"),
    (conditioning(prompts=None), "prompts must be a str or a non-empty list of str, got None"),
    (conditioning(prompts=[1]), "prompts must be a str or a non-empty list of str, got [1]"),
    (conditioning(frames=0), "frames must be an integer in 2..1024, got 0"),   # longer than 64: windows
    (conditioning(end_images=torch.zeros(1, 3, 64, 128)), "end_images must be the size of images"),
    (conditioning(negative_prompts=["", ""]), "negative_prompts must hold one prompt per image (1), got 2"),
    (conditioning(images=IMG + 255), "images must be in [-1, 1], got values in [255, 255]"),
    # sample_ddim
    (sample(steps=0), "steps must be an integer in 1..1000, got 0"),
    (sample(cfg_img=float("nan")), "cfg_img must be a finite number in [0.0, 100.0] or None, got nan"),
    (sample(fs=0), "fs must be an integer in 1..1000"),
    (sample(fs=torch.tensor([2.5])), "fs must be integers in 1..1000, one or one per batch item"),
    (sample(x_T=torch.zeros(1, 4, 8, 8)), "x_T must be a latent (b, 4, T, h, w), got a torch.float32 tensor of shape"),
    (sample(x_T=torch.zeros(1, 4, 65, 8, 8), concat=torch.zeros(1, 4, 65, 8, 8)), "frames (x_T.shape[2]) must be "
                                                                                  "an integer in 1..64, got 65"),
    (sample(cond=torch.zeros(2, 109, 64)), "cond must be a context (b, L, C) with b = 1 like x_T"),
    (sample(concat=None), "concat is required: this image-to-video model needs the image latent"),
    (sample(t2v=True, concat=torch.zeros(1, 4, 2, 8, 8)), "concat must be None: this is a text-to-video model"),
    (sample(spacing="linear"), "spacing must be one of"),
    (sample(eta=1.0, noise=[torch.zeros(1, 4, 2, 8, 8)], steps=2), "noise must hold one tensor per step (2), got 1"),
    # sample_ddim: context windows
    (sample(window=1), "window must be an integer in 2..64 (frames per UNet call; None = no windows), got 1"),
    (sample(window=True), "window must be an integer in 2..64"),
    (sample(window=8, window_overlap=8), "window_overlap must be an integer in 0..7 (less than window=8), got 8"),
    (sample(window=8, window_overlap=-1), "window_overlap must be an integer in 0..7"),
    (sample(window=8, window_schedule="circular"), "window_schedule must be one of ['uniform', 'looped'], "
                                                   "got 'circular'"),
    (sample(x_T=torch.zeros(1, 4, 65, 8, 8), concat=torch.zeros(1, 4, 65, 8, 8)),
     "one UNet call takes up to 64 frames; pass window=16 (context windows) to sample up to 1024"),
    (sample(x_T=torch.zeros(1, 4, 1025, 1, 1), concat=torch.zeros(1, 4, 1025, 1, 1), window=16),
     "frames (x_T.shape[2]) must be an integer in 1..1024 with window=16, got 1025"),
    (lambda dc, vc: dynamicrafter.sample(dc, X_T, CTX, CTX, concat=torch.zeros(1, 4, 2, 8, 8), steps=1,
                                         window=4, window_overlap=4), "window_overlap must be an integer in 0..3"),
    # the model's encoders
    (lambda dc, vc: dc.encode_text(None), "prompts must be a str or a non-empty list of str, got None"),
    (lambda dc, vc: dc.encode_clip_image(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)), "images must be float"),
    (lambda dc, vc: dc.encode_first_stage(IMG + 5), "images must be in [-1, 1], got values in [5, 5]"),
    (lambda dc, vc: dc.encode_first_stage(torch.zeros(1, 3, 60, 60)), "image size 60x60 is not a multiple of 8"),
    (lambda dc, vc: dc.vae_moments(torch.zeros(0, 3, 64, 64)), "images must have at least one image"),
    # load_image
    (lambda dc, vc: dynamicrafter.load_image(None), "path must be a str or Path to an image file, got None"),
    (lambda dc, vc: dynamicrafter.load_image("/nonexistent/cat.png"),
     "path must be an existing image file, got '/nonexistent/cat.png' (not found)"),
    (lambda dc, vc: dynamicrafter.load_image(__file__), "path must be an image file Pillow can read"),
]


@pytest.mark.parametrize("call,expected", ROWS, ids=[f"{i:02d}-{r[1][:40]}" for i, r in enumerate(ROWS)])
def test_input_contract(models, call, expected):
    with pytest.raises(ValueError) as err, torch.no_grad():
        call(*models)
    assert expected in str(err.value), str(err.value)


def test_contract_accepts_the_documented_inputs(models, tmp_path):
    """The same calls inside the contract run (one step, tiny models)."""
    dc, vc = models
    from PIL import Image
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    image = dynamicrafter.load_image(tmp_path / "red.png")
    assert image.shape == (1, 3, 64, 64) and image.max() == 1 and image.min() == -1
    with torch.no_grad():
        video = dynamicrafter.animate(dc, image, "a boat", frames=2, height=64, width=64, steps=1, fs=24)
        assert video.shape == (1, 3, 2, 64, 64) and torch.isfinite(video).all()
        video = dynamicrafter.animate(vc, None, ["a boat"][0], frames=2, height=64, width=64, steps=1)
        assert video.shape == (1, 3, 2, 64, 64)
        assert dc.encode_text("a boat").shape == dc.encode_text(["a boat"]).shape
