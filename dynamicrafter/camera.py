"""Camera geometry of CamI2V (MODEL-SPEC-CAMI2V §3-§4): trajectories, intrinsics, relative poses,
epipolar masks and Plücker rays. Plain functions on tensors, no model weights.

Conventions (the official code's): a trajectory is a sequence of world-to-camera 4x4 matrices (the
RealEstate10K pose-file rows); poses are handled as camera-to-world (c2w) matrices; pixel (u, v) is
centred at u + 0.5 for rays and cells of size d are centred at x*d + d/2 - 0.5 for the masks.
The trajectory glue (file, resampling) runs in float64, everything after it in float32.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from einops import rearrange

PERTURBATION = 1e-6   # zero translations are replaced by PERTURBATION * N(0, 1) (official add_small_perturbation)


# ------------------------------------------------------------------------------------ trajectories

def read_pose_file(path) -> torch.Tensor:
    """A RealEstate10K-style pose file -> (N, 4, 4) float64 world-to-camera matrices.

    One row per pose: `id fx fy cx cy k1 k2 r11 r12 r13 t1 r21 r22 r23 t2 r31 r32 r33 t3` (columns 7..18:
    the 3x4 world-to-camera matrix, row-major); lines starting with 'https' (the video URL) are skipped.
    The normalised intrinsics of the file are not used (the official demo ignores them too)."""
    path = Path(path)
    return w2c_from_rows(read_pose_rows(path), path.name)


def read_pose_rows(path) -> torch.Tensor:
    """The rows of a RealEstate10K-style pose file, checked: (N, 19) float64 (see read_pose_file)."""
    path = Path(path)
    try:
        rows = np.loadtxt(str(path), comments="https", ndmin=2)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read the camera pose file {path.name}: {e}; expected one pose per line: "
                         "'id fx fy cx cy k1 k2' then the 12 numbers of a 3x4 world-to-camera matrix") from e
    return check_pose_rows(rows, path.name)


def check_pose_rows(rows, name: str = "poses") -> torch.Tensor:
    rows = torch.as_tensor(np.asarray(rows, dtype=np.float64))
    if rows.ndim != 2 or rows.shape[1] != 19 or rows.shape[0] < 1:
        raise ValueError(f"{name}: expected rows of 19 numbers (id, fx, fy, cx, cy, k1, k2, 3x4 world-to-camera), "
                         f"got an array of shape {tuple(rows.shape)}")
    if not torch.isfinite(rows).all():
        raise ValueError(f"{name}: the poses contain NaN or infinite numbers")
    return rows


def w2c_from_rows(rows, name: str = "poses") -> torch.Tensor:
    rows = check_pose_rows(rows, name)
    w2c = rows[:, 7:].reshape(-1, 3, 4)
    bottom = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]], dtype=w2c.dtype).expand(w2c.shape[0], 1, 4)
    return torch.cat([w2c, bottom], dim=1)


def pose_lerp(c2w: torch.Tensor, count: int) -> torch.Tensor:
    """`count` poses evenly spread over the trajectory: element-wise lerp of neighbouring 4x4 matrices
    at positions linspace(0, N-1, count) (the official camera_pose_lerp; no rotation slerp)."""
    weights = torch.linspace(0, c2w.shape[0] - 1, count, dtype=c2w.dtype)
    left, right = weights.floor().long(), weights.ceil().long()
    return torch.lerp(c2w[left], c2w[right], weights[:, None, None].frac())


def resample_trajectory(w2c: torch.Tensor, frames: int = 16, extract_ratio: float = 1.0) -> torch.Tensor:
    """The demo's trajectory resampling: (N, 4, 4) world-to-camera (float64) -> (frames, 4, 4).

    round(frames / extract_ratio) poses are interpolated along the whole file and the first `frames`
    kept: ratio 1 spans the file, 0.1 (the demo's default) its first ~10 %."""
    if not 0 < extract_ratio <= 1:
        raise ValueError(f"trace_extract_ratio must be in (0, 1], got {extract_ratio}")
    count = round(frames / extract_ratio)
    c2w = torch.linalg.inv(w2c.double())
    return torch.linalg.inv(pose_lerp(c2w, count)[:frames])


def intrinsics(height: int, width: int, resized_hw: Optional[Sequence[int]] = None, frames: int = 16,
               batch: int = 1) -> torch.Tensor:
    """(batch, frames, 3, 3) pixel intrinsics of a height x width video (float32): focal length half the
    longer side of the resized image before the centre crop (`resized_hw`, default the video size,
    i.e. a 90 degree field of view), principal point at the centre."""
    rh, rw = resized_hw or (height, width)
    f = 0.5 * max(rh, rw)
    k = torch.tensor([[f, 0.0, 0.5 * width], [0.0, f, 0.5 * height], [0.0, 0.0, 1.0]], dtype=torch.float32)
    return k.expand(batch, frames, 3, 3).clone()


def pixel_intrinsics(normalised: torch.Tensor, resized_hw: Sequence[int],
                     top_left: Sequence[int] = (0, 0)) -> torch.Tensor:
    """(N, 3, 3) float32 pixel intrinsics of frames resized to `resized_hw` then cropped at `top_left`,
    from a pose file's normalised (N, 4) `fx fy cx cy` (fractions of the frame's width and height).
    Focal lengths scale with the resized size, as the official RealEstate10K loader does; the principal
    point follows the crop (the official loader places it at cx * crop width, which is the same for a
    centred principal point)."""
    n = torch.as_tensor(normalised, dtype=torch.float64)
    if n.ndim != 2 or n.shape[1] != 4 or not torch.isfinite(n).all() or (n[:, :2] <= 0).any():
        raise ValueError("normalised intrinsics must be finite rows 'fx fy cx cy' with fx, fy > 0 (fractions of the "
                         f"frame size, e.g. 0.5 0.5 0.5 0.5), got shape {tuple(n.shape)}")
    rh, rw = resized_hw
    top, left = top_left
    K = torch.zeros(n.shape[0], 3, 3, dtype=torch.float64)
    K[:, 0, 0], K[:, 1, 1] = n[:, 0] * rw, n[:, 1] * rh
    K[:, 0, 2], K[:, 1, 2] = n[:, 2] * rw - left, n[:, 3] * rh - top
    K[:, 2, 2] = 1.0
    return K.float()


# ------------------------------------------------------------------------------------ relative poses

def relative_c2w(w2c: torch.Tensor, trace_scale: float = 1.0, cond_frame: int = 0) -> torch.Tensor:
    """(b, T, 4, 4) world-to-camera -> camera-to-world relative to frame `cond_frame` (float32), with the
    translations scaled by `trace_scale`."""
    c2w = w2c.float().inverse()
    rel = c2w[:, cond_frame:cond_frame + 1].inverse() @ c2w
    rel[:, :, :3, 3] = rel[:, :, :3, 3] * trace_scale
    return rel


def pose_pairs(rel: torch.Tensor) -> torch.Tensor:
    """(b, T, 4, 4) c2w -> (b, T, T, 4, 4): [b, i, j] maps camera-i coordinates to camera-j coordinates."""
    return rearrange(rel.inverse(), "b t ... -> b 1 t ...") @ rearrange(rel, "b t ... -> b t 1 ...")


def perturb_zero_translations(t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Translations whose three components are all below 1e-6 in size become 1e-6 * noise (same shape
    as t): the diagonal pairs always, every pair of a pure rotation."""
    zero = (t.abs() < PERTURBATION).all(dim=-2, keepdim=True)
    return torch.where(zero, noise.to(t) * PERTURBATION, t)


def fundamental_matrices(K: torch.Tensor, R: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F = K^-T [t]x R K^-1 for every pair (K of the key frame j broadcast as in the official code)."""
    E = torch.cross(t, R, dim=-2)
    K_inv = torch.inverse(K)
    return K_inv.transpose(-1, -2) @ E @ K_inv


def epipolar_mask(F: torch.Tensor, height: int, width: int, d: int) -> torch.Tensor:
    """(b, T, T, 3, 3) fundamental matrices -> bool (b, T*h*w, T*h*w) with h, w = height//d, width//d:
    query (frame i, cell p) sees key (frame j, cell q) iff q lies within half a cell diagonal of the
    epipolar line of p in frame j. Built one query frame at a time (the (T, hw, hw) distances only)."""
    b, T = F.shape[:2]
    h, w = height // d, width // d
    y = torch.arange(0, h, dtype=torch.float, device=F.device) * d + d / 2.0 - 0.5
    x = torch.arange(0, w, dtype=torch.float, device=F.device) * d + d / 2.0 - 0.5
    gy, gx = torch.meshgrid(y, x, indexing="ij")
    grid = torch.stack([gx, gy, torch.ones_like(gx)], dim=2).view(-1, 3).float()
    rows = []
    for i in range(T):
        lines = F[:, i] @ grid.transpose(-1, -2)                       # (b, T, 3, hw)
        lines = lines / torch.norm(lines[..., :2, :], dim=-2, keepdim=True)
        dist = (lines.transpose(-1, -2) @ grid.transpose(-1, -2)).abs()   # (b, T, hw, hw)
        rows.append(rearrange(dist < (d * math.sqrt(2) / 2), "b t p q -> b p (t q)"))
    return torch.cat(rows, dim=1)


def plucker_rays(K: torch.Tensor, c2w: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Plücker embedding (b, 6, T, H, W) = [o x d, d] of every pixel's ray (float32)."""
    b, T = K.shape[:2]
    dt, dev = c2w.dtype, c2w.device
    j, i = torch.meshgrid(torch.linspace(0, height - 1, height, device=dev, dtype=dt),
                          torch.linspace(0, width - 1, width, device=dev, dtype=dt), indexing="ij")
    i = i.reshape(1, 1, -1).expand(b, T, -1) + 0.5
    j = j.reshape(1, 1, -1).expand(b, T, -1) + 0.5
    fx, fy = K[..., 0, 0].unsqueeze(-1), K[..., 1, 1].unsqueeze(-1)
    cx, cy = K[..., 0, 2].unsqueeze(-1), K[..., 1, 2].unsqueeze(-1)
    zs = torch.ones_like(i)
    xs = (i - cx) / fx * zs
    ys = (j - cy) / fy * zs
    directions = torch.stack((xs, ys, zs.expand_as(ys)), dim=-1)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    rays_d = directions @ c2w[..., :3, :3].transpose(-1, -2)
    rays_o = c2w[..., :3, 3][:, :, None].expand_as(rays_d)
    plucker = torch.cat([torch.cross(rays_o, rays_d, dim=-1), rays_d], dim=-1)
    return rearrange(plucker.reshape(b, T, height, width, 6), "b f h w c -> b c f h w")


def check_camera(RT: torch.Tensor, K: torch.Tensor) -> None:
    if not isinstance(RT, torch.Tensor) or RT.ndim != 4 or tuple(RT.shape[-2:]) != (4, 4):
        raise ValueError(f"RT must be (b, T, 4, 4) world-to-camera matrices, got "
                         f"{tuple(RT.shape) if isinstance(RT, torch.Tensor) else type(RT).__name__}")
    if not isinstance(K, torch.Tensor) or K.ndim != 4 or tuple(K.shape[-2:]) != (3, 3) or K.shape[:2] != RT.shape[:2]:
        raise ValueError(f"K must be (b, T, 3, 3) pixel intrinsics matching RT {tuple(RT.shape[:2])}, got "
                         f"{tuple(K.shape) if isinstance(K, torch.Tensor) else type(K).__name__}")
    if not (torch.isfinite(RT).all() and torch.isfinite(K).all()):
        raise ValueError("the camera poses or intrinsics contain NaN or infinite numbers")


# ------------------------------------------------------------------------------------ presets and simple moves

_PRESET_FILE = Path(__file__).with_name("camera_presets.json")


def _presets() -> dict:
    import json
    return json.loads(_PRESET_FILE.read_text())["presets"]


PRESET_NAMES = ("zoom in", "zoom out", "pan up", "pan down", "pan left", "pan right", "look up", "look down",
                "look left", "look right", "orbit up", "orbit left", "orbit right", "rotate clockwise",
                "rotate anti-clockwise", "stationary")


def preset_poses(name: str) -> torch.Tensor:
    """The official demo's trajectory `name` (PRESET_NAMES) as (N, 4, 4) float64 world-to-camera matrices,
    the same numbers as its pose file (demo/camera_pose_files/<name>.txt)."""
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown camera preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")
    rows = torch.tensor(_presets()[name], dtype=torch.float64)
    bottom = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]], dtype=torch.float64).expand(rows.shape[0], 1, 4)
    return torch.cat([rows.reshape(-1, 3, 4), bottom], dim=1)


def simple_trajectory(frames: int = 16, pan: tuple = (0.0, 0.0), zoom: float = 0.0, orbit: float = 0.0,
                      radius: float = 3.0) -> torch.Tensor:
    """(frames, 4, 4) float64 world-to-camera poses of a simple move, linear in time from the first frame
    (OpenCV axes: x right, y down, z forward): the camera orbits by `orbit` degrees about the vertical axis
    through a point `radius` ahead (positive: to the left, as "orbit left"), then moves `pan` = (right, down)
    and `zoom` (forward) units in its own frame over the clip (the presets move about 1 unit, radius 3)."""
    for name, value in (("pan", pan[0]), ("pan", pan[1]), ("zoom", zoom), ("orbit", orbit), ("radius", radius)):
        if not math.isfinite(float(value)):
            raise ValueError(f"camera {name} must be a finite number, got {value!r}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    s = torch.linspace(0, 1, frames, dtype=torch.float64)
    angle = -math.radians(orbit) * s
    c, n = torch.cos(angle), torch.sin(angle)
    R = torch.zeros(frames, 3, 3, dtype=torch.float64)
    R[:, 0, 0], R[:, 0, 2], R[:, 1, 1], R[:, 2, 0], R[:, 2, 2] = c, n, 1.0, -n, c
    centre = torch.tensor([0.0, 0.0, radius], dtype=torch.float64)
    position = centre - R @ centre
    move = torch.stack([pan[0] * s, pan[1] * s, zoom * s], dim=-1)
    position = position + (R @ move[..., None])[..., 0]
    c2w = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    c2w[:, :3, :3], c2w[:, :3, 3] = R, position
    return torch.linalg.inv(c2w)


def trajectory(camera, frames: int = 16, extract_ratio: float = 1.0) -> torch.Tensor:
    """(1, frames, 4, 4) float64 world-to-camera poses from a preset name, a pose file path, or (N, 4, 4)
    world-to-camera matrices, resampled as the official demo does (`resample_trajectory`)."""
    if isinstance(camera, str) and camera in PRESET_NAMES:
        w2c = preset_poses(camera)
    elif isinstance(camera, (str, Path)):
        if not Path(camera).is_file():
            raise ValueError(f"camera {str(camera)!r} is neither a preset ({', '.join(PRESET_NAMES)}) nor a pose file")
        w2c = read_pose_file(camera)
    elif isinstance(camera, torch.Tensor) and camera.ndim == 3 and tuple(camera.shape[1:]) == (4, 4):
        w2c = camera.double()
    else:
        raise ValueError("camera must be a preset name, a pose file or (N, 4, 4) world-to-camera matrices")
    return resample_trajectory(w2c, frames, extract_ratio)[None]


def resized_size(image_hw, height: int, width: int) -> tuple:
    """The size the official demo resizes an image to before its centre crop to height x width (the
    focal length is half its longer side)."""
    h0, w0 = image_hw
    if w0 / h0 > width / height:
        return height, int(w0 * height / h0)
    return int(h0 * width / w0), width


def top_view(w2c: torch.Tensor, size: int = 256) -> torch.Tensor:
    """A (size, size, 3) float image in [0, 1] of the camera path seen from above (x right, z up the
    picture): one dot per pose, from dark (first) to bright (last), with the viewing direction of the
    first and last pose drawn as short lines."""
    c2w = torch.linalg.inv(w2c.double().reshape(-1, 4, 4))
    pos = c2w[:, [0, 2], 3]
    fwd = c2w[:, [0, 2], 2]
    span = float((pos.max(0).values - pos.min(0).values).max()) or 1.0
    centre = (pos.max(0).values + pos.min(0).values) / 2
    to_px = lambda p: ((p - centre) / span * 0.7 * size + size / 2)   # noqa: E731
    img = torch.full((size, size, 3), 0.12)
    n = pos.shape[0]
    for k in range(n):
        x, z = to_px(pos[k]).tolist()
        tone = 0.35 + 0.65 * k / max(1, n - 1)
        r0, c0 = int(size - 1 - z), int(x)
        img[max(0, r0 - 2):r0 + 3, max(0, c0 - 2):c0 + 3] = torch.tensor([tone, 0.6 * tone, 0.2])
    for k in (0, n - 1):
        for step in range(1, 15):
            x, z = to_px(pos[k] + fwd[k] * span * 0.02 * step).tolist()
            r, c = int(size - 1 - z), int(x)
            if 0 <= r < size and 0 <= c < size:
                img[r, c] = torch.tensor([0.3, 0.8, 1.0])
    return img
