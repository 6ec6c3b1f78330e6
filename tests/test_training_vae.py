"""The small-VAE helper: trains, recalibrates the latent scale exactly, and plugs into a tiny run."""
import os

import pytest
import torch
import yaml

from dynamicrafter.config import VAEConfig
from dynamicrafter.models.vae import AutoencoderKL
from training import synthetic
from training.modeling import InitError, build_tiny, overlay_extras
from training.pretrain_vae import Optim, calibrate, train_vae

SMOKE = os.path.join(os.path.dirname(__file__), "..", "training", "configs", "tiny_smoke.yaml")


def test_calibration_changes_nothing_but_the_scale():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        m0 = vae.moments(x)
        mean0, logvar0 = m0.chunk(2, dim=1)
        rec0 = vae.decode(mean0 + 0.3)
        s = calibrate(vae, x)
        mean1, logvar1 = vae.moments(x).chunk(2, dim=1)
        rec1 = vae.decode((mean0 + 0.3) * s)
    assert float((0.18215 * mean1).std()) == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(mean1, mean0 * s, rtol=1e-4, atol=1e-5)
    assert torch.allclose(logvar1, logvar0 + 2 * torch.log(torch.tensor(s)), atol=1e-4)
    assert torch.allclose(rec1, rec0, atol=1e-4)


def test_train_vae_and_use_it_in_a_tiny_model(tmp_path):
    csv = synthetic.generate_dataset(str(tmp_path / "d"), 4, height=32, width=32, frames=4, seed=5)
    res = train_vae(csv, str(tmp_path / "vae.safetensors"), size=32, optim=Optim(15, 4, 1e-3, log_every=5))
    assert res["mse"] < 0.6 * res["mse_untrained"], res
    assert res["mse"] == pytest.approx(res["mse_before_calibration"], rel=1e-3, abs=1e-5)
    assert 0.5 < res["held_out_latent_std"] < 2.0
    tiny_sizes = yaml.safe_load(open(SMOKE))["model"]["tiny_overrides"]
    dc = build_tiny(4, 0, tiny_sizes)
    n = overlay_extras(dc, [res["path"]], ("first_stage_model.",))
    assert n == len([k for k in dc.state_dict() if k.startswith("first_stage_model.")])
    from safetensors.torch import load_file
    sd = load_file(res["path"])
    assert torch.equal(dc.first_stage_model.quant_conv.weight, sd["first_stage_model.quant_conv.weight"])
    regrouped = build_tiny(4, 0, {**tiny_sizes, "vae": {**tiny_sizes["vae"], "norm_groups": 8}})
    with pytest.raises(InitError, match="norm_groups 32"):
        overlay_extras(regrouped, [res["path"]], ("first_stage_model.",))
    bigger = build_tiny(4, 0, {**tiny_sizes, "vae": {"ch": 64, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}})
    with pytest.raises(InitError, match="tiny_overrides"):
        overlay_extras(bigger, [res["path"]], ("first_stage_model.",))
