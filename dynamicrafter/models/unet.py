"""The DynamiCrafter / VideoCrafter 3D UNet (design §7), in the official key layout.

Everything works per frame on (b*T, C, h, w) except the temporal layers, which see
(b, C, T, h, w): the temporal convolution inside each ResBlock, the TemporalTransformers,
and `init_attn` right after the input convolution. Module and attribute names match the
official state dict (including the `temopral_conv` typo), so weights load with no renaming.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import RelativePosition, attention, relative_attention
from .camera import add_camera_modules, camera_branch
from ..config import QUERIES_PER_FRAME, TEXT_CONTEXT_LEN, UNetConfig
from .ops import GroupNorm32, building_with, fusable, fused_linear  # noqa: F401  (GroupNorm32: the default float32 norm)
from .ops import layers as ops


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [cos | sin] (cos first), of integer timesteps or fs values."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mlp(dim_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(ops.Linear(dim_in, dim), nn.SiLU(), ops.Linear(dim, dim))


# ------------------------------------------------------------------------------------ attention

class CrossAttention(nn.Module):
    """Multi-head attention; with `image_kv`, the dual cross-attention of design §7:
    the first 77 context tokens (text) and the rest (image) are attended with separate
    key/value weights and separate softmaxes, and the image result is added (gated in the 256 model)."""

    def __init__(self, dim, context_dim=None, heads=8, dim_head=64, image_kv=False, gate=False,
                 temporal_length: Optional[int] = None):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = ops.Linear(dim, inner, bias=False)
        self.to_k = ops.Linear(context_dim, inner, bias=False)
        self.to_v = ops.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(ops.Linear(inner, dim), nn.Dropout(0.0))
        self.image_kv = image_kv
        if image_kv:
            self.to_k_ip = ops.Linear(context_dim, inner, bias=False)
            self.to_v_ip = ops.Linear(context_dim, inner, bias=False)
            if gate:
                self.alpha = nn.Parameter(torch.tensor(0.0))
        if temporal_length:   # VideoCrafter1: relative frame positions (temporal self-attention)
            self.relative_position_k = RelativePosition(dim_head, temporal_length)
            self.relative_position_v = RelativePosition(dim_head, temporal_length)

    fused = False   # speed.fuse_projections: projections of one input as one matrix product

    def forward(self, x, context=None):
        if context is None:     # self-attention (VideoCrafter1's temporal layers: with relative positions)
            qkv = self._project("qkv", x, self.to_q, self.to_k, self.to_v)
            if hasattr(self, "relative_position_k"):
                t = x.shape[1]
                out = relative_attention(*qkv, self.heads, self.relative_position_k(t), self.relative_position_v(t))
            else:
                out = attention(*qkv, self.heads)
            del qkv     # q, k, v freed before to_out (the peak of a block)
            return self.to_out(out)
        q = self.to_q(x)
        if not self.image_kv:
            return self.to_out(attention(q, *self._project("kv", context, self.to_k, self.to_v), self.heads))
        text, image = context[:, :TEXT_CONTEXT_LEN].contiguous(), context[:, TEXT_CONTEXT_LEN:].contiguous()
        out = attention(q, *self._project("kv", text, self.to_k, self.to_v), self.heads)
        out_ip = attention(q, *self._project("kv_ip", image, self.to_k_ip, self.to_v_ip), self.heads)
        if hasattr(self, "alpha"):
            out_ip = out_ip * (torch.tanh(self.alpha.to(out_ip)) + 1)
        out = out + out_ip      # rebinding frees the text-only sum's input before to_out (peak memory)
        return self.to_out(out)

    def _project(self, group: str, x, *layers) -> tuple:
        """Each layer applied to x; once fused, one product over their stacked weights (kept as
        the attribute fused_<group>)."""
        if self.fused and fusable(layers):
            return fused_linear(x, layers, self, "fused_" + group)
        return tuple(layer(x) for layer in layers)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = ops.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), ops.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention (or a second self-attention), GEGLU feed-forward."""

    def __init__(self, dim, heads, dim_head, context_dim=None, image_kv=False, gate=False, temporal_length=None):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, temporal_length=temporal_length)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, image_kv=image_kv, gate=gate,
                                    temporal_length=temporal_length)
        self.norm1, self.norm2, self.norm3 = ops.LayerNorm(dim), ops.LayerNorm(dim), ops.LayerNorm(dim)

    def forward(self, x, context=None, camera=None):
        if camera is not None:      # CamI2V: camera features enter beside the first temporal attention
            normed = self.norm1(x)
            x = camera_branch(self, normed, camera) + self.attn1(normed) + x
        else:
            x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + chunked(self.ff, self.norm3(x))


def chunked(fn, x: torch.Tensor, max_elements: int = 1 << 24) -> torch.Tensor:
    """Apply a token-wise `fn` in slices along the batch so its wide hidden layer stays small
    when no gradient is needed (same result, bounded peak memory)."""
    if torch.is_grad_enabled() or x.numel() * 8 <= max_elements or x.shape[0] == 1:
        return fn(x)
    step = max(1, max_elements // (8 * x[0].numel()))
    return torch.cat([fn(part) for part in x.split(step)])


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the h*w tokens of each frame; reads the text+image context."""

    def __init__(self, channels, heads, dim_head, depth=1, context_dim=None, use_linear=True,
                 image_kv=False, gate=False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = ops.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = ops.Linear(channels, inner) if use_linear else ops.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim, image_kv, gate) for _ in range(depth)])
        self.proj_out = ops.Linear(inner, channels) if use_linear else ops.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        _, _, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = rearrange(y, "n c h w -> n (h w) c").contiguous()
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.use_linear:
            y = self.proj_out(y)
        y = rearrange(y, "n (h w) c -> n c h w", h=h, w=w)
        if not self.use_linear:
            y = self.proj_out(y)
        return x + y


class TemporalTransformer(nn.Module):
    """Self-attention along time at every pixel: both attn1 and attn2 attend over the T frames
    (with relative frame positions up to +-temporal_length when given: VideoCrafter1).
    GroupNorm statistics are taken over (C/32, T, h, w) of each video."""

    def __init__(self, channels, heads, dim_head, depth=1, use_linear=True, temporal_length=None):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = ops.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = ops.Linear(channels, inner) if use_linear else ops.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, temporal_length=temporal_length) for _ in range(depth)])
        self.proj_out = ops.Linear(inner, channels) if use_linear else ops.Conv1d(inner, channels, 1)

    camera_level = None     # CamI2V: which pose-encoder level this transformer reads (set by the UNet)

    def forward(self, x, camera=None):  # x: (b, C, T, h, w)
        b, _, t, h, w = x.shape
        y = self.norm(x)
        # contiguous token layouts: a Linear on a strided 3-D view becomes a weight-broadcast bmm
        if self.use_linear:
            y = self.proj_in(rearrange(y, "b c t h w -> (b h w) t c").contiguous())
        else:
            y = rearrange(self.proj_in(rearrange(y, "b c t h w -> (b h w) c t").contiguous()), "n c t -> n t c")
        cam = None
        if camera is not None and self.camera_level is not None:
            features = rearrange(expand_batch(camera.pose_features[self.camera_level], b), "b c f h w -> (b h w) f c")
            mask = camera.mask_for(h)
            cam = (features.to(y.dtype), None if mask is None else expand_batch(mask, b), h, w)
        for block in self.transformer_blocks:
            y = block(y, camera=cam if hasattr(block, "pluker_projection") else None)
        if self.use_linear:
            y = rearrange(self.proj_out(y), "(b h w) t c -> b c t h w", b=b, h=h, w=w)
        else:
            y = rearrange(self.proj_out(rearrange(y, "n t c -> n c t")), "(b h w) c t -> b c t h w", b=b, h=h, w=w)
        return x + y


# ------------------------------------------------------------------------------------ conv blocks

class TemporalConvBlock(nn.Module):
    """Four (GroupNorm, SiLU, [Dropout], Conv3d (3,1,1)) stages along time, added to the input."""

    def __init__(self, channels, dropout=0.0):
        super().__init__()

        def conv():
            return ops.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0))

        self.conv1 = nn.Sequential(ops.GroupNorm(32, channels), nn.SiLU(), conv())
        self.conv2 = nn.Sequential(ops.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout), conv())
        self.conv3 = nn.Sequential(ops.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout), conv())
        self.conv4 = nn.Sequential(ops.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout), conv())

    def forward(self, x):  # (b, C, T, h, w)
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels, temporal_conv=True, dropout=0.0):
        super().__init__()
        self.in_layers = nn.Sequential(ops.GroupNorm32(32, channels), nn.SiLU(),
                                       ops.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(ops.GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        ops.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else ops.Conv2d(channels, out_channels, 1))
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels, dropout=0.1)

    def forward(self, x, emb, frames: Optional[int]):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if frames and hasattr(self, "temopral_conv"):
            h = rearrange(h, "(b t) c h w -> b c t h w", t=frames)
            h = rearrange(self.temopral_conv(h), "b c t h w -> (b t) c h w")
        return h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = ops.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


SLICE_ELEMENTS = 1 << 24   # inference: a block whose input is larger runs a few videos at a time


def expand_batch(x: torch.Tensor, n: int) -> torch.Tensor:
    """Repeat rows shared by every guidance branch (branch-major) up to n rows (in x's memory
    layout: a channels-last activation stays channels-last)."""
    return x if x.shape[0] == n else torch.cat([x] * (n // x.shape[0]))


def _shared_rows(t: torch.Tensor, i: int, step: int, n: int) -> torch.Tensor:
    """Rows i..i+step of `t` broadcast branch-major to n rows, without materialising the broadcast
    when the slice lies inside one copy."""
    j = i % t.shape[0]
    return t[j:j + step] if j + step <= t.shape[0] else expand_batch(t, n)[i:i + step]


class Block(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: routes each layer its inputs.
    `frames=None` bypasses every temporal layer (stage-1 text-to-image training).
    Without autograd, a large input is processed a few videos at a time (every layer works per
    frame or per video, so this is exact): batched guidance branches then need no more
    transient memory than one video does."""

    def forward(self, x, emb, context, frames: Optional[int], start: int = 0, stop: Optional[int] = None,
                skip: Optional[torch.Tensor] = None, camera=None):
        """Run layers [start:stop). `skip` (output blocks) is concatenated to x along channels,
        slice by slice, so the concatenation never exists for the whole batch at once."""
        layers = list(self)[start:stop]
        rows = frames or 1
        n = x.shape[0]
        size = x.numel() + (0 if skip is None else skip[0].numel() * n)
        if torch.is_grad_enabled() or n == rows or size <= SLICE_ELEMENTS or camera is not None:
            if skip is not None:
                x = torch.cat([x, expand_batch(skip, n)], dim=1)
            return self._run(layers, x, emb, context, frames, camera)
        step = max(1, (n // rows) * SLICE_ELEMENTS // size) * rows
        outs = []
        for i in range(0, n, step):
            xi = x[i:i + step] if skip is None else torch.cat([x[i:i + step], _shared_rows(skip, i, step, n)], dim=1)
            outs.append(self._run(layers, xi, emb[i:i + step], context[i:i + step], frames))
        return torch.cat(outs)

    @staticmethod
    def _run(layers, x, emb, context, frames, camera=None):
        for layer in layers:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                if frames:
                    x = rearrange(layer(rearrange(x, "(b t) c h w -> b c t h w", t=frames), camera),
                                  "b c t h w -> (b t) c h w")
            else:
                x = layer(x)
        return x


# ------------------------------------------------------------------------------------ the UNet

class UNet3D(nn.Module):
    channels_last = False   # speed.use_channels_last: activations channels-last from the input conv on

    def __init__(self, cfg: UNetConfig, operations=None):
        """`operations`: where Linear / Conv / GroupNorm / LayerNorm come from (see `ops.py`);
        None keeps the namespace already active (torch.nn by default)."""
        super().__init__()
        with building_with(operations):
            self._build(cfg)

    def _build(self, cfg: UNetConfig):
        self.cfg = cfg
        mc, emb_dim, hc = cfg.model_channels, cfg.model_channels * 4, cfg.num_head_channels
        rel = cfg.temporal_length if cfg.relative_position else None
        self.time_embed = _mlp(mc, emb_dim)
        if cfg.fs_condition:
            self.fps_embedding = _mlp(mc, emb_dim)

        def res(cin, cout):
            return ResBlock(cin, emb_dim, cout, temporal_conv=cfg.temporal_conv)

        def transformers(ch, level):
            layers = [SpatialTransformer(ch, ch // hc, hc, cfg.transformer_depth, cfg.context_dim, cfg.use_linear,
                                         image_kv=cfg.image_cross_attention, gate=cfg.image_gate)]
            if cfg.temporal_attention:
                layers.append(TemporalTransformer(ch, ch // hc, hc, cfg.transformer_depth, cfg.use_linear, rel))
                if cfg.camera_modules:
                    self._camera_blocks(layers[-1], level, cfg.init_attn_heads * hc if cfg.addition_attention else None)
            return layers

        self.input_blocks = nn.ModuleList([Block(ops.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        if cfg.addition_attention:
            self.init_attn = Block(TemporalTransformer(mc, cfg.init_attn_heads, hc, cfg.transformer_depth,
                                                       use_linear=False, temporal_length=rel))
        skip_channels, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers += transformers(ch, level)
                self.input_blocks.append(Block(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                skip_channels.append(ch)
        self.middle_block = Block(res(ch, ch), *transformers(ch, len(cfg.channel_mult) - 1), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers += transformers(ch, level)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(*layers))
        self.out = nn.Sequential(ops.GroupNorm32(32, ch), nn.SiLU(), ops.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def _camera_blocks(self, transformer, level: int, init_width: Optional[int]) -> None:
        """CamI2V's rule (MODEL-SPEC-CAMI2V §6.2): camera modules in every temporal block whose width
        differs from init_attn's; the transformer reads pose-encoder level `level`."""
        transformer.camera_level = level
        for block in transformer.transformer_blocks:
            width = block.attn1.to_k.in_features
            if width != init_width:
                add_camera_modules(block, width, block.attn1.heads, self.cfg.camera_registers)

    def per_frame_context(self, context: torch.Tensor, frames: int) -> torch.Tensor:
        """(b, L, C) -> (b*T, L', C). With exactly 77 + 16*T tokens, frame f reads the text and
        its own 16 image tokens; otherwise every frame reads the whole context (design §7)."""
        if context.shape[1] == TEXT_CONTEXT_LEN + QUERIES_PER_FRAME * frames:
            text, image = context[:, :TEXT_CONTEXT_LEN], context[:, TEXT_CONTEXT_LEN:]
            text = text.repeat_interleave(frames, dim=0)
            image = rearrange(image, "b (t l) c -> (b t) l c", t=frames)
            return torch.cat([text, image], dim=1)
        return context.repeat_interleave(frames, dim=0)

    def forward(self, x, timesteps, context, fs=None, temporal: bool = True, camera=None):
        """x (b, Cin, T, h, w) with any concat latent already appended; timesteps (b,);
        context (k*b, L, C); fs (b,) or None for the default. Returns (k*b, Cout, T, h, w).

        k > 1 evaluates k contexts (guidance branches, branch-major) on the same x, t and fs:
        the layers before the first cross-attention run once and are shared.
        `camera`: a CamI2V CameraCondition (camera_model.py) of batch b or 1, shared by the k branches."""
        return self.forward_cut(x, timesteps, context, fs, temporal, camera=camera)[0]

    def forward_cut(self, x, timesteps, context, fs=None, temporal: bool = True,
                    depth: Optional[int] = None, deep: Optional[torch.Tensor] = None, camera=None):
        """`forward` cut after input block `depth` for step caching (step_cache.DeepCache):
        returns (output, deep features), the deep features being the input of output block
        L-1-depth (L output blocks; depth None: no cut, the input of the output head). With
        `deep` given, the input blocks past `depth`, the middle block and the output blocks
        before L-1-depth are skipped and `deep` stands for their result."""
        b, _, t, _, _ = x.shape
        if context.shape[0] % b:
            raise ValueError(f"context batch {context.shape[0]} is not a multiple of the latent batch {b}")
        emb = self.time_embed(timestep_embedding(timesteps.reshape(-1).expand(b), self.cfg.model_channels).to(x.dtype))
        if self.cfg.fs_condition:
            if fs is None:
                fs = torch.full((b,), self.cfg.default_fs, dtype=torch.long, device=x.device)
            fs_emb = self.fps_embedding(
                timestep_embedding(fs.reshape(-1).expand(b), self.cfg.model_channels).to(x.dtype))
            emb = emb + fs_emb
        emb = emb.repeat_interleave(t, dim=0)
        context = self.per_frame_context(context, t)
        n = context.shape[0]        # k*b*T rows once the branches part
        frames = t if temporal else None
        first_shallow = len(self.output_blocks) if depth is None else len(self.output_blocks) - 1 - depth
        inputs = self.input_blocks if deep is None else self.input_blocks[:depth + 1]

        h = rearrange(x, "b c t h w -> (b t) c h w")
        if self.channels_last:      # every convolution then keeps this layout
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for i, block in enumerate(inputs):
            if h.shape[0] == n:
                h = block(h, expand_batch(emb, n), context, frames, camera=camera)
            else:   # still shared: run up to the first cross-attention, then part the branches
                cut = next((j for j, layer in enumerate(block) if isinstance(layer, SpatialTransformer)), len(block))
                h = block(h, emb, context, frames, stop=cut, camera=camera)
                if cut < len(block):
                    emb, h = expand_batch(emb, n), expand_batch(h, n)
                    h = block(h, emb, context, frames, start=cut, camera=camera)
            if i == 0 and hasattr(self, "init_attn"):
                h = self.init_attn(h, emb, context, frames)
            skips.append(h)
        emb = expand_batch(emb, n)
        if deep is None:
            h = self.middle_block(expand_batch(h, n), emb, context, frames, camera=camera)
            for block in self.output_blocks[:first_shallow]:
                h = block(h, emb, context, frames, skip=skips.pop(), camera=camera)
            deep = h
        else:
            h = deep
        for block in self.output_blocks[first_shallow:]:
            h = block(h, emb, context, frames, skip=skips.pop(), camera=camera)
        return rearrange(self.out(h), "(b t) c h w -> b c t h w", t=t), deep


# ------------------------------------------------------------------------------------ training helpers

_TEMPORAL_MARKERS = ("temopral_conv.", "init_attn.")


def temporal_module_names(unet: UNet3D) -> set:
    return {name for name, m in unet.named_modules() if isinstance(m, (TemporalTransformer, TemporalConvBlock))}


def is_temporal_parameter(name: str, unet: Optional[UNet3D] = None) -> bool:
    """True for parameters of the temporal path: temporal convs, TemporalTransformers, init_attn.
    Names are relative to the UNet (an optional `model.diffusion_model.` prefix is ignored)."""
    name = name.removeprefix("model.diffusion_model.")
    if any(m in name for m in _TEMPORAL_MARKERS):
        return True
    if unet is None:
        raise ValueError("pass the UNet to classify transformer parameters")
    return any(name.startswith(m + ".") for m in temporal_module_names(unet))


def grow_input_channels(unet: UNet3D, in_channels: int) -> None:
    """Widen the input convolution (e.g. 4 -> 8 for the image-concat stage); the new input
    channels get zero weights so the network computes exactly what it did before."""
    conv = unet.input_blocks[0][0]
    if in_channels < conv.in_channels:
        raise ValueError(f"cannot shrink the input conv from {conv.in_channels} to {in_channels} channels")
    new = type(conv)(in_channels, conv.out_channels, 3, padding=1).to(conv.weight)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :conv.in_channels] = conv.weight
        new.bias.copy_(conv.bias)
    unet.input_blocks[0][0] = new
    unet.cfg = dataclasses.replace(unet.cfg, in_channels=in_channels)
