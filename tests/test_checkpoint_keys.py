"""The loader never half-loads a checkpoint (issue 19): a tensor the inferred model has no place for
is refused with its name and the feature it belongs to, except the documented known-unused keys
(dynamicrafter/checkpoints/unused_keys.py), each dropped on purpose."""
import pytest
import torch
from conftest import _reference_file

import dynamicrafter
from dynamicrafter import CheckpointError
from dynamicrafter.checkpoints.loader import model_from_state_dict
from dynamicrafter.checkpoints.unused_keys import KNOWN_UNUSED, unused_reason


@pytest.fixture(scope="module")
def vc2_file():
    return _reference_file("tiny_vc2", "model.safetensors")


@pytest.fixture(scope="module")
def vc2_state_dict(vc2_file):
    """The tiny VideoCrafter2's UNet and schedule (a pruned file: quick to build, same key rules)."""
    sd, _ = dynamicrafter.read_state_dict(vc2_file)
    return {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.") or "." not in k}


@pytest.fixture(scope="module")
def vc2_output(vc2_state_dict):
    return denoise(model_from_state_dict(dict(vc2_state_dict)))


def denoise(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 77, model.unet.cfg.context_dim, generator=g)
    with torch.no_grad():
        return model.denoise(x, torch.tensor([400]), ctx, None, torch.tensor([28]))


def test_an_unknown_tensor_is_refused_by_name(vc2_file, tmp_path):
    from safetensors.torch import save_file
    sd, _ = dynamicrafter.read_state_dict(vc2_file)   # the complete file
    planted = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.mystery_gain"
    sd[planted] = torch.ones(4)
    path = tmp_path / "planted.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError) as err:
        dynamicrafter.load_model(path)
    msg = str(err.value)
    assert planted in msg and "model.diffusion_model" in msg and "1 tensor" in msg


@pytest.mark.parametrize("key,feature", [
    ("first_stage_model.decoder.attn_refinement.0.conv.weight", "ToonCrafter"),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.relative_position_k.embeddings_table",
     "relative frame positions"),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight", "LoRA"),
    ("embedder.model.visual.adapter.0.weight", "adapter"),
])
def test_the_error_names_the_feature(vc2_state_dict, key, feature):
    sd = dict(vc2_state_dict)
    sd[key] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=feature) as err:
        model_from_state_dict(sd)
    assert key in str(err.value)


# one real example of every known-unused entry (a test fails when an entry has none)
UNUSED_EXAMPLES = {
    r"model_ema\..*": ["model_ema.num_updates", "model_ema.diffusion_modelinput_blocks00weight"],
    r"(.*\.)?logit_scale": ["logit_scale", "embedder.model.logit_scale"],
    r"(cond_stage_model|embedder)\.model\.attn_mask": ["cond_stage_model.model.attn_mask"],
    r"cond_stage_model\.model\.visual\..*": ["cond_stage_model.model.visual.ln_post.weight"],
    r"embedder\.model\.transformer\..*": ["embedder.model.transformer.resblocks.0.ln_1.weight"],
    r"logvar": ["logvar"],
    r"first_stage_model\.loss\..*": ["first_stage_model.loss.discriminator.main.0.weight"],
}


def test_every_known_unused_entry_has_an_example():
    assert set(UNUSED_EXAMPLES) == {pattern for pattern, _ in KNOWN_UNUSED}


@pytest.mark.parametrize("key", [k for keys in UNUSED_EXAMPLES.values() for k in keys])
def test_known_unused_keys_are_dropped_on_purpose(vc2_state_dict, vc2_output, key):
    assert unused_reason(key)
    sd = dict(vc2_state_dict)
    sd[key] = torch.full((3,), 7.0)
    model = model_from_state_dict(sd)
    assert key not in model.state_dict()
    assert torch.equal(denoise(model), vc2_output)


def test_lookalikes_of_unused_keys_are_not_dropped(vc2_state_dict):
    for key in ("model.diffusion_model.logvar", "model_emax.weight", "cond_stage_model.model.attn_mask_bias",
                "first_stage_model.lossy.weight"):
        assert unused_reason(key) is None
        sd = dict(vc2_state_dict)
        sd[key] = torch.zeros(1)
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            model_from_state_dict(sd)


def test_an_overridden_schedule_drops_the_files_scale_arr(vc2_state_dict):
    """Asking for another schedule replaces the file's schedule buffers: its scale_arr goes on purpose."""
    model = model_from_state_dict(dict(vc2_state_dict), variant_overrides={"use_scale": False})
    assert not hasattr(model, "scale_arr") and model.variant["use_scale"] is False
