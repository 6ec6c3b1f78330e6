"""VideoCrafter1 text-to-video (issue 19): relative temporal positions, no temporal conv, no fps
embedding, no scale_arr. Parity with the official VideoCrafter code's tensors in
../shared/reference/tiny_vc1 (design §13), the 1024 preset (use_scale 0.3 with fix_scale_bug, fps),
other sizes and head widths, the CLI, the ComfyUI executor and training from a VC1 file."""
import dataclasses

import pytest
import torch
from conftest import _reference_file, assert_close_to_ref, load_reference, unet_block_outputs

import dynamicrafter
from dynamicrafter.models.attention import RelativePosition, relative_attention
from dynamicrafter.checkpoints.loader import model_from_state_dict
from dynamicrafter.config import PRESETS, UNetConfig, VAEConfig, tiny_config
from dynamicrafter.sampling.schedule import ddim_timesteps, scale_arr, variant_schedule
from dynamicrafter.models.unet import timestep_embedding

PROMPT = "a paper boat drifts down a rainy street, cinematic"


@pytest.fixture(scope="module")
def ref_vc1():
    return load_reference("tiny_vc1")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ------------------------------------------------------------------------------ detection

def test_variant_detected_from_keys(ref_vc1):
    dc, ref, manifest = ref_vc1
    v, u = dc.variant, dc.unet.cfg
    assert (v["family"], v["parameterization"], v["zero_snr"], v["use_scale"], v["image_cross_attention"]) == \
        ("videocrafter", "eps", False, False, False)
    assert v["spacing"] == "uniform" and v["cfg_text"] == 12.0 and v["guidance_rescale"] == 0.0
    assert v["frames"] == 8 == manifest["settings"]["frames"]          # the training length of the tables
    assert u.relative_position and u.temporal_length == 8
    assert not u.temporal_conv and not u.fs_condition and u.num_head_channels == 16
    assert not hasattr(dc, "scale_arr") and not hasattr(dc.unet, "fps_embedding")
    assert torch.equal(dc.alphas_cumprod, ref["schedule.alphas_cumprod"])
    tables = [m for m in dc.unet.modules() if isinstance(m, RelativePosition)]
    assert len(tables) == 2 * 2 * 17    # k and v, attn1 and attn2, init_attn + 16 temporal transformers
    sd, _ = dynamicrafter.read_state_dict(_reference_file("tiny_vc1", "model.safetensors"))
    assert sum("relative_position_" in k for k in sd) == len(tables)
    assert all(t.embeddings_table.shape == (17, 16) and t.embeddings_table.abs().sum() > 0 for t in tables)


# ------------------------------------------------------------------------------ parity

def test_text(ref_vc1):
    dc, ref, manifest = ref_vc1
    assert manifest["prompt"] == PROMPT
    assert torch.equal(dc.text_encoder.tokenize([PROMPT]), ref["text.prompt_tokens"])
    assert torch.equal(dc.text_encoder.tokenize([""]), ref["text.empty_tokens"])
    assert_close_to_ref(dc.encode_text([PROMPT]), ref["text.prompt_emb"], name="prompt")
    assert_close_to_ref(dc.encode_text([""]), ref["text.empty_emb"], name="empty prompt")


def test_unet_block_by_block_default_fps_and_long_clip(ref_vc1):
    dc, ref, _ = ref_vc1
    out, debug = unet_block_outputs(dc.unet, ref["unet.x_t"], ref["unet.t"], ref["unet.context"], ref["unet.fps"])
    blocks = [k.removeprefix("unet.debug.") for k in ref if k.startswith("unet.debug.")]
    assert len(blocks) == 27   # time embedding (no fps embedding), in0, init_attn, in1-11, middle, out0-11
    for name in blocks:
        assert_close_to_ref(debug[name], ref[f"unet.debug.{name}"], name=name)
    assert_close_to_ref(out, ref["unet.out"], name="unet.out")
    assert_close_to_ref(timestep_embedding(ref["unet.t"], 32), ref["unet.t_sinusoid"])
    x, t, ctx = ref["unet.x_t"], ref["unet.t"], ref["unet.context"]
    assert_close_to_ref(dc.denoise(x, t, ctx, None, None), ref["unet_fps_default.out"], name="no fps")
    assert torch.equal(dc.denoise(x, t, ctx, None, torch.tensor([3])), dc.denoise(x, t, ctx, None, None))
    # 12 frames > temporal_length 8: distances beyond +-8 use the end rows of the tables
    assert ref["unet_long.x_t"].shape[2] == 12
    assert_close_to_ref(dc.denoise(ref["unet_long.x_t"], t, ctx, None, ref["unet.fps"]), ref["unet_long.out"],
                        name="12 frames")


class Recording:
    """The model as the sampler sees it, recording each step's x, t and per-branch UNet outputs."""

    def __init__(self, dc, calls):
        self._dc, self._calls = dc, calls

    def __getattr__(self, name):
        return getattr(self._dc, name)

    def denoise(self, x, t, context, concat=None, fs=None):
        out = self._dc.denoise(x, t, context, concat, fs)
        self._calls.append((x, t, out.split(x.shape[0])))
        return out


@pytest.mark.parametrize("case", ["A", "B"])
def test_ddim_cases_every_step_and_decoded_video(ref_vc1, case):
    dc, ref, manifest = ref_vc1
    spec = next(c for c in manifest["cases"] if c["id"] == case)
    k = f"case{case}."
    assert torch.equal(torch.as_tensor(ddim_timesteps(spec["steps"], "uniform")), ref[k + "ddim.timesteps"])
    cond, uncond = ref[k + "cond.c_crossattn"], ref[k + "uncond.c_crossattn"]
    steps, calls = [], []
    out = dynamicrafter.sample_ddim(Recording(dc, calls), ref[k + "x_T"], cond, uncond, None, concat=None,
                                    fs=ref[k + "fps"], steps=spec["steps"], cfg_text=spec["cfg_scale"], eta=spec["eta"],
                                    spacing="uniform", callback=lambda i, n, x, x0: steps.append((x, x0)))
    assert len(steps) == len(calls) == spec["steps"]
    for i, ((x_prev, x0), (x, t, branches)) in enumerate(zip(steps, calls)):
        s = f"{k}step{i:02d}."
        assert torch.equal(t, ref[s + "t"])
        assert_close_to_ref(x, ref[s + "x"], rel=1e-3, name=f"step {i} x")
        assert_close_to_ref(branches[0], ref[s + "model_out.cond"], rel=1e-3, name=f"step {i} cond")
        assert_close_to_ref(branches[1], ref[s + "model_out.uncond"], rel=1e-3, name=f"step {i} uncond")
        guided = branches[1] + spec["cfg_scale"] * (branches[0] - branches[1])
        assert_close_to_ref(guided, ref[s + "guided"], rel=1e-3, name=f"step {i} guided")
        assert_close_to_ref(x0, ref[s + "pred_x0"], rel=1e-3, name=f"step {i} pred_x0")
        assert_close_to_ref(x_prev, ref[s + "x_prev"], rel=1e-3, name=f"step {i} x_prev")
    for i in (0, spec["steps"] - 1):   # the branches from the reference's own x, at the stage tolerance
        s = f"{k}step{i:02d}."
        c, u = dc.denoise(ref[s + "x"], ref[s + "t"], torch.cat([cond, uncond]), None, ref[k + "fps"]).chunk(2)
        assert_close_to_ref(c, ref[s + "model_out.cond"], name=f"step {i} cond from the reference x")
        assert_close_to_ref(u, ref[s + "model_out.uncond"], name=f"step {i} uncond from the reference x")
    assert_close_to_ref(out, ref[k + "samples"], rel=1e-3)
    assert_close_to_ref(dc.decode(ref[k + "samples"]), ref[k + "video"], name="decode")
    assert_close_to_ref(dc.decode(out), ref[k + "video"], rel=1e-3, name="decoded sample")
    ours = torch.from_numpy(dynamicrafter.video.to_uint8(dc.decode(ref[k + "samples"])))
    # truncation to uint8: a 1e-6 difference may cross an integer boundary, never more
    assert (ours.int() - ref[k + "video_uint8"][0].int()).abs().max() <= 1


# ------------------------------------------------------------------------------ the attention itself

def explicit_relative_attention(q, k, v, heads, table_k, table_v):
    """The official formula written out: per-head logits plus q.table_k, softmax, plus p.table_v."""
    n, t, _ = q.shape
    L = (table_k.shape[0] - 1) // 2
    idx = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).clamp(-L, L) + L
    q, k, v = (x.reshape(n, t, heads, -1).transpose(1, 2) for x in (q, k, v))
    d = q.shape[-1]
    logits = (q @ k.transpose(-1, -2) + torch.einsum("nhid,ijd->nhij", q, table_k[idx])) * d ** -0.5
    p = logits.softmax(-1)
    out = p @ v + torch.einsum("nhij,ijd->nhid", p, table_v[idx])
    return out.transpose(1, 2).reshape(n, t, -1)


@pytest.mark.parametrize("frames,max_distance,heads", [(5, 8, 1), (12, 4, 3), (16, 16, 2)])
def test_relative_attention_is_the_official_formula(frames, max_distance, heads):
    g = torch.Generator().manual_seed(frames)
    q, k, v = (torch.randn(6, frames, heads * 8, generator=g) for _ in range(3))
    rel_k, rel_v = RelativePosition(8, max_distance), RelativePosition(8, max_distance)
    rel_k.embeddings_table.copy_(torch.randn(2 * max_distance + 1, 8, generator=g))
    rel_v.embeddings_table.copy_(torch.randn(2 * max_distance + 1, 8, generator=g))
    ours = relative_attention(q, k, v, heads, rel_k(frames), rel_v(frames))
    ref = explicit_relative_attention(q, k, v, heads, rel_k.embeddings_table, rel_v.embeddings_table)
    assert (ours - ref).abs().max() < 1e-5
    if frames > max_distance + 1:   # clamped: the first and last query see the end rows
        assert torch.equal(rel_k(frames)[0, -1], rel_k.embeddings_table[-1])
        assert torch.equal(rel_k(frames)[-1, 0], rel_k.embeddings_table[0])


# ------------------------------------------------------------------------------ generality

def vc1_config(head_channels=8, temporal_length=4, channel_mult=(1, 2), fps=False, frames=4, encoders=False):
    """A small VideoCrafter1; without `encoders` a pruned-style UNet-only model (fast to build)."""
    cfg = tiny_config(family="videocrafter", frames=frames)
    unet = dataclasses.replace(cfg.unet, model_channels=32, channel_mult=channel_mult,
                               attention_levels=tuple(range(len(channel_mult))), num_res_blocks=1,
                               num_head_channels=head_channels, context_dim=cfg.text.text_width,
                               temporal_conv=False, fs_condition=fps, relative_position=True,
                               temporal_length=temporal_length)
    preset = PRESETS["vc1_1024" if fps else "vc1"]
    return dataclasses.replace(cfg, unet=unet, vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)
                               if encoders else None, text=cfg.text if encoders else None,
                               variant=dataclasses.replace(preset, name="custom", frames=frames))


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = dynamicrafter.DynamiCrafter(cfg).eval()
    with torch.no_grad():   # the official zero-inits (out convs) would hide wiring bugs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def official_file(model, path):
    """The model's tensors as the official code stores them: no metadata of ours."""
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def denoise_once(model, frames=6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, frames, 8, 8, generator=g)
    ctx = torch.randn(1, 77, model.unet.cfg.context_dim, generator=g)
    return model.denoise(x, torch.tensor([500]), ctx, None, torch.tensor([8]))


@pytest.mark.parametrize("head_channels,temporal_length,channel_mult", [(8, 4, (1, 2)), (32, 6, (1,))])
def test_other_sizes_and_head_widths_load_from_shapes(tmp_path, head_channels, temporal_length, channel_mult):
    model = random_model(vc1_config(head_channels, temporal_length, channel_mult))
    path = official_file(model, tmp_path / "vc1.safetensors")
    loaded = dynamicrafter.load_model(path)   # the tables' width is the head width
    u = loaded.unet.cfg
    assert (u.num_head_channels, u.temporal_length, u.channel_mult) == (head_channels, temporal_length, channel_mult)
    assert loaded.variant["frames"] == temporal_length
    # 6 frames: clamped when temporal_length is 4. Not bit-equal: the file's tensors sit at other
    # memory alignments, which changes the CPU kernels' summation order (measured 3e-6)
    assert_close_to_ref(denoise_once(loaded), denoise_once(model), rel=1e-5)
    sd, _ = dynamicrafter.read_state_dict(path)
    assert dynamicrafter.infer_config(sd, heads={"unet_head_channels": head_channels}).unet == u
    with pytest.raises(dynamicrafter.CheckpointError, match="relative-position tables"):
        dynamicrafter.load_model(path, heads={"unet_head_channels": head_channels * 2})


def test_text_heads_are_general(tmp_path):
    cfg = vc1_config(encoders=True)
    # text width 64 with 2 heads: not what the tiny rule (head width 16, 4 heads) would guess
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, text_heads=2), vae=None)
    model = random_model(cfg)
    path = official_file(model, tmp_path / "vc1.safetensors")
    loaded = dynamicrafter.load_model(path, heads={"text_heads": 2})
    assert loaded.cfg.text.text_heads == 2
    assert_close_to_ref(loaded.encode_text([PROMPT]), model.encode_text([PROMPT]), rel=1e-5)
    wrong = dynamicrafter.load_model(path).encode_text([PROMPT])   # the tiny rule's 4 heads: another function
    assert (wrong - model.encode_text([PROMPT])).abs().max() > 1e-2


# ------------------------------------------------------------------------------ presets and schedules

def test_fix_scale_bug_changes_the_length_only():
    buggy, fixed = scale_arr(0.3), scale_arr(0.3, fix_scale_bug=True)
    assert buggy.shape == (1400,) and fixed.shape == (1000,)
    assert (buggy[:1000] == fixed).all() and fixed[0] == 1.0 and fixed[399] == pytest.approx(0.3)
    assert variant_schedule(PRESETS["vc1_1024"])["scale_arr"].shape == (1000,)
    assert variant_schedule(PRESETS["vc2"])["scale_arr"].shape == (1400,)
    assert "scale_arr" not in variant_schedule(PRESETS["vc1"])


def test_presets():
    v512, v1024 = PRESETS["vc1"], PRESETS["vc1_1024"]
    assert (v512.resolution, v512.cfg_text, v512.use_scale, v512.spacing) == ((320, 512), 12.0, False, "uniform")
    assert (v1024.resolution, v1024.cfg_text, v1024.use_scale, v1024.scale_b, v1024.fix_scale_bug) == \
        ((576, 1024), 12.0, True, 0.3, True)


def full_size_vc1_state_dict(fps: bool):
    """The shapes of the released VideoCrafter1 512 / 1024 text-to-video checkpoints (official configs:
    model_channels 320, heads 64 wide, temporal_length 16), built on the meta device; schedule buffers real."""
    preset = PRESETS["vc1_1024" if fps else "vc1"]
    unet = UNetConfig(in_channels=4, image_cross_attention=False, temporal_conv=False, fs_condition=fps,
                      relative_position=True, temporal_length=16, default_fs=16)
    cfg = dataclasses.replace(tiny_config(family="videocrafter"), unet=unet, vae=VAEConfig(),
                              text=dataclasses.replace(tiny_config().text, text_width=1024, text_layers=24,
                                                       text_heads=16, embed_dim=1024),
                              variant=preset)
    with torch.device("meta"):
        model = dynamicrafter.DynamiCrafter(cfg)
    buffers = {k for k, _ in model.named_buffers()}
    sd = {k: (variant_schedule(preset)[k] if k in buffers else v) for k, v in model.state_dict().items()}
    return sd


@pytest.mark.parametrize("fps", [False, True])
def test_full_size_layouts_detect_512_and_1024(fps):
    sd = full_size_vc1_state_dict(fps)
    assert sum("relative_position_" in k for k in sd) == 4 * 17   # init_attn + 16 temporal transformers
    model = model_from_state_dict(dict(sd), device="meta")
    v = model.variant
    assert v["name"] == ("vc1_1024" if fps else "vc1")
    assert v["resolution"] == ((576, 1024) if fps else (320, 512)) and v["frames"] == 16
    assert v["use_scale"] == fps and model.unet.cfg.num_head_channels == 64
    if fps:
        assert (v["scale_b"], v["fix_scale_bug"], v["default_fs"]) == (0.3, True, 28)
        assert model.scale_arr.shape == (1000,)
    # a pruned (UNet-only) file keeps the detection: fps embedding => 1024
    pruned = {k: t for k, t in sd.items() if k.startswith("model.diffusion_model.")}
    assert model_from_state_dict(pruned, device="meta").variant["name"] == v["name"]


def test_1024_style_fps_and_scaled_sampling(tmp_path):
    model = random_model(vc1_config(fps=True))
    assert model.scale_arr.shape == (1000,)
    loaded = dynamicrafter.load_model(official_file(model, tmp_path / "vc1_1024.safetensors"))
    v = loaded.variant
    assert (v["use_scale"], v["scale_b"], v["fix_scale_bug"], v["default_fs"]) == (True, 0.3, True, 28)
    assert loaded.unet.cfg.fs_condition
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(1, 4, 4, 8, 8, generator=g)
    cond, uncond = (torch.randn(1, 77, 64, generator=g) for _ in range(2))

    def run(m, fs):
        return dynamicrafter.sample_ddim(m, x_T, cond, uncond, concat=None, fs=fs, steps=2, cfg_text=12.0,
                                         spacing="uniform")

    out = run(loaded, 28)
    assert (out - run(loaded, 8)).abs().max() > 1e-3   # the 1024 model reads fps
    # the use_scale update (x0 / scale_t, then * scale_prev) differs from plain DDIM
    plain = dataclasses.replace(loaded.cfg, variant=dataclasses.replace(loaded.cfg.variant, use_scale=False))
    loaded.cfg = plain
    assert not torch.allclose(run(loaded, 28), out)


# ------------------------------------------------------------------------------ library, CLI, ComfyUI, training

def test_text_to_video_animate_and_cli(ref_vc1, tmp_path):
    dc = ref_vc1[0]
    video = dynamicrafter.animate(dc, None, PROMPT, height=64, width=64, steps=2, seed=1)
    assert video.shape == (1, 3, 8, 64, 64) and torch.isfinite(video).all()   # 8 frames: the model's length
    from dynamicrafter.cli import main
    out = tmp_path / "t2v.mp4"
    assert main(["animate", "--ckpt", str(_reference_file("tiny_vc1", "model.safetensors")), "--prompt", PROMPT,
                 "--frames", "4", "--height", "64", "--width", "64", "--steps", "2", "--out", str(out)]) == 0
    assert dynamicrafter.video.read_video(out).shape == (4, 64, 64, 3)


def test_text_to_video_workflow_runs_in_the_comfy_executor(comfy, comfy_reference):
    import test_comfy_nodes as tcn
    _reference_file("tiny_vc1", "model.safetensors")
    video = tcn.run_and_get_video(comfy, tcn.tiny_prompt(comfy, "VideoCrafter text to video.json", [],
                                                         ckpt="vc1_tiny.safetensors", steps=3))
    assert tcn.count_frames(video) == tcn.T


def test_training_stage2_starts_from_a_vc1_checkpoint(tmp_path):
    """As from VideoCrafter2: the image stream is added (CLIP image tower from an extra file, fresh
    Resampler), the relative-position tables come along, and stage 2 keeps them frozen."""
    torch.set_grad_enabled(True)
    from training.modeling import load_init
    from training.stages import StageSettings, apply_trainable, stage_loss, trainable_names

    vc = random_model(vc1_config(encoders=True))
    vc_path = official_file(vc, tmp_path / "vc1.safetensors")
    donor_cfg = tiny_config(frames=4)
    donor = dynamicrafter.DynamiCrafter(dataclasses.replace(donor_cfg, vae=vc.cfg.vae))
    donor_path = dynamicrafter.save_checkpoint(donor, tmp_path / "dc.safetensors")
    dc = load_init(str(vc_path), [str(donor_path)], frames=4, extra_prefixes=("embedder.",))
    assert dc.variant["family"] == "dynamicrafter" and dc.unet.cfg.relative_position
    got = dict(dc.named_parameters())
    tables = [n for n, _ in vc.named_parameters() if "relative_position_" in n]
    assert tables and all(torch.equal(got[n], vc.get_parameter(n)) for n in tables)
    names = trainable_names(dc, 2)
    assert not set(tables) & set(names) and not any("init_attn" in n for n in names)
    apply_trainable(dc, names)
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.rand(1, 3, 4, 64, 64, generator=g) * 2 - 1, "caption": ["a ball"],
             "fs": torch.tensor([8]), "index": torch.tensor([0])}
    loss = stage_loss(dc, batch, StageSettings(stage=2, seed=0))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(got[n].grad is None for n in tables)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in dc.named_parameters() if n in names)
