"""CamI2V (camera-controlled DynamiCrafter): parity with the official code's tensors in
../shared/reference/tiny_cami2v (SPEC §5 tolerances; the camera geometry within a few units of its
own dtype's rounding: its 4x4 inverses come from MKL's LAPACK, whose last bits change with the CPU's
instruction set, so bit equality held on the machine that made the reference and on AVX-only paths,
not on AVX2 / AVX-512), the full-size 256 / 512 layouts on the meta device, and the library's camera
API and its errors."""
import csv
import json

import numpy as np
import pytest
import torch
from conftest import _reference_file, assert_close_to_ref

import dynamicrafter
from dynamicrafter import camera as geometry
from dynamicrafter.checkpoints.loader import model_from_state_dict
from dynamicrafter.sampling.ddim import sample_ddim
from dynamicrafter.sampling.schedule import schedule_buffers

import comfy_runtime

LAYOUTS = comfy_runtime.reference_dir() / "layouts"
CASES = {   # case -> (trace_extract_ratio, trace_scale, cfg, fs, eta, camera_cfg, camera on)
    "caseA": (0.1, 1.0, 5.5, 2, 1.0, 1.0, True),
    "caseB": (0.6, 0.5, 4.0, 6, 0.0, 2.0, True),
    "caseC": (0.1, 1.0, 5.5, 2, 1.0, 1.0, False),
}


def load_cami2v():
    from safetensors.torch import load_file
    dc = dynamicrafter.load_model(_reference_file("tiny_cami2v", "model.safetensors"),
                                  config=_reference_file("tiny_cami2v", "config.yaml"))
    ref = load_file(_reference_file("tiny_cami2v", "reference.safetensors"))
    manifest = json.loads(_reference_file("tiny_cami2v", "manifest.json").read_text())
    return dc, ref, manifest


@pytest.fixture(scope="module")
def ref_cam():
    return load_cami2v()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def mask_of(ref, case, d):
    key = f"{case}.cam.epipolar_mask.d{d}"
    if key in ref:
        return ref[key]
    packed = ref[f"{case}.cam.epipolar_mask_packed.d{d}"].numpy()
    n = packed.shape[1]
    return torch.from_numpy(np.unpackbits(packed, axis=-1)[..., :n].astype(bool))


def assert_within_rounding(ours: torch.Tensor, ref: torch.Tensor, name: str, ulps: int = 16):
    """max|ours - ref| <= ulps * eps(dtype) * max(1, max|ref|), in the reference's dtype."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, f"{name}: {ours.dtype} {tuple(ours.shape)}"
    diff = (ours - ref).abs().max().item()
    tol = ulps * torch.finfo(ref.dtype).eps * max(1.0, ref.abs().max().item())
    assert diff <= tol, f"{name}: max|diff| {diff:.3e} > {ulps} ulps ({tol:.3e})"


def camera_of(dc, ref, case):
    """The case's camera condition, the perturbation draws taken from the reference (its perturbed
    translations divided by 1e-6 give back the N(0,1) draws where they were used)."""
    return dc.encode_camera(ref[f"{case}.batch.RT"], ref[f"{case}.batch.camera_intrinsics"], (64, 64),
                            CASES[case][1], noise=ref[f"{case}.cam.t_pairs_perturbed"] / geometry.PERTURBATION)


# ----------------------------------------------------------------------------- detection and layout

def test_detected_from_keys_with_every_key_and_yaml_settings(ref_cam):
    dc = ref_cam[0]
    manifest = json.loads(_reference_file("tiny_cami2v", "hyperparameters.json").read_text())
    v = dc.variant
    assert v["family"] == "cami2v" and v["parameterization"] == "eps" and v["image_cross_attention"]
    assert (v["spacing"], v["guidance_rescale"], v["fs_meaning"]) == ("uniform_trailing", 0.7, "frame_stride")
    cam = dc.cfg.camera
    assert cam.channels == tuple(manifest["unet_level_widths"]) and cam.heads == 4 and cam.registers == 4
    assert (cam.origin_h, cam.mask_resolutions) == (64, (8, 4, 2, 1))
    assert v["resolution"] == (cam.origin_h, cam.origin_w) == (64, 64)   # its masks' size is its default size
    blocks = sorted(n.removesuffix(".pluker_projection") for n, _ in dc.unet.named_modules()
                    if n.endswith("pluker_projection"))
    want = manifest["temporal_blocks_with_camera_modules (pluker_projection + epipolar)"]
    assert blocks == sorted(want)
    assert not hasattr(dc.unet.init_attn[0].transformer_blocks[0], "pluker_projection")


def layout_state_dict(name):
    path = LAYOUTS / f"full_cami2v_{name}_keys.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found (shared reference layouts)")
    buffers = schedule_buffers(*((False, "eps", None) if name == "256" else (True, "v", 0.7)))
    sd = {}
    with open(path) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            shape = json.loads(row["shape"])
            sd[row["key"]] = (buffers[row["key"]] if row["key"] in buffers
                              else torch.empty(shape, device="meta"))
    return sd


@pytest.mark.parametrize("name,fs,origin,masks", [("256", 3, 256, (8, 4, 2, 1)), ("512", 10, 320, (8, 4, 2))])
def test_full_size_layouts_build_on_meta_with_every_key(name, fs, origin, masks):
    sd = layout_state_dict(name)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    model = model_from_state_dict(dict(sd), device="meta")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    v = model.variant
    assert (v["family"], v["name"], v["default_fs"]) == ("cami2v", f"cami2v_{name}", fs)
    cam = model.cfg.camera
    assert cam.channels == (320, 640, 1280, 1280) and cam.heads == 8 and cam.cin == 384
    assert (cam.origin_h, cam.mask_resolutions) == (origin, masks)
    extra = sum(p.numel() for n, p in model.named_parameters()
                if n.startswith("pose_encoder.") or ".pluker_projection." in n or ".epipolar." in n)
    assert extra == 261_289_280      # "+261 M" (MODEL-SPEC-CAMI2V §9)


# ----------------------------------------------------------------------------- camera geometry

def test_trajectory_glue_within_rounding(ref_cam):
    _, ref, _ = ref_cam
    w2c = geometry.read_pose_file(_reference_file("tiny_cami2v", "inputs", "orbit_left.txt"))
    assert_within_rounding(torch.linalg.inv(w2c), ref["caseA.cam.c2w_file"], "c2w_file")
    for case in ("caseA", "caseB"):
        RT = geometry.resample_trajectory(w2c, 16, CASES[case][0])[None]
        assert RT.dtype == torch.float64
        assert_close_to_ref(RT, ref[f"{case}.batch.RT"], 1e-12, f"{case} RT")
        assert torch.equal(geometry.intrinsics(64, 64), ref[f"{case}.batch.camera_intrinsics"])


@pytest.mark.parametrize("case", ["caseA", "caseB"])
def test_relative_poses_masks_plucker_and_pose_features(ref_cam, case):
    dc, ref, _ = ref_cam
    RT, K = ref[f"{case}.batch.RT"], ref[f"{case}.batch.camera_intrinsics"]
    rel = geometry.relative_c2w(RT, CASES[case][1])
    pairs = geometry.pose_pairs(rel)
    noise = ref[f"{case}.cam.t_pairs_perturbed"] / geometry.PERTURBATION
    t = geometry.perturb_zero_translations(pairs[..., :3, 3:4], noise)
    for name, ours in (("rel_c2w", rel), ("rel_pairs", pairs), ("t_pairs_perturbed", t)):
        if f"{case}.cam.{name}" in ref:
            assert_within_rounding(ours, ref[f"{case}.cam.{name}"], name)
    F = geometry.fundamental_matrices(K.unsqueeze(1), pairs[..., :3, :3], t)
    if f"{case}.cam.F" in ref:
        assert_within_rounding(F, ref[f"{case}.cam.F"], "F")
    cam = camera_of(dc, ref, case)
    for d in (8, 16, 32, 64):
        assert torch.equal(cam.masks[d], mask_of(ref, case, d)), f"mask d={d}"
    if f"{case}.cam.plucker" in ref:
        assert_close_to_ref(geometry.plucker_rays(K, rel, 64, 64), ref[f"{case}.cam.plucker"], name="plucker")
    for level in range(4):
        assert_close_to_ref(cam.pose_features[level], ref[f"{case}.cam.pose_features.{level}"],
                            name=f"pose features {level}")


# ----------------------------------------------------------------------------- UNet and sampling

def test_unet_forward_with_and_without_camera(ref_cam):
    dc, ref, _ = ref_cam
    cam = camera_of(dc, ref, "caseA")
    args = (ref["unet.x_t"], ref["unet.t"], ref["caseA.cond.c_crossattn"], ref["caseA.cond.c_concat"], ref["unet.fs"])
    assert_close_to_ref(dc.denoise(*args, camera=cam), ref["unet.out"], name="unet.out")
    assert_close_to_ref(dc.denoise(*args), ref["unet.out_nocam"], name="unet.out_nocam")


def test_pluker_and_epipolar_outputs_of_blocks(ref_cam):
    dc, ref, _ = ref_cam
    cam = camera_of(dc, ref, "caseA")
    seen = {}
    hooks = []
    for name in ("input_blocks.1", "input_blocks.4", "input_blocks.7", "middle_block", "output_blocks.5"):
        block = dc.unet.get_submodule(f"{name}.2.transformer_blocks.0")
        hooks.append(block.pluker_projection.register_forward_hook(
            lambda m, i, o, n=name: seen.update({f"{n}.pluker_in": i[0], f"{n}.pluker_out": o})))
        hooks.append(block.epipolar.register_forward_hook(
            lambda m, i, o, n=name: seen.update({f"{n}.epipolar_out": o})))
    dc.denoise(ref["unet.x_t"], ref["unet.t"], ref["caseA.cond.c_crossattn"], ref["caseA.cond.c_concat"],
               ref["unet.fs"], camera=cam)
    for h in hooks:
        h.remove()
    for key, value in seen.items():
        assert_close_to_ref(value, ref[f"unet.debug.{key}"], name=key)


def test_branches_share_the_camera(ref_cam):
    """cond and uncond in one UNet call (branch-major), both with the camera, as the official two calls."""
    dc, ref, _ = ref_cam
    cam = camera_of(dc, ref, "caseA")
    out = dc.denoise(ref["caseA.step00.x"], ref["caseA.step00.t"],
                     torch.cat([ref["caseA.cond.c_crossattn"], ref["caseA.uncond.c_crossattn"]]),
                     ref["caseA.cond.c_concat"], ref["caseA.batch.frame_stride"], camera=cam)
    assert_close_to_ref(out[:1], ref["caseA.step00.model_out.cond"], name="cond")
    assert_close_to_ref(out[1:], ref["caseA.step00.model_out.uncond"], name="uncond")


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_cases(ref_cam, case):
    dc, ref, _ = ref_cam
    _, _, cfg, fs, eta, cfg_camera, on = CASES[case]
    cam = camera_of(dc, ref, case) if on else None
    steps = []
    noise = [ref[f"{case}.step{i:02d}.noise"] for i in range(10)] if eta > 0 else None
    out = sample_ddim(dc, ref[f"{case}.step00.x"], ref[f"{case}.cond.c_crossattn"], ref[f"{case}.uncond.c_crossattn"],
                      concat=ref[f"{case}.cond.c_concat"], fs=fs, steps=10, cfg_text=cfg, eta=eta,
                      guidance_rescale=0.7, spacing="uniform_trailing", noise=noise, camera=cam,
                      cfg_camera=cfg_camera, callback=lambda i, n, x, x0: steps.append(x))
    for i in range(9):
        assert_close_to_ref(steps[i], ref[f"{case}.step{i + 1:02d}.x"], 1e-3, f"{case} step {i} x_prev")
    assert_close_to_ref(out, ref[f"{case}.final_latent"], 1e-3, f"{case} final latent")
    if case == "caseB":     # the camera-free third branch
        e_nc = dc.denoise(ref["caseB.step00.x"], ref["caseB.step00.t"], ref["caseB.cond.c_crossattn"],
                          ref["caseB.cond.c_concat"], fs)
        assert_close_to_ref(e_nc, ref["caseB.step00.model_out.cond_nocam"], name="cond without camera")


def test_conditioning_and_decode_match(ref_cam):
    dc, ref, _ = ref_cam
    assert_close_to_ref(dc.encode_text([load_caption()]), ref["text.caption_emb"], name="caption")
    negative = _reference_file("tiny_cami2v", "inputs", "negative_prompt.txt").read_text().strip()
    assert_close_to_ref(dc.encode_text([negative]), ref["text.negative_emb"], name="negative prompt")
    z = dc.encode_first_stage(ref["caseA.batch.image"].expand(16, -1, -1, -1), noise=ref["caseA.vae.posterior_noise"],
                              frames_per_batch=16)
    assert_close_to_ref(z.unflatten(0, (1, 16)).transpose(1, 2), ref["caseA.vae.z"], name="vae z")
    video = dc.decode(ref["caseC.final_latent"])
    assert_close_to_ref(video[:, :, [0, 8, 15]], ref["caseC.video_frames"], name="video")


def load_caption():
    manifest = json.loads(_reference_file("tiny_cami2v", "manifest.json").read_text())
    return manifest["caption_fed_to_model"]


# ----------------------------------------------------------------------------- errors

def test_bad_camera_inputs_fail_clearly(ref_cam):
    dc, ref, _ = ref_cam
    RT, K = ref["caseA.batch.RT"], ref["caseA.batch.camera_intrinsics"]
    with pytest.raises(ValueError, match="RT must be"):
        dc.encode_camera(RT[:, :, :3], K, (64, 64))
    with pytest.raises(ValueError, match="K must be"):
        dc.encode_camera(RT, K[:, :8], (64, 64))
    with pytest.raises(ValueError, match="multiple of 8"):
        dc.encode_camera(RT, K, (60, 64))
    # at another height the official mask lookup (origin_h // feature height) finds masks of another size
    with pytest.raises(ValueError, match="made for videos 64 px high .* sample at height 64"):
        dc.encode_camera(RT, K, (128, 128))
    cam = camera_of(dc, ref, "caseA")
    x = ref["unet.x_t"]
    with pytest.raises(ValueError, match="does not fit the latent"):
        dc.denoise(x[:, :, :8], ref["unet.t"], ref["caseA.cond.c_crossattn"], ref["caseA.cond.c_concat"][:, :, :8],
                   camera=cam)
    with pytest.raises(ValueError, match="needs a camera condition"):
        sample_ddim(dc, x, ref["caseA.cond.c_crossattn"], concat=ref["caseA.cond.c_concat"], steps=2, cfg_camera=2.0)
    with pytest.raises(ValueError, match="trace_extract_ratio"):
        geometry.resample_trajectory(torch.eye(4, dtype=torch.float64)[None], 16, 0.0)
