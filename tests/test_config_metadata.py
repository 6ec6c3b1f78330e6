"""The `dynamicrafter_config` metadata of our .safetensors files is read with a schema: every
malformed value is a CheckpointError naming its key, and the stored sizes must agree with the
tensor shapes (table-driven: each row is an edit of a real file's metadata and the expected error)."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dynamicrafter
from dynamicrafter import CheckpointError
from dynamicrafter.checkpoints.metadata import KEY, parse_config_metadata


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    model = dynamicrafter.DynamiCrafter(dynamicrafter.tiny_config(frames=2)).eval()
    path = dynamicrafter.save_checkpoint(model, tmp_path_factory.mktemp("meta") / "tiny.safetensors")
    with safe_open(str(path), framework="pt") as f:
        return path, {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[KEY])


def edit(cfg: dict, dotted: str, value):
    out = copy.deepcopy(cfg)
    *parents, last = dotted.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[last] = value
    return out


SCHEMA_ROWS = [   # (edit of the stored config or raw text, expected error text)
    ("{", "(the whole value) is not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ("x" * 70000, "at most 65536 bytes"),
    ('{"unet": ' + "[" * 5000 + "]" * 5000 + "}", "nests deeper than"),
    ('{"unet": {}, "unet": {}}', "duplicate key 'unet'"),
    (("evil", 1), "evil is not a known section"),
    (("unet.foo", 1), "unet.foo is not a known field"),
    (("unet", None), "unet is required"),
    (("unet.model_channels", "32"), "unet.model_channels must be an integer in 1..65536, got '32'"),
    (("unet.num_res_blocks", True), "unet.num_res_blocks must be an integer"),
    (("unet.num_head_channels", -16), "unet.num_head_channels must be an integer in 1..65536, got -16"),
    (("unet.model_channels", 10 ** 9), "unet.model_channels must be an integer in 1..65536"),
    (("unet.channel_mult", [1, 2, 0]), "unet.channel_mult must hold integers in 1..64"),
    (("unet.channel_mult", list(range(1, 20))), "unet.channel_mult must be a list of 1..8 integers"),
    (("vae.norm_groups", 0), "vae.norm_groups must be an integer in 1..1024"),
    (("text.mlp_ratio", float("nan")), "text.mlp_ratio must be a finite number"),
    (("variant.cfg_text", float("nan")), "variant.cfg_text must be a finite number in [0.0, 100.0], got nan"),
    (("variant.guidance_rescale", float("inf")), "variant.guidance_rescale must be a finite number"),
    (("variant.dynamic_rescale_base", -0.5), "variant.dynamic_rescale_base must be a finite number"),
    (("variant.parameterization", "x0"), "variant.parameterization must be one of ['eps', 'v']"),
    (("variant.name", "../../etc"), "variant.name must be one of names like"),
    (("variant.resolution", [320]), "variant.resolution must be a list of 2..2 integers"),
    (("variant.fs_range", [30, 5]), "variant.fs_range must be [low, high]"),
    (("variant.cfg_img", 0.0), "variant.cfg_img is 0; write null for single CFG"),
    (("scale_factor", float("inf")), "scale_factor must be a finite number"),
    (("vision", 3), "vision must be an object or null"),
]


@pytest.mark.parametrize("change,expected", SCHEMA_ROWS, ids=[str(r[1])[:40] for r in SCHEMA_ROWS])
def test_schema_refuses_with_the_key(tiny_file, change, expected):
    _, _, cfg = tiny_file
    text = change if isinstance(change, str) else json.dumps(edit(cfg, *change))
    with pytest.raises(CheckpointError, match="dynamicrafter_config metadata") as err:
        parse_config_metadata(text)
    assert expected in str(err.value)


def test_stored_config_round_trips(tiny_file):
    path, _, cfg = tiny_file
    assert parse_config_metadata(json.dumps(cfg)) == dynamicrafter.tiny_config(frames=2)
    assert dynamicrafter.load_model(path).cfg.unet == dynamicrafter.tiny_config(frames=2).unet


SHAPE_ROWS = [   # metadata that parses but does not describe the weights
    (("unet.model_channels", 64), "unet.model_channels is 64 but the weights' shapes give 32"),
    (("unet.num_head_channels", 48), "unet.num_head_channels (48) must divide the width 32"),
    (("vae.norm_groups", 7), "vae.norm_groups (7) must divide every VAE width"),
    (("text.text_heads", 5), "text.text_heads (5) must divide text_width 64"),
    (("resampler.dim_head", 7), "resampler.heads is 3 but the weights' shapes give 6"),
    (("vae.ch_mult", [1, 2, 4]), "vae.ch_mult is (1, 2, 4) but the weights' shapes give (1, 2, 4, 4)"),
]


@pytest.mark.parametrize("change,expected", SHAPE_ROWS, ids=[r[0][0] for r in SHAPE_ROWS])
def test_stored_sizes_must_match_the_shapes(tmp_path, tiny_file, change, expected):
    _, tensors, cfg = tiny_file
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata={KEY: json.dumps(edit(cfg, *change)), "format": "pt"})
    with pytest.raises(CheckpointError, match="dynamicrafter_config metadata") as err:
        dynamicrafter.load_model(path)
    assert expected in str(err.value)


def test_schema_covers_every_config_field():
    """A config field without a schema entry would make every file saved with it unloadable."""
    from dataclasses import fields

    from dynamicrafter.checkpoints.metadata import SCHEMA, SECTIONS
    for section, (schema_name, cls) in SECTIONS.items():
        missing = {f.name for f in fields(cls)} - set(SCHEMA[schema_name])
        assert not missing, f"{section}: {sorted(missing)}"


def test_demo_checkpoint_defaults_to_what_it_was_trained_on(tmp_path, capsys):
    """The bundled demo file carries its training size, length and fs, so the CLI without sizes
    animates it at exactly what its stage-3 run trained on."""
    from pathlib import Path

    import yaml

    from dynamicrafter.cli import main
    repo = Path(__file__).resolve().parents[1]
    demo = repo / "assets" / "demo" / "dynamicrafter_demo.safetensors"
    if not demo.is_file():
        pytest.skip(f"{demo} not found (the demo model is built by training/; see README)")
    data = yaml.safe_load((repo / "training" / "configs" / "demo_stage3.yaml").read_text())["data"]
    v = dynamicrafter.load_model(str(demo)).variant
    assert tuple(v["resolution"]) == (data["height"], data["width"]) and v["frames"] == data["frames"], v
    assert v["default_fs"] == 24      # the synthetic clips' fps, what the trainer conditions on
    out = tmp_path / "strip.png"      # a .png output is the frame strip: frames side by side
    assert main(["animate", "--ckpt", str(demo), "--image", str(repo / "assets" / "example.png"),
                 "--prompt", "a red circle moves to the right", "--steps", "2", "--out", str(out)]) == 0
    assert f"({data['frames']} frames, {data['width']}x{data['height']})" in capsys.readouterr().out


def test_demo_checkpoint_guidance_defaults_are_what_animate_uses():
    """The guidance the demo file's metadata names (cfg_text, and cfg_img for dual CFG) is what
    `animate` samples with when the caller gives none."""
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    demo = repo / "assets" / "demo" / "dynamicrafter_demo.safetensors"
    if not demo.is_file():
        pytest.skip(f"{demo} not found (the demo model is built by training/; see README)")
    dc = dynamicrafter.load_model(str(demo)).float()
    v = dc.variant
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    kw = dict(prompt="a red circle moves to the right", steps=2, seed=3)
    default = dynamicrafter.animate(dc, image, **kw)
    assert torch.equal(default, dynamicrafter.animate(dc, image, cfg_text=v["cfg_text"], cfg_img=v["cfg_img"], **kw))
    other = dynamicrafter.animate(dc, image, cfg_text=v["cfg_text"], cfg_img=(v["cfg_img"] or 1.0) + 1.0, **kw)
    assert not torch.allclose(default, other)
