"""Correct parametrizations people write, each with the check its author would run on it.

Each :class:`Subject` is a parametrization as found in research code (low-rank factors with an SVD
right_inverse, Stiefel by QR, softplus-positive, softmax rows, unit-norm rows, Cholesky SPD, Toeplitz,
a hand-written power-iteration spectral norm, a torch-style module with a buffer, a tanh interval,
weight norm's ``(g, v)``, the tutorial's Symmetric) and the arguments of ``check_parametrization``
a user would pass: the inputs it is defined on, its constraint, its image. ``new_kwargs`` are
arguments the kit gained with issue 16 (``batched=``); they are passed only to a kit that takes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from pfunc.testing import constraints as C
from pfunc.testing import strategies as S

__all__ = ["Subject", "SUBJECTS", "subject"]


@dataclass(frozen=True)
class Subject:
    """A correct parametrization (``make()`` builds it) and how its author checks it."""

    name: str
    make: Callable[[], Any]
    kwargs: Callable[[], dict] = dict
    new_kwargs: dict = field(default_factory=dict)


# ---------------------------------------------------------------------- the parametrizations
class LowRank:
    """``(A, B) -> A @ B`` with ``A (n, r)``, ``B (r, m)``; right_inverse splits the top ``r`` singular triplets."""

    def __init__(self, rank: int = 2):
        self.rank = rank

    def forward(self, A: Tensor, B: Tensor) -> Tensor:
        return A @ B

    __call__ = forward

    def right_inverse(self, W: Tensor) -> tuple[Tensor, Tensor]:
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        root = s[..., : self.rank].sqrt()
        return U[..., : self.rank] * root.unsqueeze(-2), root.unsqueeze(-1) * Vh[..., : self.rank, :]


class StiefelQR:
    """Orthonormal columns: the Q of ``X = QR`` with the signs fixed so that ``diag(R) >= 0`` (QR is then unique)."""

    def forward(self, X: Tensor) -> Tensor:
        Q, R = torch.linalg.qr(X)
        d = R.diagonal(dim1=-2, dim2=-1)
        return Q * torch.where(d < 0, -1.0, 1.0).to(Q.dtype).unsqueeze(-2)

    __call__ = forward

    def right_inverse(self, Q: Tensor) -> Tensor:
        return Q


class SoftplusPositive:
    """``softplus(X)``, kept above the dtype's smallest normal number; right_inverse ``Y + log(-expm1(-Y))``."""

    def forward(self, X: Tensor) -> Tensor:
        return F.softplus(X).clamp_min(torch.finfo(X.dtype).tiny)

    __call__ = forward

    def right_inverse(self, Y: Tensor) -> Tensor:
        return Y + torch.log(-torch.expm1(-Y))


class SoftmaxRows:
    """Rows on the probability simplex: ``softmax(X, dim=-1)`` written out, with the max subtracted."""

    def forward(self, X: Tensor) -> Tensor:
        e = torch.exp(X - X.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True)

    __call__ = forward

    def right_inverse(self, Y: Tensor) -> Tensor:
        return torch.log(Y)


class UnitNormRows:
    """Rows of unit 2-norm: ``X / max(||X_i||, eps)`` (a zero row stays zero: the one singular point)."""

    def forward(self, X: Tensor) -> Tensor:
        return X / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(1e-12)

    __call__ = forward

    def right_inverse(self, Y: Tensor) -> Tensor:
        return Y


def _inverse_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


class CholeskySPD:
    """SPD matrices ``L L^T``, ``L`` lower triangular with a softplus (positive) diagonal."""

    def forward(self, X: Tensor) -> Tensor:
        L = X.tril(-1) + torch.diag_embed(F.softplus(X.diagonal(dim1=-2, dim2=-1)))
        return L @ L.mT

    __call__ = forward

    def right_inverse(self, Y: Tensor) -> Tensor:
        L = torch.linalg.cholesky(Y)
        return L.tril(-1) + torch.diag_embed(_inverse_softplus(L.diagonal(dim1=-2, dim2=-1)))


class Toeplitz:
    """``c`` of length ``2n - 1`` -> the ``n x n`` Toeplitz matrix ``T[i, j] = c[n - 1 + i - j]`` (changes shape)."""

    @staticmethod
    def index(n: int, device: Any = None) -> Tensor:
        i = torch.arange(n, device=device)
        return n - 1 + i.unsqueeze(-1) - i

    def forward(self, c: Tensor) -> Tensor:
        n = (c.shape[-1] + 1) // 2
        return c[..., self.index(n, c.device)]

    __call__ = forward

    def right_inverse(self, T: Tensor) -> Tensor:
        return torch.cat([T[..., 0, :].flip(-1), T[..., 1:, 0]], dim=-1)


def is_toeplitz(T: Tensor) -> bool:
    return bool(T.ndim >= 2 and torch.equal(T[..., 1:, 1:], T[..., :-1, :-1]))


def _normalize(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


class PowerIterationSpectralNorm:
    """A hand-written stateful spectral norm (Miyato et al.): ``W / (u^T W v)``, ``(u, v)`` refined by one
    power-iteration step per training call (without gradient, as torch's); eval uses them as they are."""

    def init_state(self, W: Tensor, *, generator: torch.Generator) -> dict[str, Tensor]:
        u = _normalize(torch.randn(W.shape[0], generator=generator, dtype=W.dtype))
        return {"u": u, "v": _normalize(W.mT @ u)}

    def forward(self, W: Tensor, state: dict[str, Tensor], *, training: bool) -> tuple[Tensor, dict[str, Tensor]]:
        u, v = state["u"], state["v"]
        if training:
            with torch.no_grad():
                v = _normalize(W.mT @ u)
                u = _normalize(W @ v)
        sigma = u @ W @ v
        return W / sigma, {"u": u, "v": v}


class TorchStyleSpectralNorm(nn.Module):
    """A torch-style module (as written for ``torch.nn.utils.parametrize``) with buffers ``_u``, ``_v``,
    refined in place in training mode only, as ``torch.nn.utils.parametrizations.spectral_norm``."""

    def __init__(self, rows: int, cols: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("_u", _normalize(torch.randn(rows, generator=g, dtype=torch.float64)))
        self.register_buffer("_v", _normalize(torch.randn(cols, generator=g, dtype=torch.float64)))

    def forward(self, W: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self._v.copy_(_normalize(W.mT @ self._u))
                self._u.copy_(_normalize(W @ self._v))
        return W / (self._u @ W @ self._v)


class Interval:
    """``low + (high - low) * (tanh(X) + 1) / 2``: values in the open interval ``(low, high)``."""

    def __init__(self, low: float = -1.0, high: float = 3.0):
        self.low, self.high = low, high

    def forward(self, X: Tensor) -> Tensor:
        return self.low + (self.high - self.low) * (torch.tanh(X) + 1) / 2

    __call__ = forward

    def right_inverse(self, Y: Tensor) -> Tensor:
        return torch.atanh(2 * (Y - self.low) / (self.high - self.low) - 1)


class WeightNormRows:
    """Weight norm (Salimans & Kingma) per output channel: ``(g, v) -> g * v / ||v_i||``, ``g (n, 1, 1)``,
    ``v (n, k, k)`` (a conv kernel's view)."""

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return g * v / torch.linalg.vector_norm(v.reshape(v.shape[0], -1), dim=1).reshape(g.shape)

    __call__ = forward

    def right_inverse(self, W: Tensor) -> tuple[Tensor, Tensor]:
        return torch.linalg.vector_norm(W.reshape(W.shape[0], -1), dim=1).reshape(W.shape[0], *([1] * (W.ndim - 1))), W


class TutorialSymmetric(nn.Module):
    """The ``torch.nn.utils.parametrize`` tutorial's Symmetric, batch-safe, with the API page's right_inverse."""

    def forward(self, X: Tensor) -> Tensor:
        return X.triu() + X.triu(1).transpose(-1, -2)

    def right_inverse(self, A: Tensor) -> Tensor:
        return A.triu()


# ---------------------------------------------------------------------- inputs a user would draw
def _away_from_zero(low: float = 0.5, high: float = 4.0) -> st.SearchStrategy[float]:
    return st.floats(low, high) | st.floats(-high, -low)


def _simplex_rows(Y: Tensor) -> Tensor:
    return (Y > 0).all() & ((Y.sum(-1) - 1).abs() < 1e-6).all()


def _unit_rows(Y: Tensor) -> Tensor:
    return ((torch.linalg.vector_norm(Y, dim=-1) - 1).abs() < 1e-6).all()


def _weight_norm_inputs() -> st.SearchStrategy[tuple[Tensor, Tensor]]:
    return st.integers(1, 3).flatmap(
        lambda n: st.tuples(
            S.tensors((n, 1, 1), elements_strategy=_away_from_zero()),
            S.tensors((n, 2, 2), elements_strategy=_away_from_zero()),
        )
    )


SUBJECTS: list[Subject] = [
    Subject(
        "LowRank",
        LowRank,
        lambda: dict(
            inputs=st.tuples(S.tensors((4, 2)), S.tensors((2, 3))),
            image=S.low_rank_matrices(4, 3, rank=2),
            constraint=C.predicate(lambda W: bool(torch.linalg.matrix_rank(W) <= 2), "rank <= 2"),
        ),
    ),
    Subject(
        "StiefelQR",
        StiefelQR,
        lambda: dict(
            inputs=S.well_conditioned_matrices(4, 2, batch_shape=S.batch_shapes(1, 2)),  # QR's gradient needs full rank
            image=S.orthogonal_matrices(4, 2, batch_shape=S.batch_shapes(1, 2)),
            constraint=C.orthogonal(),
        ),
    ),
    Subject(
        "SoftplusPositive",
        SoftplusPositive,
        lambda: dict(inputs=S.tensors(S.shapes(0, 2)), constraint=C.positive()),
    ),
    Subject(
        "SoftmaxRows",
        SoftmaxRows,
        lambda: dict(inputs=S.matrices(), constraint=C.predicate(_simplex_rows, "rows on the simplex")),
        new_kwargs=dict(batched=True),
    ),
    Subject(
        "UnitNormRows",
        UnitNormRows,
        lambda: dict(
            inputs=S.matrices(elements_strategy=_away_from_zero()), constraint=C.predicate(_unit_rows, "unit-norm rows")
        ),
        new_kwargs=dict(batched=True),
    ),
    Subject(
        "CholeskySPD",
        CholeskySPD,
        lambda: dict(
            inputs=S.square_matrices(batch_shape=S.batch_shapes(1, 2), min_value=-2.0, max_value=2.0),
            image=S.spd_matrices(batch_shape=S.batch_shapes(1, 2)),
            constraint=C.spd(),
        ),
    ),
    Subject(
        "Toeplitz",
        Toeplitz,
        lambda: dict(
            inputs=S.tensors(st.integers(1, 4).map(lambda n: (2 * n - 1,))),
            constraint=C.predicate(is_toeplitz, "Toeplitz"),
            unsafe=True,
        ),
    ),
    Subject(
        "PowerIterationSpectralNorm",
        PowerIterationSpectralNorm,
        lambda: dict(
            inputs=S.spectral_gap_matrices(),
            warmup=30,
            constraint=C.unit_spectral_norm(),
            converges_to=lambda W: W / torch.linalg.matrix_norm(W, ord=2),
        ),
    ),
    Subject(
        "TorchStyleSpectralNorm",
        lambda: TorchStyleSpectralNorm(3, 4),
        lambda: dict(
            inputs=S.spectral_gap_matrices(3, 4),
            warmup=30,
            constraint=C.unit_spectral_norm(),
            converges_to=lambda W: W / torch.linalg.matrix_norm(W, ord=2),
        ),
    ),
    Subject(
        "Interval",
        Interval,
        lambda: dict(inputs=S.tensors(S.shapes(0, 2), min_value=-4.0, max_value=4.0), constraint=C.in_interval(-1.0, 3.0)),
    ),
    Subject("WeightNormRows", WeightNormRows, lambda: dict(inputs=_weight_norm_inputs())),
    Subject(
        "TutorialSymmetric",
        TutorialSymmetric,
        lambda: dict(inputs=S.square_matrices(), image=S.symmetric_matrices(), constraint=C.symmetric()),
        new_kwargs=dict(batched=True),
    ),
]


def subject(name: str) -> Subject:
    """The subject called ``name``."""
    return next(s for s in SUBJECTS if s.name == name)
