"""Normalising parametrizations: spectral norm (torch's and BigGAN's), weight norm, weight standardisation.

>>> import torch
>>> sn = SpectralNorm()
>>> W = torch.randn(6, 4)
>>> state = sn.init_state(W, generator=torch.Generator().manual_seed(0))
>>> Wn, state = sn.forward(W, state, training=True)
>>> round(float(torch.linalg.matrix_norm(Wn, ord=2)), 3)
1.0
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

from .. import power
from .._vmap import is_vmapped
from ..sampling import normal

__all__ = ["SpectralNorm", "WeightNorm", "WeightStandardization"]

_TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class SpectralNorm:
    """``W -> W / sigma(W)`` with ``sigma`` the largest singular value, by power iteration.

    Two schemes, both pure and vmappable:

    * ``mode="torch"`` (default) is ``torch.nn.utils.parametrizations.spectral_norm``:
      ``W`` is reshaped to a matrix with ``dim`` first (``None``: 1 for
      ``ConvTranspose*d`` layers, else 0); state ``{"_u": (h,), "_v": (w,)}`` starts
      with 15 warm-up iterations; in training each call runs ``n_power_iterations``
      and returns the new vectors; in eval the stored ones are used as they are.
      A 1-D ``W`` is divided by its norm and has no state.
    * ``mode="biggan"`` (see :meth:`biggan`) is BigGAN's ``SN``: the top
      ``num_svs`` singular values by Gram-Schmidt, ``W`` viewed as
      ``(W.size(0), -1)`` and optionally transposed; state
      ``{"u": (num_svs, h), "sv": (num_svs,)}``, where ``sv`` logs the estimated
      singular values; ``u`` and ``sv`` change only in training.
    """

    def __init__(
        self,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
        dim: Optional[int] = None,
        *,
        mode: Literal["torch", "biggan"] = "torch",
        num_svs: int = 1,
        transpose: bool = False,
        warmup_iterations: int = 15,
    ):
        if not isinstance(n_power_iterations, int) or n_power_iterations <= 0:
            raise ValueError(
                f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}"
            )
        if mode not in ("torch", "biggan"):
            raise ValueError(f"SpectralNorm: mode must be 'torch' or 'biggan', got {mode!r}")
        if not isinstance(num_svs, int) or num_svs <= 0:
            raise ValueError(f"SpectralNorm: num_svs must be a positive int, got {num_svs!r}")
        if mode == "torch" and (num_svs != 1 or transpose):
            raise ValueError("SpectralNorm: num_svs and transpose are BigGAN options; use SpectralNorm.biggan(...)")
        if not eps > 0:
            raise ValueError(f"SpectralNorm: eps must be > 0, got {eps!r}")
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.dim = dim
        self.mode = mode
        self.num_svs = num_svs
        self.transpose = transpose
        self.warmup_iterations = warmup_iterations

    @classmethod
    def biggan(cls, num_svs: int = 1, num_itrs: int = 1, transpose: bool = False, eps: float = 1e-12) -> "SpectralNorm":
        """BigGAN's spectral norm (Brock et al.'s ``SN``): ``num_svs`` singular values, ``num_itrs`` iterations per call."""
        return cls(num_itrs, eps, 0, mode="biggan", num_svs=num_svs, transpose=transpose)

    def __repr__(self) -> str:
        if self.mode == "biggan":
            return (
                f"SpectralNorm.biggan(num_svs={self.num_svs}, num_itrs={self.n_power_iterations}, "
                f"transpose={self.transpose}, eps={self.eps})"
            )
        return f"SpectralNorm(n_power_iterations={self.n_power_iterations}, eps={self.eps}, dim={self.dim})"

    def _with_dim(self, dim: int) -> "SpectralNorm":
        return SpectralNorm(
            self.n_power_iterations, self.eps, dim, mode=self.mode, num_svs=self.num_svs,
            transpose=self.transpose, warmup_iterations=self.warmup_iterations,
        )

    def for_tensor(self, owner: nn.Module, name: str, value: Tensor) -> "SpectralNorm":
        """Resolve ``dim=None`` from the layer type and check it against ``value``."""
        dim = self.dim
        if dim is None:
            dim = 1 if isinstance(owner, _TRANSPOSED_CONVS) else 0
        ndim = value.ndim
        if ndim == 0:
            raise ValueError(f"SpectralNorm on '{name}': cannot normalise a 0-dim tensor")
        if dim >= ndim or dim < -ndim:
            raise IndexError(
                f"SpectralNorm on '{name}': Dimension out of range (expected to be in range of "
                f"[-{ndim}, {ndim - 1}] but got {dim})"
            )
        return self._with_dim(dim % ndim)

    # -- the matrix view --------------------------------------------------------------
    def matrix(self, W: Tensor) -> Tensor:
        """``W`` as the matrix whose spectral norm is taken."""
        if self.mode == "biggan":
            M = W.reshape(W.size(0), -1)
            return M.mT if self.transpose else M
        dim = (self.dim or 0) % W.ndim
        if dim != 0:
            W = W.permute(dim, *(d for d in range(W.ndim) if d != dim))
        return W if W.ndim == 2 else W.flatten(1)  # a matrix is its own view (no dispatch per call)

    # -- the protocol -----------------------------------------------------------------
    def init_state(self, W: Tensor, *, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        if W.ndim <= 1:
            return {}
        M = self.matrix(W.detach())
        h, w = M.shape
        if self.mode == "biggan":
            return {"u": normal((self.num_svs, h), M, generator), "sv": torch.ones(self.num_svs, dtype=M.dtype, device=M.device)}
        u = power.normalize(normal((h,), M, generator), self.eps)
        v = power.normalize(normal((w,), M, generator), self.eps)
        u, v = power.power_iteration(M, u, v, self.warmup_iterations, self.eps)
        return {"_u": u, "_v": v}

    def forward(self, W: Tensor, state: dict[str, Tensor], *, training: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        if W.ndim <= 1:
            return power.normalize(W, self.eps), state
        M = self.matrix(W)
        if self.mode == "biggan":
            us = state["u"]
            svs = None
            for _ in range(self.n_power_iterations):
                svs, new_us, _ = power.biggan_power_iteration(M, us, self.eps)
                if training:
                    us = new_us
            new_state = {"u": us, "sv": svs.detach()} if training else state
            return W / svs[0], new_state
        u, v = state["_u"], state["_v"]
        if training:
            u, v = power.power_iteration(M, u, v, self.n_power_iterations, self.eps)
            state = {"_u": u, "_v": v}
        return W / power.sigma(M, u, v), state

    def right_inverse(
        self, value: Tensor, state: dict[str, Tensor], *, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The value itself (as torch): any matrix is a valid original; the state is kept."""
        return value, state

    def singular_values(self, state: dict[str, Tensor]) -> Tensor:
        """The logged singular value estimates (BigGAN mode's ``sv``)."""
        if "sv" not in state:
            raise KeyError("singular_values: this state has no 'sv' (only SpectralNorm.biggan logs them)")
        return state["sv"]


class WeightNorm:
    """``(g, v) -> g * v / ||v||`` with the norm over every dim but ``dim`` (``None``: over all).

    As ``torch.nn.utils.parametrizations.weight_norm``: ``right_inverse(w)``
    returns ``(g, v) = (||w||, w)``, stored as ``original0`` and ``original1``.
    """

    def __init__(self, dim: Optional[int] = 0):
        self.dim = -1 if dim is None else dim

    def __repr__(self) -> str:
        return f"WeightNorm(dim={None if self.dim == -1 else self.dim})"

    def _norm(self, v: Tensor) -> Tensor:
        """``torch.norm_except_dim(v, 2, dim)``, written with ops that have vmap batching rules."""
        if self.dim == -1:
            return torch.linalg.vector_norm(v)
        dims = [d for d in range(v.ndim) if d != self.dim % v.ndim]
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()

    def forward(self, weight_g: Tensor, weight_v: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or is_vmapped(weight_v) or is_vmapped(weight_g):
            # torch's fused kernel has no vmap batching rule: the same maths in batchable ops
            # (compiled, inductor fuses them; dynamo would break the graph on the vmap check)
            return weight_v * (weight_g / self._norm(weight_v))
        # the fused kernel (as torch's weight_norm): one op forward and backward
        return torch._weight_norm(weight_v, weight_g, self.dim)

    __call__ = forward

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        return self._norm(weight), weight


class WeightStandardization:
    """``W -> (W - mean) / sqrt(var + eps)`` per output channel (dim 0), as the
    ``WeightStandardizedConv2d`` of denoising-diffusion-pytorch's Unet (biased variance).

    ``eps=None`` picks 1e-5 for float32 and 1e-3 otherwise, looking at the autocast
    dtype when autocast is on (the dtype the convolution will run in). No
    ``right_inverse``: registration keeps the raw weight as the original.
    """

    def __init__(self, eps: Optional[float] = None):
        self.eps = eps

    def __repr__(self) -> str:
        return f"WeightStandardization(eps={self.eps})"

    def _eps(self, W: Tensor) -> float:
        if self.eps is not None:
            return self.eps
        dtype = W.dtype
        if torch.is_autocast_enabled(W.device.type):
            dtype = torch.get_autocast_dtype(W.device.type)
        return 1e-5 if dtype == torch.float32 else 1e-3

    def forward(self, W: Tensor) -> Tensor:
        dims = tuple(range(1, W.ndim))
        var, mean = torch.var_mean(W, dim=dims, keepdim=True, correction=0)
        return (W - mean) * (var + self._eps(W)).rsqrt()

    __call__ = forward
