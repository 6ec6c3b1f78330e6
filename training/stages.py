"""The paper's three training stages on the library's layers (design §6-7; training/README.md).

Stage 1 (text-to-image): single frames, temporal path bypassed (``temporal=False``), 4 input
    channels; trains the Resampler and the image K/V projections (+ the tanh gates where the
    model has them).
Stage 2 (video): the full video UNet, no concat; trains the Resampler and every spatial
    (non-temporal) UNet parameter; temporal layers frozen.
Stage 3 (image concat): the conditioning frame's latent is concatenated to the noisy latent
    (input conv grown 4 -> 8 channels with zero new weights), the conditioning frame is drawn
    at random from the clip; trains the Resampler + spatial layers (``train_all``: everything).

Everything random in a training sample (timestep, noise, VAE posterior noise, the
text/image dropout draw, the conditioning frame) comes from a generator seeded by
(run seed, stream index of the sample), so a step's result depends only on which samples it
holds, not on how they are spread over processes or accumulation steps, and a resumed run
draws exactly what the uninterrupted run drew.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dynamicrafter.config import QUERIES_PER_FRAME
from dynamicrafter.sampling.schedule import NoiseSchedule
from dynamicrafter.models.unet import is_temporal_parameter
from dynamicrafter.models.vae import posterior_sample

UNET = "model.diffusion_model."
RESAMPLER = "image_proj_model."
IMAGE_KV = ("attn2.to_k_ip.", "attn2.to_v_ip.")
GATE = "attn2.alpha"


class StageError(ValueError):
    """The model or settings cannot run this stage; the message says what to change."""


# ------------------------------------------------------------------------------ trainable sets

def trainable_names(dc, stage: int, train_all: bool = False, camera: bool = False) -> list[str]:
    """Names (in dc.named_parameters(), i.e. the official key layout) that a stage trains; `camera`
    (CamI2V fine-tuning): exactly the camera modules."""
    if camera:
        from training.camera import camera_names
        return camera_names(dc)
    unet = dc.unet
    names = []
    for name, _ in dc.named_parameters():
        if name.startswith(RESAMPLER):
            names.append(name)
        elif name.startswith(UNET):
            rel = name[len(UNET):]
            if stage == 1:
                keep = any(k in rel for k in IMAGE_KV) or rel.endswith(GATE)
            elif stage == 2 or not train_all:
                keep = not is_temporal_parameter(rel, unet)
            else:
                keep = True
            if keep:
                names.append(name)
    return names


def apply_trainable(dc, names) -> list[torch.nn.Parameter]:
    keep = set(names)
    params = []
    for name, p in dc.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            params.append(p)
    missing = keep - {n for n, _ in dc.named_parameters()}
    if missing:
        raise StageError(f"parameters to train are not in the model: {sorted(missing)[:5]}")
    return params


def prepare_model_for_stage(dc, stage: int) -> None:
    """Check the model can run the stage; grow the input conv for stage 3."""
    unet = dc.unet
    cin = unet.cfg.in_channels
    if getattr(dc, "image_proj_model", None) is None or not unet.cfg.image_cross_attention:
        raise StageError("this model has no image context stream (Resampler + to_k_ip/to_v_ip); build it with "
                         "image cross-attention (a VideoCrafter init is extended automatically by training.train)")
    latent_c = unet.cfg.out_channels
    if stage in (1, 2) and cin != latent_c:
        raise StageError(f"stage {stage} trains without the image concat, so the UNet needs {latent_c} input "
                         f"channels; this one has {cin} (a stage-3/DynamiCrafter checkpoint). Fine-tune it with "
                         "run.stage=3, or start stage {stage} from a text-to-image/text-to-video checkpoint.")
    if stage == 3 and cin == latent_c:
        dc.grow_input_channels(2 * latent_c)     # zero new weights; dc.cfg follows
    elif stage == 3 and cin != 2 * latent_c:
        raise StageError(f"stage 3 needs a UNet with {latent_c} or {2 * latent_c} input channels, not {cin}")


# ------------------------------------------------------------------------------ per-sample draws

def sample_generator(seed: int, index: int, tag: int = 0) -> torch.Generator:
    s = np.random.SeedSequence([int(seed), int(index), int(tag)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(s) & ((1 << 63) - 1))


@dataclass
class Draws:
    t: torch.Tensor            # (b,) long
    noise: torch.Tensor        # (b, C, T, h, w)
    vae_noise: torch.Tensor    # (b, T, C, h, w)
    drop_text: torch.Tensor    # (b,) bool
    drop_image: torch.Tensor   # (b,) bool
    cond_frame: torch.Tensor   # (b,) long
    query_group: torch.Tensor  # (b,) long  (stage 1: which frame's 16 Resampler queries feed the image)
    interp: torch.Tensor       # (b,) bool  (stage 3: first+last frame concat layout)


def draw(seed: int, indices, *, latent_shape, frames: int, num_timesteps: int, uncond_prob: float,
         cond_frame: str, query_groups: int, interp_prob: float = 0.0) -> Draws:
    """Every random choice of a micro-batch, keyed by the samples' stream indices."""
    c, h, w = latent_shape
    cols = {k: [] for k in Draws.__dataclass_fields__}
    for k in indices.tolist():
        g = sample_generator(seed, k)
        cols["t"].append(torch.randint(0, num_timesteps, (1,), generator=g))
        cols["noise"].append(torch.randn(c, frames, h, w, generator=g))
        cols["vae_noise"].append(torch.randn(frames, c, h, w, generator=g))
        r = torch.rand(1, generator=g)
        # official split: r < p text only, p <= r < 2p both, 2p <= r < 3p image only
        cols["drop_text"].append(r < 2 * uncond_prob)
        cols["drop_image"].append((r >= uncond_prob) & (r < 3 * uncond_prob))
        f = torch.randint(0, frames, (1,), generator=g)
        cols["cond_frame"].append(f if cond_frame == "random" else torch.zeros_like(f))
        cols["query_group"].append(torch.randint(0, max(1, query_groups), (1,), generator=g))
        cols["interp"].append(torch.rand(1, generator=g) < interp_prob)
    return Draws(t=torch.cat(cols["t"]).long(), noise=torch.stack(cols["noise"]),
                 vae_noise=torch.stack(cols["vae_noise"]), drop_text=torch.cat(cols["drop_text"]),
                 drop_image=torch.cat(cols["drop_image"]), cond_frame=torch.cat(cols["cond_frame"]).long(),
                 query_group=torch.cat(cols["query_group"]).long(), interp=torch.cat(cols["interp"]))


# ------------------------------------------------------------------------------ objective

def noisy_and_target(dc, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """(x_t, target) per design §6 (`NoiseSchedule.q_sample` / `target`): with the x0 rescale the
    clean latent is first multiplied by scale_arr[t]; target is eps, or v = sqrt(ab) eps - sqrt(1-ab) x0."""
    variant = dc.variant
    if (variant.get("dynamic_rescale_base") is not None or variant.get("use_scale")) \
            and getattr(dc, "scale_arr", None) is None:
        raise StageError("the variant asks for the x0 rescale but the model has no scale_arr buffer")
    if variant["parameterization"] not in ("eps", "v"):
        raise StageError(f"unsupported parameterization {variant['parameterization']!r}")
    schedule = NoiseSchedule.of(dc)
    return schedule.q_sample(x0, t, noise), schedule.target(x0, t, noise)


@dataclass
class StageSettings:
    stage: int
    seed: int
    uncond_prob: float = 0.05
    cond_frame: str = "random"
    interp_prob: float = 0.0
    camera: bool = False           # CamI2V: the clip's camera poses condition the UNet (batch RT, K)
    fixed_t: int | None = None     # validation: this timestep for every sample (noise still keyed by sample)


def encode_video(dc, video: torch.Tensor, vae_noise: torch.Tensor) -> torch.Tensor:
    """(b, 3, T, H, W) in [-1, 1] -> scaled latents (b, C, T, h, w), posterior sampled with vae_noise."""
    b, _, t = video.shape[:3]
    frames = video.transpose(1, 2).flatten(0, 1)                       # (b*T, 3, H, W), frame-major per video
    z = dc.encode_first_stage(frames, noise=vae_noise.flatten(0, 1).to(frames))
    return z.reshape(b, t, *z.shape[1:]).transpose(1, 2)


def stage_loss(dc, batch: dict, st: StageSettings, autocast=None) -> torch.Tensor:
    """Mean-squared diffusion loss of one micro-batch for stage st.stage."""
    import contextlib

    autocast = autocast or contextlib.nullcontext()
    device = dc.sqrt_alphas_cumprod.device
    cached = "moments" in batch          # encodings from training.cache instead of pixels
    video = batch["moments"] if cached else batch["video"]
    b, frames = video.shape[:2] if cached else (video.shape[0], video.shape[2])
    if st.stage == 1:
        frames = 1
        video = video[:, :1] if cached else video[:, :, :1]
    video = video.to(device)
    unet = dc.unet
    resampler_frames = dc.image_proj_model.cfg.video_length
    latent_c = unet.cfg.out_channels
    h, w = video.shape[-2:] if cached else (video.shape[-2] // 8, video.shape[-1] // 8)
    d = draw(st.seed, batch["index"], latent_shape=(latent_c, h, w), frames=frames,
             num_timesteps=dc.alphas_cumprod.shape[0], uncond_prob=st.uncond_prob,
             cond_frame=st.cond_frame if st.stage == 3 else "first", query_groups=resampler_frames,
             interp_prob=st.interp_prob if st.stage == 3 else 0.0)
    t = d.t.to(device) if st.fixed_t is None else torch.full_like(d.t, st.fixed_t).to(device)
    # an interpolation sample is conditioned on its first (and last) frame: CLIP sees the first
    cond_idx = torch.where(d.interp, torch.zeros_like(d.cond_frame), d.cond_frame).to(device)
    rows = torch.arange(b, device=device)
    with torch.no_grad(), autocast:
        if cached:
            z = posterior_sample(video.flatten(0, 1), d.vae_noise.to(device).flatten(0, 1)) * dc.scale_factor
            z = z.unflatten(0, (b, frames)).transpose(1, 2).float()
            drop_t = d.drop_text.to(device)[:, None, None]
            text = torch.where(drop_t, batch["text_empty"].to(device), batch["text"].to(device))
            drop_i = d.drop_image.to(device)[:, None, None]
            clip_tokens = torch.where(drop_i, batch["clip_zero"].to(device), batch["clip"].to(device)[rows, cond_idx])
        else:
            z = encode_video(dc, video, d.vae_noise.to(device)).float()
            captions = ["" if drop else cap for cap, drop in zip(batch["caption"], d.drop_text.tolist())]
            text = dc.encode_text(captions)
            img = video[rows, :, cond_idx]                                       # (b, 3, H, W)
            img = torch.where(d.drop_image.to(device)[:, None, None, None], torch.zeros_like(img), img)
            clip_tokens = dc.encode_clip_image(img)
    # one memory layout for both sources: dropout masks follow memory order, so the same
    # samples must reach the UNet in the same layout to draw the same masks
    z = z.contiguous()
    with autocast:
        img_ctx = dc.image_context(clip_tokens)                                # (b, 16*Tr, C), trainable
        if st.stage == 1:
            q = d.query_group.to(device)[:, None] * QUERIES_PER_FRAME + torch.arange(QUERIES_PER_FRAME, device=device)
            img_ctx = torch.gather(img_ctx, 1, q[..., None].expand(-1, -1, img_ctx.shape[-1]))
        context = torch.cat([text.to(img_ctx.dtype), img_ctx], dim=1)
        x_t, target = noisy_and_target(dc, z, t, d.noise.to(device))
        inp = x_t
        if st.stage == 3:
            rep = z[torch.arange(b, device=device), :, cond_idx][:, :, None].expand(-1, -1, frames, -1, -1)
            layout = torch.zeros_like(z)
            layout[:, :, 0], layout[:, :, -1] = z[:, :, 0], z[:, :, -1]
            concat = torch.where(d.interp.to(device)[:, None, None, None, None], layout, rep)
            inp = torch.cat([x_t, concat], dim=1)
        fs = batch["fs"].to(device)
        if st.stage == 1:   # single images have no frame rate: the variant's default, as at sampling
            fs = torch.full_like(fs, int(dc.variant["default_fs"]))
        extra = {}
        if st.camera:       # never dropped (the official trainer keeps it for every sample)
            from training.camera import PERTURBATION_TAG, camera_condition
            gens = [sample_generator(st.seed, k, tag=PERTURBATION_TAG) for k in batch["index"].tolist()]
            extra["camera"] = camera_condition(dc, batch["RT"], batch["K"], tuple(video.shape[-2:]), cond_idx, gens)
        out = unet(inp, t, context, fs=fs, temporal=st.stage != 1, **extra)
    return F.mse_loss(out.float(), target.float())
