"""The DDPM Unet (Ho et al.), in denoising-diffusion-pytorch's two layouts, with plain
``nn.Conv2d`` where that code rewrites the layer.

Two layouts (:data:`LAYOUTS`), switchable per component for ablations:

- ``"classic"`` (releases up to 1.5): weight-standardized conv + GroupNorm in every
  :class:`Block`, LayerNorm before attention, linear attention's values divided by the
  number of pixels, linear attention at every level;
- ``"modern"`` (releases 2.x): plain conv + :class:`RMSNorm`, RMSNorm before attention,
  learned memory keys/values in every attention layer, unscaled values, full attention at
  the innermost level.

Every piece of it is here: sinusoidal and random-or-learned sinusoidal time
embeddings, :class:`Block` (conv -> GroupNorm -> optional scale/shift from the time
embedding -> SiLU), :class:`ResnetBlock` with its time MLP, :class:`LinearAttention`
and full :class:`Attention` behind :class:`PreNorm` and :class:`Residual`,
:func:`Downsample` (pixel unshuffle + 1x1 conv), :func:`Upsample` (nearest + 3x3
conv), skip connections, self-conditioning and learned variance.

Its ``WeightStandardizedConv2d`` is *not* a layer here: ``Block.proj`` is a
plain ``nn.Conv2d``, and :func:`parametrize_unet` puts pfunc's
``WeightStandardization`` on each of those weights. The module itself is never
changed; the standardization lives in the :class:`pfunc.Parametrized` value.

>>> import torch
>>> unet = Unet(dim=8, dim_mults=(1, 2), channels=1, resnet_block_groups=4, attn_heads=2, attn_dim_head=8)
>>> net = parametrize_unet(unet)
>>> params, state = net.init()
>>> x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 500.0])
>>> out, state = net(params, state, x, t, training=True)
>>> out.shape
torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pfunc as pf
from pfunc.parametrizations import WeightStandardization

__all__ = [
    "SinusoidalPosEmb",
    "RandomOrLearnedSinusoidalPosEmb",
    "Block",
    "ResnetBlock",
    "LayerNorm",
    "RMSNorm",
    "PreNorm",
    "Residual",
    "LinearAttention",
    "Attention",
    "Downsample",
    "Upsample",
    "Unet",
    "LAYOUTS",
    "BLOCK_NORMS",
    "ATTENTION_NORMS",
    "weight_standardization_spec",
    "parametrize_unet",
]


# ------------------------------------------------------------------------------ time embeddings
class SinusoidalPosEmb(nn.Module):
    """Transformer-style embedding of (diffusion) times: ``[B] -> [B, dim]``, sines then cosines."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"SinusoidalPosEmb: dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        half_dim = self.dim // 2
        scale = math.log(10000) / (half_dim - 1)
        freqs = torch.exp(torch.arange(half_dim, device=x.device, dtype=torch.float32) * -scale)
        emb = x.float()[:, None] * freqs[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class RandomOrLearnedSinusoidalPosEmb(nn.Module):
    """Random Fourier (``is_random``) or learned sinusoidal features of times: ``[B] -> [B, dim + 1]``.

    The output is ``[t, sin(2 pi t w), cos(2 pi t w)]`` for ``dim // 2`` frequencies ``w``.
    Learned frequencies are a parameter; random ones are a buffer (so they land in
    pfunc's ``state``, never in what the optimizer updates).
    """

    def __init__(self, dim: int, is_random: bool = False):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"RandomOrLearnedSinusoidalPosEmb: dim must be even and >= 2, got {dim}")
        weights = torch.randn(dim // 2)
        if is_random:
            self.register_buffer("weights", weights)
        else:
            self.weights = nn.Parameter(weights)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()[:, None]
        freqs = x * self.weights[None, :] * (2 * math.pi)
        return torch.cat((x, freqs.sin(), freqs.cos()), dim=-1)


# ------------------------------------------------------------------------------ blocks
class Block(nn.Module):
    """``conv3x3 -> norm -> x * (scale + 1) + shift (optional) -> SiLU``: ``[B, dim, H, W] -> [B, dim_out, H, W]``.

    ``norm`` is ``"groupnorm"`` (``groups`` groups; the classic layout) or ``"rmsnorm"``
    (:class:`RMSNorm`; the modern one). ``proj`` is a plain ``nn.Conv2d``; weight
    standardization is a pfunc parametrization on ``proj.weight`` (see
    :func:`weight_standardization_spec`).
    """

    def __init__(self, dim: int, dim_out: int, groups: int = 8, norm: str = "groupnorm"):
        super().__init__()
        if norm not in BLOCK_NORMS:
            raise ValueError(f"Block: norm must be 'groupnorm' or 'rmsnorm', got {norm!r}")
        if norm == "groupnorm" and dim_out % groups:
            raise ValueError(f"Block: dim_out={dim_out} is not divisible by groups={groups} (GroupNorm)")
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out) if norm == "groupnorm" else RMSNorm(dim_out)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, scale_shift: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    """Two :class:`Block` with a residual 1x1 conv; the time embedding gives the first one's scale and shift."""

    def __init__(self, dim: int, dim_out: int, *, time_emb_dim: Optional[int] = None, groups: int = 8, norm: str = "groupnorm"):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2)) if time_emb_dim is not None else None
        self.block1 = Block(dim, dim_out, groups=groups, norm=norm)
        self.block2 = Block(dim_out, dim_out, groups=groups, norm=norm)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, time_emb: Optional[Tensor] = None) -> Tensor:
        scale_shift = None
        if self.mlp is not None and time_emb is not None:
            emb = self.mlp(time_emb)[:, :, None, None]
            scale_shift = tuple(emb.chunk(2, dim=1))
        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


class LayerNorm(nn.Module):
    """Layer norm over the channel dimension of ``[B, C, H, W]`` with a learned gain (no bias), as denoising-diffusion-pytorch."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        return (x - mean) * (var + eps).rsqrt() * self.g


class RMSNorm(nn.Module):
    """``x / max(||x||, 1e-12) * sqrt(C) * g`` over the channels of ``[B, C, H, W]``, as denoising-diffusion-pytorch 2.x.

    Written with ``rsqrt`` of the summed squares rather than ``F.normalize`` (the same value to float32 rounding):
    forward and backward of a ``[64, 32, 16, 16]`` input take a quarter of the time on CPU.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim**0.5
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        inverse_norm = (x * x).sum(dim=1, keepdim=True).clamp_min(1e-24).rsqrt()
        return x * (inverse_norm * (self.g * self.scale))


#: The norms a :class:`Block` may use after its conv.
BLOCK_NORMS = ("groupnorm", "rmsnorm")
#: The per-channel norms before attention and after linear attention's output conv.
ATTENTION_NORMS = ("layernorm", "rmsnorm")


def _channel_norm(kind: str, dim: int) -> nn.Module:
    if kind not in ATTENTION_NORMS:
        raise ValueError(f"attention norm must be 'layernorm' or 'rmsnorm', got {kind!r}")
    return LayerNorm(dim) if kind == "layernorm" else RMSNorm(dim)


class PreNorm(nn.Module):
    """``fn(norm(x))``, ``norm`` a :class:`LayerNorm` (classic) or :class:`RMSNorm` (modern)."""

    def __init__(self, dim: int, fn: nn.Module, norm: str = "layernorm"):
        super().__init__()
        self.fn = fn
        self.norm = _channel_norm(norm, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


class Residual(nn.Module):
    """``fn(x) + x``."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.fn(x, *args, **kwargs) + x


def _heads(t: Tensor, heads: int) -> Tensor:
    """``[B, heads * d, H, W] -> [B, heads, d, H * W]``."""
    b, hd, h, w = t.shape
    return t.reshape(b, heads, hd // heads, h * w)


def _with_memory(t: Tensor, memory: Tensor, dim: int) -> Tensor:
    """``memory`` (``[heads, ...]``, learned) repeated over the batch and put before ``t``'s entries along ``dim``."""
    return torch.cat((memory.expand(t.shape[0], *memory.shape), t), dim=dim)


class LinearAttention(nn.Module):
    """Linear-cost attention over pixels (softmax over features for q, over positions for k).

    Classic (defaults): values divided by the number of pixels, a LayerNorm after the output
    conv. Modern: ``num_mem_kv`` learned key/value pairs per head (``mem_kv``,
    ``[2, heads, dim_head, num_mem_kv]``) attended with the pixels, unscaled values
    (``scale_values=False``), ``norm="rmsnorm"``.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, *, num_mem_kv: int = 0, scale_values: bool = True,
                 norm: str = "layernorm"):
        super().__init__()
        if num_mem_kv < 0:
            raise ValueError(f"LinearAttention: num_mem_kv must be >= 0, got {num_mem_kv}")
        self.scale = dim_head**-0.5
        self.heads = heads
        self.scale_values = scale_values
        hidden_dim = dim_head * heads
        self.mem_kv = nn.Parameter(torch.randn(2, heads, dim_head, num_mem_kv)) if num_mem_kv else None
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden_dim, dim, 1), _channel_norm(norm, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = (_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=1))
        if self.mem_kv is not None:
            k, v = _with_memory(k, self.mem_kv[0], -1), _with_memory(v, self.mem_kv[1], -1)
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        if self.scale_values:
            v = v / (h * w)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class Attention(nn.Module):
    """Full (quadratic) multi-head self-attention over pixels, used at the lowest resolution.

    ``num_mem_kv`` learned key/value pairs per head (``mem_kv``, ``[2, heads, num_mem_kv, dim_head]``)
    are attended with the pixels (the modern layout; 0 in the classic one).
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32, *, num_mem_kv: int = 0):
        super().__init__()
        if num_mem_kv < 0:
            raise ValueError(f"Attention: num_mem_kv must be >= 0, got {num_mem_kv}")
        self.scale = dim_head**-0.5
        self.heads = heads
        hidden_dim = dim_head * heads
        self.mem_kv = nn.Parameter(torch.randn(2, heads, num_mem_kv, dim_head)) if num_mem_kv else None
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = (_heads(t, self.heads) for t in self.to_qkv(x).chunk(3, dim=1))
        if self.mem_kv is not None:
            k, v = _with_memory(k, self.mem_kv[0].mT, -1), _with_memory(v, self.mem_kv[1].mT, -1)
        sim = torch.einsum("bhdi,bhdj->bhij", q * self.scale, k)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("bhij,bhdj->bhid", attn, v)  # [B, heads, H*W, d]
        out = out.permute(0, 1, 3, 2).reshape(b, -1, h, w)
        return self.to_out(out)


class _PixelUnshuffle(nn.Module):
    """``[B, C, H, W] -> [B, 4C, H/2, W/2]`` with channel order ``(c, p1, p2)``, einops' ``Rearrange`` in denoising-diffusion-pytorch."""

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x, 2)


def Downsample(dim: int, dim_out: Optional[int] = None) -> nn.Sequential:
    """Halve the resolution: pixel unshuffle (no information lost) then a 1x1 conv to ``dim_out``."""
    return nn.Sequential(_PixelUnshuffle(), nn.Conv2d(dim * 4, dim_out if dim_out is not None else dim, 1))


def Upsample(dim: int, dim_out: Optional[int] = None) -> nn.Sequential:
    """Double the resolution: nearest-neighbour upsampling then a 3x3 conv to ``dim_out``."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(dim, dim_out if dim_out is not None else dim, 3, padding=1),
    )


# ------------------------------------------------------------------------------ the Unet
class Unet(nn.Module):
    """The DDPM Unet of Ho et al. (as in denoising-diffusion-pytorch): ``forward(x [B, C, H, W], time [B], x_self_cond=None) -> [B, out_dim, H, W]``.

    ``dim_mults`` gives one resolution level each; all but the last halve the
    resolution, so ``H`` and ``W`` must be divisible by ``2 ** (len(dim_mults) - 1)``
    (:attr:`downsample_factor`). ``self_condition`` doubles the input channels (the
    previous estimate of ``x_0`` is concatenated, zeros when absent);
    ``learned_variance`` doubles the output channels. ``attn_heads`` and
    ``attn_dim_head`` size every attention layer (denoising-diffusion-pytorch: 4 and 32).

    The layout options (defaults: the classic layout; :data:`LAYOUTS` gives both):
    ``block_norm`` (``"groupnorm"`` or ``"rmsnorm"``, every :class:`Block`), ``attn_norm``
    (``"layernorm"`` or ``"rmsnorm"``, before and after attention), ``num_mem_kv`` (learned
    memory key/values per attention head), ``scale_linear_values`` (linear attention's values
    divided by the number of pixels) and ``full_attn_innermost`` (full instead of linear
    attention at the innermost level).
    """

    def __init__(
        self,
        dim: int,
        init_dim: Optional[int] = None,
        out_dim: Optional[int] = None,
        dim_mults: Sequence[int] = (1, 2, 4, 8),
        channels: int = 3,
        self_condition: bool = False,
        resnet_block_groups: int = 8,
        learned_variance: bool = False,
        learned_sinusoidal_cond: bool = False,
        random_fourier_features: bool = False,
        learned_sinusoidal_dim: int = 16,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        block_norm: str = "groupnorm",
        attn_norm: str = "layernorm",
        num_mem_kv: int = 0,
        scale_linear_values: bool = True,
        full_attn_innermost: bool = False,
    ):
        super().__init__()
        if block_norm not in BLOCK_NORMS:
            raise ValueError(f"Unet: block_norm must be 'groupnorm' or 'rmsnorm', got {block_norm!r}")
        if attn_norm not in ATTENTION_NORMS:
            raise ValueError(f"Unet: attn_norm must be 'layernorm' or 'rmsnorm', got {attn_norm!r}")
        if not isinstance(num_mem_kv, int) or isinstance(num_mem_kv, bool) or num_mem_kv < 0:
            raise ValueError(f"Unet: num_mem_kv must be a non-negative integer, got {num_mem_kv!r}")
        if dim < 1 or channels < 1 or not dim_mults or any(m < 1 for m in dim_mults):
            raise ValueError(f"Unet: need dim >= 1, channels >= 1 and positive dim_mults; got {dim}, {channels}, {tuple(dim_mults)}")
        self.channels = channels
        self.self_condition = self_condition
        self.learned_variance = learned_variance
        input_channels = channels * (2 if self_condition else 1)

        init_dim = init_dim if init_dim is not None else dim
        self.init_conv = nn.Conv2d(input_channels, init_dim, 7, padding=3)

        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))

        def block(d_in: int, d_out: int) -> ResnetBlock:
            return ResnetBlock(d_in, d_out, time_emb_dim=time_dim, groups=resnet_block_groups, norm=block_norm)

        # time embeddings
        time_dim = dim * 4
        self.random_or_learned_sinusoidal_cond = learned_sinusoidal_cond or random_fourier_features
        if self.random_or_learned_sinusoidal_cond:
            sinu_pos_emb: nn.Module = RandomOrLearnedSinusoidalPosEmb(learned_sinusoidal_dim, random_fourier_features)
            fourier_dim = learned_sinusoidal_dim + 1
        else:
            sinu_pos_emb = SinusoidalPosEmb(dim)
            fourier_dim = dim
        self.time_mlp = nn.Sequential(sinu_pos_emb, nn.Linear(fourier_dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))

        # layers
        def attn(d: int, full: bool) -> Residual:
            if full:
                return Residual(PreNorm(d, Attention(d, attn_heads, attn_dim_head, num_mem_kv=num_mem_kv), attn_norm))
            layer = LinearAttention(d, attn_heads, attn_dim_head, num_mem_kv=num_mem_kv, scale_values=scale_linear_values,
                                    norm=attn_norm)
            return Residual(PreNorm(d, layer, attn_norm))

        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])
        num_resolutions = len(in_out)
        for ind, (dim_in, dim_out) in enumerate(in_out):
            is_last = ind >= num_resolutions - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        block(dim_in, dim_in),
                        block(dim_in, dim_in),
                        attn(dim_in, full_attn_innermost and is_last),
                        Downsample(dim_in, dim_out) if not is_last else nn.Conv2d(dim_in, dim_out, 3, padding=1),
                    ]
                )
            )
        mid_dim = dims[-1]
        self.mid_block1 = block(mid_dim, mid_dim)
        self.mid_attn = attn(mid_dim, True)
        self.mid_block2 = block(mid_dim, mid_dim)
        for ind, (dim_in, dim_out) in enumerate(reversed(in_out)):
            is_last = ind == len(in_out) - 1
            self.ups.append(
                nn.ModuleList(
                    [
                        block(dim_out + dim_in, dim_out),
                        block(dim_out + dim_in, dim_out),
                        attn(dim_out, full_attn_innermost and ind == 0),
                        Upsample(dim_out, dim_in) if not is_last else nn.Conv2d(dim_out, dim_in, 3, padding=1),
                    ]
                )
            )

        default_out_dim = channels * (2 if learned_variance else 1)
        self.out_dim = out_dim if out_dim is not None else default_out_dim
        # denoising-diffusion-pytorch writes dim * 2 here, which is only right when init_dim == dim.
        self.final_res_block = block(init_dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, self.out_dim, 1)
        self.downsample_factor = 2 ** (len(dim_mults) - 1)

    def forward(self, x: Tensor, time: Tensor, x_self_cond: Optional[Tensor] = None) -> Tensor:
        if self.self_condition:
            if x_self_cond is None:
                x_self_cond = torch.zeros_like(x)
            x = torch.cat((x_self_cond, x), dim=1)
        x = self.init_conv(x)
        r = x.clone()
        t = self.time_mlp(time)

        h = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            h.append(x)
            x = block2(x, t)
            x = attn(x)
            h.append(x)
            x = downsample(x)

        x = self.mid_block1(x, t)
        x = self.mid_attn(x)
        x = self.mid_block2(x, t)

        for block1, block2, attn, upsample in self.ups:
            x = torch.cat((x, h.pop()), dim=1)
            x = block1(x, t)
            x = torch.cat((x, h.pop()), dim=1)
            x = block2(x, t)
            x = attn(x)
            x = upsample(x)

        x = torch.cat((x, r), dim=1)
        x = self.final_res_block(x, t)
        return self.final_conv(x)


#: The two layouts of denoising-diffusion-pytorch as :class:`Unet` options, with whether the Block convs are
#: weight-standardized (:func:`parametrize_unet`): ``"classic"`` as its releases up to 1.5, ``"modern"`` as 2.x.
LAYOUTS: dict[str, dict[str, object]] = {
    "classic": dict(block_norm="groupnorm", attn_norm="layernorm", num_mem_kv=0, scale_linear_values=True,
                    full_attn_innermost=False, weight_standardization=True),
    "modern": dict(block_norm="rmsnorm", attn_norm="rmsnorm", num_mem_kv=4, scale_linear_values=False,
                   full_attn_innermost=True, weight_standardization=False),
}


# ------------------------------------------------------------------------------ the parametrization
def weight_standardization_spec(module: nn.Module) -> dict[str, WeightStandardization]:
    """``{"<path>.proj.weight": WeightStandardization()}`` for every :class:`Block` in ``module``.

    This is denoising-diffusion-pytorch's ``WeightStandardizedConv2d`` without a new layer class: the same
    plain ``nn.Conv2d`` weights, standardized per output channel by a parametrization.
    """
    return {f"{name}.proj.weight" if name else "proj.weight": WeightStandardization() for name, m in module.named_modules() if isinstance(m, Block)}


def parametrize_unet(unet: Unet, weight_standardization: bool = True) -> pf.Parametrized:
    """``unet`` as a pfunc value: with :class:`~pfunc.parametrizations.WeightStandardization` on every Block conv
    (or, ``weight_standardization=False``, no parametrization: plain convs). The module is not modified."""
    return pf.parametrize(unet, weight_standardization_spec(unet) if weight_standardization else {})
