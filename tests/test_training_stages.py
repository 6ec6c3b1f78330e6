"""The three stages on a tiny model: trainable sets, gradient flow, 4->8 growth, objective, overfitting."""
import dataclasses
import os

import pytest
import torch
import yaml

from dynamicrafter.models.unet import TemporalConvBlock, TemporalTransformer
from training import synthetic
from training.config import TrainConfig
from training.data import collate, make_dataset
from training.modeling import build_tiny, enable_gradient_checkpointing
from training.stages import (StageError, StageSettings, apply_trainable, draw, noisy_and_target,
                             prepare_model_for_stage, stage_loss, trainable_names)

HERE = os.path.dirname(__file__)
SMOKE = os.path.join(HERE, "..", "training", "configs", "tiny_smoke.yaml")
TINY = yaml.safe_load(open(SMOKE))["model"]["tiny_overrides"]


def tiny(seed=0, frames=4, **variant):
    overrides = {k: dict(v) for k, v in TINY.items()}
    if variant:
        overrides["variant"] = variant
    return build_tiny(frames, seed, overrides)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    return synthetic.generate_dataset(str(out), 4, height=32, width=32, frames=8, seed=3)


def batch_of(csv, indices, frames=4):
    ds = make_dataset(csv, frames=frames, height=32, width=32, max_stride=2)
    return collate([ds[k] for k in indices])


def temporal_param_names(dc):
    mods = {n for n, m in dc.unet.named_modules() if isinstance(m, (TemporalTransformer, TemporalConvBlock))}
    return {f"model.diffusion_model.{n}" for n, _ in dc.unet.named_parameters()
            if any(n.startswith(m + ".") for m in mods)}


def test_trainable_sets_are_exactly_as_specified():
    dc = tiny()
    unet_names = {n for n, _ in dc.named_parameters() if n.startswith("model.diffusion_model.")}
    resampler = {n for n, _ in dc.named_parameters() if n.startswith("image_proj_model.")}
    temporal = temporal_param_names(dc)
    assert temporal and any("init_attn" in n for n in temporal) and any("temopral_conv" in n for n in temporal)
    s1 = set(trainable_names(dc, 1))
    image_kv = {n for n in unet_names if ".attn2.to_k_ip." in n or ".attn2.to_v_ip." in n}
    assert image_kv and s1 == resampler | image_kv
    s2 = set(trainable_names(dc, 2))
    assert s2 == resampler | (unet_names - temporal)
    assert set(trainable_names(dc, 3)) == s2
    assert set(trainable_names(dc, 3, train_all=True)) == resampler | unet_names
    # nothing of the frozen encoders is ever trained
    for s in (s1, s2):
        assert not any(n.startswith(("first_stage_model.", "cond_stage_model.", "embedder.")) for n in s)
    gated = tiny(seed=0)
    gated_cfg = dataclasses.replace(gated.cfg.unet, image_gate=True)
    from dynamicrafter.model import DynamiCrafter
    g = DynamiCrafter(dataclasses.replace(gated.cfg, unet=gated_cfg))
    alphas = {n for n, _ in g.named_parameters() if n.endswith("attn2.alpha")}
    assert alphas and alphas <= set(trainable_names(g, 1))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_reach_exactly_the_trainable_set(stage, clips):
    dc = tiny()
    prepare_model_for_stage(dc, stage)
    names = trainable_names(dc, stage)
    apply_trainable(dc, names)
    batch = batch_of(clips, [0, 1])
    loss = stage_loss(dc, batch, StageSettings(stage=stage, seed=0, uncond_prob=0.0))
    loss.backward()
    got = {n for n, p in dc.named_parameters() if p.grad is not None}
    assert got == set(names)
    nonzero = {n for n, p in dc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # every trainable tensor takes part in the loss (a few may have exactly-zero gradients by chance: none here)
    assert nonzero == set(names), sorted(set(names) - nonzero)[:5]


def test_stage1_bypasses_the_temporal_path(clips):
    batch = batch_of(clips, [0, 1])

    def loss_before_and_after_perturbing_temporal(stage):
        dc = tiny()
        temporal = temporal_param_names(dc)
        st = StageSettings(stage=stage, seed=0)
        with torch.no_grad():
            before = stage_loss(dc, batch, st)
            for n, p in dc.named_parameters():
                if n in temporal:
                    p.add_(torch.randn_like(p))
            return before, stage_loss(dc, batch, st)

    before, after = loss_before_and_after_perturbing_temporal(1)
    assert torch.equal(before, after)
    before, after = loss_before_and_after_perturbing_temporal(2)
    assert not torch.equal(before, after), "stage 2 must use the temporal layers"


def test_growth_4_to_8_keeps_outputs_at_step_0():
    dc = tiny()
    unet = dc.unet
    assert unet.cfg.in_channels == 4
    x = torch.randn(2, 4, 4, 4, 4)
    ctx = torch.randn(2, 77 + 16 * 4, unet.cfg.context_dim)
    t, fs = torch.tensor([10, 900]), torch.tensor([3, 5])
    with torch.no_grad():
        before = unet(x, t, ctx, fs=fs)
        prepare_model_for_stage(dc, 3)
        assert unet.cfg.in_channels == 8 and unet.input_blocks[0][0].weight.shape[1] == 8
        after = unet(torch.cat([x, torch.randn_like(x) * 5], 1), t, ctx, fs=fs)
    assert torch.equal(before, after)
    # the new channels do learn: their weights get gradients
    apply_trainable(dc, trainable_names(dc, 3))
    unet(torch.cat([x, torch.randn_like(x)], 1), t, ctx, fs=fs).square().mean().backward()
    assert unet.input_blocks[0][0].weight.grad[:, 4:].abs().sum() > 0


def test_stage_preconditions_are_explained():
    dc = tiny()
    prepare_model_for_stage(dc, 3)
    with pytest.raises(StageError, match="run.stage=3"):
        prepare_model_for_stage(dc, 2)
    prepare_model_for_stage(dc, 3)       # an 8-channel model runs stage 3 again as is
    assert dc.unet.cfg.in_channels == 8


def test_objective_v_eps_and_dynamic_rescale():
    dc = tiny()   # v, zero-SNR, dynamic rescale 0.7 (the 512 variant)
    x0, noise = torch.randn(3, 4, 2, 4, 4), torch.randn(3, 4, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    x_t, target = noisy_and_target(dc, x0, t, noise)
    ab = dc.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    scale = dc.scale_arr[t].reshape(-1, 1, 1, 1, 1)
    assert float(dc.scale_arr[500]) == pytest.approx(0.7)
    xs = x0 * scale
    assert torch.allclose(x_t, ab.sqrt() * xs + (1 - ab).sqrt() * noise, atol=1e-6)
    assert torch.allclose(target, ab.sqrt() * noise - (1 - ab).sqrt() * xs, atol=1e-6)
    assert torch.allclose(x_t[2], noise[2]) and torch.allclose(target[2], -xs[2], atol=1e-6)   # zero SNR at t=999
    eps = tiny(parameterization="eps", zero_snr=False, dynamic_rescale_base=None)
    x_t, target = noisy_and_target(eps, x0, t, noise)
    ab = eps.alphas_cumprod[t].reshape(-1, 1, 1, 1, 1)
    assert torch.equal(target, noise) and torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-6)
    assert float(eps.alphas_cumprod[999]) > 0.004


def test_draws_are_keyed_by_sample_and_follow_the_official_dropout_split():
    kw = dict(latent_shape=(4, 2, 2), frames=3, num_timesteps=1000, uncond_prob=0.05, cond_frame="random",
              query_groups=4)
    a = draw(7, torch.tensor([5, 6, 7]), **kw)
    b = draw(7, torch.tensor([7, 5]), **kw)
    assert torch.equal(a.noise[2], b.noise[0]) and a.t[0] == b.t[1]
    big = draw(0, torch.arange(4000), **dict(kw, latent_shape=(1, 1, 1)))
    text_only = (big.drop_text & ~big.drop_image).float().mean()
    both = (big.drop_text & big.drop_image).float().mean()
    image_only = (~big.drop_text & big.drop_image).float().mean()
    for share in (text_only, both, image_only):
        assert 0.035 < float(share) < 0.065
    assert set(big.cond_frame.tolist()) == {0, 1, 2}
    assert set(draw(0, torch.arange(50), **dict(kw, cond_frame="first")).cond_frame.tolist()) == {0}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_overfits_a_tiny_clip_set(stage, clips):
    """A few optimizer steps on two clips lower the loss on a fixed batch of them."""
    torch.manual_seed(0)
    dc = tiny()
    prepare_model_for_stage(dc, stage)
    params = apply_trainable(dc, trainable_names(dc, stage))
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    st = StageSettings(stage=stage, seed=0, uncond_prob=0.0, cond_frame="first")
    fixed = batch_of(clips, [0, 1])      # 2 stream indices -> fixed t / noise per sample
    with torch.no_grad():
        before = stage_loss(dc, fixed, st).item()
    for _ in range(8):
        opt.zero_grad()
        stage_loss(dc, fixed, st).backward()
        opt.step()
    with torch.no_grad():
        after = stage_loss(dc, fixed, st).item()
    assert after < 0.8 * before, (before, after)


def test_gradient_checkpointing_gives_the_same_gradients(clips):
    batch = batch_of(clips, [0, 1])
    grads = []
    for ckpt in (False, True):
        dc = tiny()
        prepare_model_for_stage(dc, 3)
        names = trainable_names(dc, 3)
        apply_trainable(dc, names)
        if ckpt:
            assert enable_gradient_checkpointing(dc.unet) > 0
        stage_loss(dc, batch, StageSettings(stage=3, seed=0)).backward()
        grads.append({n: p.grad.clone() for n, p in dc.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


def test_shipped_configs_parse():
    folder = os.path.dirname(SMOKE)
    for name in sorted(os.listdir(folder)):
        cfg = TrainConfig.from_dict(yaml.safe_load(open(os.path.join(folder, name))))
        assert cfg.run.global_batch % cfg.run.micro_batch == 0, name


def test_videocrafter_init_gets_the_image_stream(tmp_path, clips):
    """Stage 1/2 from a text-to-video (VideoCrafter layout) file: the CLIP image tower and the
    Resampler come from an extra checkpoint, to_k_ip/to_v_ip start as copies of to_k/to_v."""
    import dynamicrafter
    from dynamicrafter.config import tiny_config
    from dynamicrafter.model import DynamiCrafter
    from training.modeling import InitError, load_init

    torch.manual_seed(1)
    cfg = tiny_config(family="videocrafter", frames=4)

    def fix(d):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, **fix(TINY["unet"])),
                              vae=dataclasses.replace(cfg.vae, **fix(TINY["vae"])))
    vc = DynamiCrafter(cfg)
    assert vc.embedder is None and vc.image_proj_model is None
    vc_path = dynamicrafter.save_checkpoint(vc, tmp_path / "vc.safetensors")
    donor = tiny(seed=2)
    donor_path = dynamicrafter.save_checkpoint(donor, tmp_path / "dc.safetensors")
    with pytest.raises(InitError, match="init_extra"):
        load_init(str(vc_path), frames=4)
    dc = load_init(str(vc_path), [str(donor_path)], frames=4)
    assert dc.variant["family"] == "dynamicrafter" and dc.unet.cfg.in_channels == 4
    got = dict(dc.named_parameters())
    for name, p in vc.named_parameters():
        assert torch.equal(got[name], p), name
    for name, p in donor.named_parameters():
        if name.startswith(("embedder.", "image_proj_model.")):
            assert torch.equal(got[name], p), name
    kv = [m for m in dc.unet.modules() if hasattr(m, "to_k_ip")]
    assert kv and all(torch.equal(m.to_k_ip.weight, m.to_k.weight) and torch.equal(m.to_v_ip.weight, m.to_v.weight)
                      for m in kv)
    # only the CLIP image tower from the extra file: a fresh Resampler of the matching sizes
    fresh = load_init(str(vc_path), [str(donor_path)], frames=4, extra_prefixes=("embedder.",))
    rc = fresh.image_proj_model.cfg
    assert (rc.dim, rc.output_dim, rc.embedding_dim, rc.video_length) == (64, 64, 48, 4)
    assert not torch.equal(fresh.image_proj_model.latents, donor.image_proj_model.latents)
    assert torch.equal(fresh.embedder.model.visual.conv1.weight, donor.embedder.model.visual.conv1.weight)
    # and it trains stage 1 as is
    apply_trainable(dc, trainable_names(dc, 1))
    stage_loss(dc, batch_of(clips, [0], frames=1), StageSettings(stage=1, seed=0)).backward()
    assert all(m.to_k_ip.weight.grad is not None for m in kv)


@pytest.mark.parametrize("interp", [False, True])
def test_stage3_concat_layouts(interp, clips):
    """Repeat layout: the conditioning frame's latent on every frame; interpolation layout:
    first and last frame latents, zeros between. fs reaches the UNet."""
    dc = tiny()
    prepare_model_for_stage(dc, 3)
    seen = {}
    inner = dc.unet.forward

    def spy(x, t, context, fs=None, temporal=True):
        seen.update(x=x, fs=fs, temporal=temporal, context=context)
        return inner(x, t, context, fs=fs, temporal=temporal)

    dc.unet.forward = spy
    batch = batch_of(clips, [0, 1])
    with torch.no_grad():
        stage_loss(dc, batch, StageSettings(stage=3, seed=0, cond_frame="first", interp_prob=1.0 if interp else 0.0))
    concat = seen["x"][:, 4:]
    assert concat.shape == (2, 4, 4, 4, 4) and seen["temporal"] is True
    assert torch.equal(seen["fs"], batch["fs"])
    assert seen["context"].shape[1] == 77 + 16 * 4
    if interp:
        assert torch.count_nonzero(concat[:, :, 1:-1]) == 0
        assert torch.count_nonzero(concat[:, :, 0]) > 0 and torch.count_nonzero(concat[:, :, -1]) > 0
        assert not torch.equal(concat[:, :, 0], concat[:, :, -1])
    else:
        for f in range(1, 4):
            assert torch.equal(concat[:, :, f], concat[:, :, 0])
