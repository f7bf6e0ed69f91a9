"""Matrix manifolds: symmetric, skew-symmetric, orthogonal and SPD matrices.

All act on the last two dims, so batches of matrices (and conv kernels, whose
last two dims are the spatial ones) work as with torch.

>>> import torch
>>> X = torch.randn(4, 4)
>>> S = Symmetric()(X); bool(torch.equal(S, S.mT))
True
>>> Q = Cayley()(Skew()(X)); bool(torch.allclose(Q.mT @ Q, torch.eye(4), atol=1e-5))
True
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ..sampling import normal

__all__ = ["Symmetric", "Skew", "Cayley", "MatrixExp", "SPD", "Orthogonal"]


def _require_square(X: Tensor, who: str) -> None:
    if X.ndim < 2 or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"{who} needs square matrices (last two dims equal); got shape {tuple(X.shape)}")


def _eye_like(X: Tensor) -> Tensor:
    return torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)


class Symmetric:
    """``X -> triu(X) + triu(X, 1)^T``: a symmetric matrix built from the upper triangle.

    ``right_inverse(A) = triu(A)``, so ``forward(right_inverse(A)) == A`` for symmetric ``A``.
    """

    def forward(self, X: Tensor) -> Tensor:
        _require_square(X, "Symmetric")
        return X.triu() + X.triu(1).mT

    __call__ = forward

    def right_inverse(self, A: Tensor) -> Tensor:
        _require_square(A, "Symmetric.right_inverse")
        return A.triu()

    def __repr__(self) -> str:
        return "Symmetric()"


class Skew:
    """``X -> triu(X, 1) - triu(X, 1)^T``: a skew-symmetric matrix from the strict upper triangle.

    ``right_inverse(A) = triu(A, 1)``, exact for skew-symmetric ``A``.
    """

    def forward(self, X: Tensor) -> Tensor:
        _require_square(X, "Skew")
        A = X.triu(1)
        return A - A.mT

    __call__ = forward

    def right_inverse(self, A: Tensor) -> Tensor:
        _require_square(A, "Skew.right_inverse")
        return A.triu(1)

    def __repr__(self) -> str:
        return "Skew()"


class Cayley:
    """The Cayley map ``X -> (I + X)^{-1} (I - X)``: skew-symmetric to orthogonal (det +1).

    The map is its own inverse, so ``right_inverse(Q) = (I + Q)^{-1} (I - Q)``,
    exact for orthogonal ``Q`` without eigenvalue -1 (chain it after :class:`Skew`).
    """

    def forward(self, X: Tensor) -> Tensor:
        _require_square(X, "Cayley")
        Id = _eye_like(X)
        return torch.linalg.solve(Id + X, Id - X)

    __call__ = forward

    def right_inverse(self, Q: Tensor) -> Tensor:
        return self.forward(Q)

    def __repr__(self) -> str:
        return "Cayley()"


class MatrixExp:
    """``X -> exp(X)`` (``torch.linalg.matrix_exp``): skew to orthogonal, symmetric to SPD.

    No ``right_inverse`` (the matrix logarithm is not unique): at registration it
    is the identity, and assigning through it is an error; use :class:`SPD` to
    assign SPD values.
    """

    def forward(self, X: Tensor) -> Tensor:
        _require_square(X, "MatrixExp")
        return torch.linalg.matrix_exp(X)

    __call__ = forward

    def __repr__(self) -> str:
        return "MatrixExp()"


class SPD:
    """Symmetric positive definite matrices: ``X -> exp(triu(X) + triu(X, 1)^T)``.

    ``right_inverse(A) = triu(log(A))``, the logarithm taken through the
    eigendecomposition, so SPD values are assigned exactly. Other values are first
    projected onto the SPD matrices (symmetric part; an eigenvalue that is not positive at
    working precision, below ``eps * max|eigenvalue|``, is raised to ``sqrt(eps) * max|eigenvalue|``,
    so the result is positive definite to working precision, not just in exact arithmetic),
    so registering on any weight works.
    """

    def forward(self, X: Tensor) -> Tensor:
        _require_square(X, "SPD")
        return torch.linalg.matrix_exp(X.triu() + X.triu(1).mT)

    __call__ = forward

    def right_inverse(self, A: Tensor) -> Tensor:
        _require_square(A, "SPD.right_inverse")
        L, V = torch.linalg.eigh(0.5 * (A + A.mT))
        eps = torch.finfo(A.dtype).eps
        scale = L.abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
        L = torch.where(L < eps * scale, eps**0.5 * scale, L)
        return ((V * L.log().unsqueeze(-2)) @ V.mT).triu()

    def __repr__(self) -> str:
        return "SPD()"


OrthogonalMap = Literal["matrix_exp", "cayley", "householder"]


def _is_orthogonal(Q: Tensor) -> bool:
    n, k = Q.size(-2), Q.size(-1)
    eps = 10.0 * n * torch.finfo(Q.dtype).eps
    return torch.allclose(Q.mH @ Q, torch.eye(k, dtype=Q.dtype, device=Q.device), atol=eps)


def _make_orthogonal(A: Tensor) -> Tensor:
    """The Q of ``A = QR`` with ``diag(R) >= 0`` (A tall)."""
    X, tau = torch.geqrf(A)
    Q = torch.linalg.householder_product(X, tau)
    return Q * X.diagonal(dim1=-2, dim2=-1).sgn().unsqueeze(-2)


class Orthogonal:
    """Orthogonal (or semi-orthogonal, for rectangular) matrices, as ``torch``'s ``orthogonal``.

    ``orthogonal_map`` is ``"matrix_exp"``, ``"cayley"`` or ``"householder"``
    (``None``: matrix_exp for square or complex, householder otherwise). With
    ``use_trivialization=True`` (the default) the state holds ``base`` (an
    ``n x n`` orthogonal matrix, torch's ``base`` buffer) and the value is
    ``base @ map(X)``; ``right_inverse(Q)`` sets ``base`` from ``Q`` and returns
    ``-Id``, so assigning any orthogonal ``Q`` is exact.

    ``shape`` is the shape of the tensor it parametrizes (set when it is registered, as torch's
    ``_Orthogonal`` records it); ``right_inverse`` refuses a value of another shape, whatever
    ``unsafe`` says, as torch does.

    State: ``{"base": (..., n, n)}`` with ``n = max(rows, cols)``; empty without trivialization.
    """

    def __init__(
        self,
        orthogonal_map: Optional[OrthogonalMap] = None,
        *,
        use_trivialization: bool = True,
        shape: Optional[Sequence[int]] = None,
    ):
        if orthogonal_map not in (None, "matrix_exp", "cayley", "householder"):
            raise ValueError(
                f'orthogonal_map has to be one of "matrix_exp", "cayley", "householder". Got: {orthogonal_map}'
            )
        self.orthogonal_map = orthogonal_map
        self.use_trivialization = use_trivialization
        self.shape = None if shape is None else torch.Size(shape)

    def __repr__(self) -> str:
        return f"Orthogonal(orthogonal_map={self.orthogonal_map!r}, use_trivialization={self.use_trivialization})"

    def for_tensor(self, owner: nn.Module, name: str, value: Tensor) -> "Orthogonal":
        """Resolve the default map for ``value`` and check it is a matrix."""
        if value.ndim < 2:
            raise ValueError(
                f"Orthogonal on '{name}': Expected a matrix or batch of matrices. "
                f"Got a tensor of {value.ndim} dimensions."
            )
        omap = self.orthogonal_map
        if omap is None:
            omap = "matrix_exp" if value.size(-2) == value.size(-1) or value.is_complex() else "householder"
        if value.is_complex() and omap == "householder":
            raise ValueError(f"Orthogonal on '{name}': The householder parametrization does not support complex tensors.")
        return Orthogonal(omap, use_trivialization=self.use_trivialization, shape=value.shape)

    def _map(self) -> str:
        return self.orthogonal_map or "matrix_exp"

    def init_state(self, X: Tensor, *, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
        if not self.use_trivialization:
            return {}
        n = max(X.size(-2), X.size(-1))
        base = torch.eye(n, dtype=X.dtype, device=X.device).expand(*X.shape[:-2], n, n).clone()
        return {"base": base}

    def forward(self, X: Tensor, state: dict[str, Tensor], *, training: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        n, k = X.size(-2), X.size(-1)
        transposed = n < k
        if transposed:
            X = X.mT
            n, k = k, n
        omap = self._map()
        if omap in ("matrix_exp", "cayley"):
            X = X.tril()
            if n != k:
                X = torch.cat([X, X.new_zeros(n, n - k).expand(*X.shape[:-2], -1, -1)], dim=-1)
            A = X - X.mH
            if omap == "matrix_exp":
                Q = torch.linalg.matrix_exp(A)
            else:
                Id = torch.eye(n, dtype=A.dtype, device=A.device)
                Q = torch.linalg.solve(Id - 0.5 * A, Id + 0.5 * A)
            if n != k:
                Q = Q[..., :k]
        else:
            A = X.tril(diagonal=-1)
            tau = 2.0 / (1.0 + (A * A).sum(dim=-2))
            Q = torch.linalg.householder_product(A, tau)
            # column signs from the diagonal: torch uses .int(), which is exact on the +-1 its
            # right_inverse stores but zeroes a column once training moves it (0.99999 -> 0)
            signs = torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q.dtype)
            Q = Q * signs.unsqueeze(-2)
        if "base" in state:
            Q = state["base"] @ Q
        if transposed:
            Q = Q.mT
        return Q, state

    def right_inverse(
        self, Q: Tensor, state: dict[str, Tensor], *, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.shape is not None and Q.shape != self.shape:
            raise ValueError(
                f"Expected a matrix or batch of matrices of shape {self.shape}. Got a tensor of shape {Q.shape}."
            )
        Q_init = Q
        n, k = Q.size(-2), Q.size(-1)
        transpose = n < k
        if transpose:
            Q = Q.mT
            n, k = k, n
        if not self.use_trivialization:
            if self._map() in ("cayley", "matrix_exp"):
                raise NotImplementedError(
                    "It is not possible to assign to the matrix exponential "
                    "or the Cayley parametrizations when use_trivialization=False."
                )
            A, tau = torch.geqrf(Q)
            sign = A.diagonal(dim1=-2, dim2=-1).sign()
            sign = torch.where(tau == 0.0, -sign, sign)
            A = torch.diagonal_scatter(A, sign, dim1=-2, dim2=-1)
            return (A.mT if transpose else A), state
        if n == k:
            base = Q.clone() if _is_orthogonal(Q) else _make_orthogonal(Q)
        else:
            N = normal(tuple(Q.shape[:-2]) + (n, n - k), Q, generator)
            base = _make_orthogonal(torch.cat([Q, N], dim=-1))
        neg_Id = torch.zeros_like(Q_init)
        neg_Id.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
        return neg_Id, {"base": base}
