"""Realistic buggy variants of the subjects: the bugs people actually make in parametrizations.

Each :class:`Mutant` names its subject, the bug in a sentence, its kind (``gradient``, ``state``,
``batch``, ``edge``, ``report``, ``value``...), and ``caught_by``: the property that must report it
(a failure, or for ``edge`` bugs a warning the correct subject does not give).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import subjects as s

__all__ = ["Mutant", "MUTANTS"]


@dataclass(frozen=True)
class Mutant:
    """A buggy variant of subject ``of``: ``make()`` builds it; ``caught_by`` must report it."""

    name: str
    of: str
    kind: str
    bug: str
    make: Callable[[], Any]
    caught_by: str


# ---------------------------------------------------------------------- LowRank
class LowRankTransposedFactor(s.LowRank):
    def right_inverse(self, W):
        A, B = super().right_inverse(W)
        return A, B.mT


class LowRankSwappedFactors(s.LowRank):
    def right_inverse(self, W):
        A, B = super().right_inverse(W)
        return B, A


class LowRankDetachedA(s.LowRank):
    def forward(self, A, B):
        return A.detach() @ B

    __call__ = forward


class LowRankNoSquareRoot(s.LowRank):
    def right_inverse(self, W):
        U, sv, Vh = torch.linalg.svd(W, full_matrices=False)
        r = self.rank
        return U[..., :r] * sv[..., :r].unsqueeze(-2), sv[..., :r].unsqueeze(-1) * Vh[..., :r, :]


# ---------------------------------------------------------------------- StiefelQR
class StiefelSignOfDiagonal(s.StiefelQR):
    def forward(self, X):
        Q, R = torch.linalg.qr(X)
        return Q * torch.sign(R.diagonal(dim1=-2, dim2=-1)).unsqueeze(-2)

    __call__ = forward


class StiefelNoSignFix(s.StiefelQR):
    def forward(self, X):
        return torch.linalg.qr(X).Q

    __call__ = forward


class StiefelCompleteQ(s.StiefelQR):
    def forward(self, X):
        return torch.linalg.qr(X, mode="complete").Q

    __call__ = forward


class StiefelDiagOf2D(s.StiefelQR):
    def forward(self, X):
        Q, R = torch.linalg.qr(X)
        return Q * torch.where(torch.diagonal(R, dim1=0, dim2=1) < 0, -1.0, 1.0).to(Q.dtype)

    __call__ = forward


# ---------------------------------------------------------------------- SoftplusPositive
class SoftplusByLogOnePlusExp(s.SoftplusPositive):
    def forward(self, X):
        return torch.log(1 + torch.exp(X))

    __call__ = forward


class SoftplusOfData(s.SoftplusPositive):
    def forward(self, X):
        return F.softplus(X.data).clamp_min(torch.finfo(X.dtype).tiny)

    __call__ = forward


class SoftplusBetaMismatch(s.SoftplusPositive):
    def forward(self, X):
        return F.softplus(X, beta=2.0).clamp_min(torch.finfo(X.dtype).tiny)

    __call__ = forward


class ExpPositiveUnderflows(s.SoftplusPositive):
    """The exp variant without a floor: exp(-1e4) is exactly 0."""

    def forward(self, X):
        return torch.exp(X)

    __call__ = forward

    def right_inverse(self, Y):
        return torch.log(Y)


# ---------------------------------------------------------------------- SoftmaxRows
class SoftmaxOverDim1(s.SoftmaxRows):
    def forward(self, X):
        e = torch.exp(X - X.amax(dim=1, keepdim=True))
        return e / e.sum(dim=1, keepdim=True)

    __call__ = forward


class SoftmaxWithoutMax(s.SoftmaxRows):
    def forward(self, X):
        e = torch.exp(X)
        return e / e.sum(dim=-1, keepdim=True)

    __call__ = forward


class SoftmaxDetachedNormalizer(s.SoftmaxRows):
    def forward(self, X):
        e = torch.exp(X - X.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True).detach()

    __call__ = forward


class SoftmaxRightInverseIdentity(s.SoftmaxRows):
    def right_inverse(self, Y):
        return Y


# ---------------------------------------------------------------------- UnitNormRows
class UnitNormNoEps(s.UnitNormRows):
    def forward(self, X):
        return X / torch.linalg.vector_norm(X, dim=-1, keepdim=True)

    __call__ = forward


class UnitNormColumns(s.UnitNormRows):
    def forward(self, X):
        return X / torch.linalg.vector_norm(X, dim=0, keepdim=True).clamp_min(1e-12)

    __call__ = forward


class UnitNormNoGradNorm(s.UnitNormRows):
    def forward(self, X):
        with torch.no_grad():
            n = torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(1e-12)
        return X / n

    __call__ = forward


class UnitNormForgotKeepdim(s.UnitNormRows):
    def forward(self, X):
        return X / torch.linalg.vector_norm(X, dim=-1).clamp_min(1e-12)

    __call__ = forward


# ---------------------------------------------------------------------- CholeskySPD
class CholeskyRawDiagonal(s.CholeskySPD):
    def forward(self, X):
        L = X.tril()
        return L @ L.mT

    __call__ = forward

    def right_inverse(self, Y):
        return torch.linalg.cholesky(Y)


class CholeskyRightInverseNoInverseSoftplus(s.CholeskySPD):
    def right_inverse(self, Y):
        return torch.linalg.cholesky(Y)


class CholeskyUpperFactor(s.CholeskySPD):
    def right_inverse(self, Y):
        U = torch.linalg.cholesky(Y, upper=True)
        return U.tril(-1) + torch.diag_embed(s._inverse_softplus(U.diagonal(dim1=-2, dim2=-1)))


class CholeskyDiagOf2D(s.CholeskySPD):
    def forward(self, X):
        L = X.tril(-1) + torch.diag(F.softplus(torch.diag(X)))
        return L @ L.mT

    __call__ = forward


# ---------------------------------------------------------------------- Toeplitz
class HankelNotToeplitz(s.Toeplitz):
    def forward(self, c):
        n = (c.shape[-1] + 1) // 2
        i = torch.arange(n)
        return c[..., i.unsqueeze(-1) + i]

    __call__ = forward


class ToeplitzByPythonFloats(s.Toeplitz):
    def forward(self, c):
        n = (c.shape[-1] + 1) // 2
        rows = [[float(c[n - 1 + i - j]) for j in range(n)] for i in range(n)]
        return torch.tensor(rows, dtype=c.dtype).reshape(n, n)

    __call__ = forward


class ToeplitzRowNotFlipped(s.Toeplitz):
    def right_inverse(self, T):
        return torch.cat([T[..., 0, :], T[..., 1:, 0]], dim=-1)


# ---------------------------------------------------------------------- PowerIterationSpectralNorm
class SpectralNormGlobalRNG(s.PowerIterationSpectralNorm):
    def init_state(self, W, *, generator):
        u = s._normalize(torch.randn(W.shape[0], dtype=W.dtype))
        return {"u": u, "v": s._normalize(W.mT @ u)}


class SpectralNormStateWithGraph(s.PowerIterationSpectralNorm):
    def forward(self, W, state, *, training):
        u, v = state["u"], state["v"]
        if training:
            v = s._normalize(W.mT @ u)
            u = s._normalize(W @ v)
        return W / (u.detach() @ W @ v.detach()), {"u": u, "v": v}


class SpectralNormUpdatesInEval(s.PowerIterationSpectralNorm):
    def forward(self, W, state, *, training):
        return super().forward(W, state, training=True)


class SpectralNormDetachedSigma(s.PowerIterationSpectralNorm):
    def forward(self, W, state, *, training):
        Y, new = super().forward(W, state, training=training)
        sigma = (new["u"] @ W @ new["v"]).detach()
        return W / sigma, new


class SpectralNormUnnormalizedStep(s.PowerIterationSpectralNorm):
    def forward(self, W, state, *, training):
        u, v = state["u"], state["v"]
        if training:
            with torch.no_grad():
                v = W.mT @ u
                u = W @ v
        return W / (u @ W @ v), {"u": u, "v": v}


# ---------------------------------------------------------------------- TorchStyleSpectralNorm
class TorchStyleWritesInEval(s.TorchStyleSpectralNorm):
    def forward(self, W):
        with torch.no_grad():
            self._v.copy_(s._normalize(W.mT @ self._u))
            self._u.copy_(s._normalize(W @ self._v))
        return W / (self._u @ W @ self._v)


class TorchStyleBufferWithGraph(s.TorchStyleSpectralNorm):
    def forward(self, W):
        if self.training:
            self._v = s._normalize(W.mT @ self._u)
            self._u = s._normalize(W @ self._v)
        return W / (self._u.detach() @ W @ self._v.detach())


# ---------------------------------------------------------------------- Interval
class IntervalRightInverseForgetsAffine(s.Interval):
    def right_inverse(self, Y):
        return torch.atanh(Y)


class _TanhWrongBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y)  # should be 1 - y**2

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y * y)


class _TanhNoJvp(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _TanhWrongJvp(_TanhWrongBackward):
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)

    @staticmethod
    def jvp(ctx, t):
        (y,) = ctx.saved_tensors
        return t * (1 - y)  # should be 1 - y**2


def _interval_with(tanh: Any) -> type:
    class IntervalCustomTanh(s.Interval):
        def forward(self, X):
            return self.low + (self.high - self.low) * (tanh.apply(X) + 1) / 2

        __call__ = forward

    IntervalCustomTanh.__name__ = f"IntervalWith{tanh.__name__.strip('_')}"
    return IntervalCustomTanh


# ---------------------------------------------------------------------- WeightNormRows
class WeightNormWholeTensorNorm(s.WeightNormRows):
    def forward(self, g, v):
        return g * v / torch.linalg.vector_norm(v)

    __call__ = forward


class WeightNormSwappedOriginals(s.WeightNormRows):
    def right_inverse(self, W):
        g, v = super().right_inverse(W)
        return v, g


class WeightNormView(s.WeightNormRows):
    def forward(self, g, v):
        return g * v / torch.linalg.vector_norm(v.view(v.shape[0], -1), dim=1).view(g.shape)

    __call__ = forward


class WeightNormDetachedG(s.WeightNormRows):
    def forward(self, g, v):
        return super().forward(g.detach(), v)

    __call__ = forward


# ---------------------------------------------------------------------- TutorialSymmetric
class SymmetricTransposeDims01(s.TutorialSymmetric):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(0, 1)


class SymmetricNoGradUpper(s.TutorialSymmetric):
    def forward(self, X):
        with torch.no_grad():
            upper = X.triu(1).transpose(-1, -2)
        return X.triu() + upper


class SymmetricRightInverseStrictUpper(s.TutorialSymmetric):
    def right_inverse(self, A):
        return A.triu(1)


def _m(name: str, of: str, kind: str, bug: str, make: Callable[[], Any], caught_by: str) -> Mutant:
    return Mutant(name, of, kind, bug, make, caught_by)


MUTANTS: list[Mutant] = [
    _m("LowRankTransposedFactor", "LowRank", "report", "right_inverse returns B transposed", LowRankTransposedFactor, "right_inverse_round_trips"),
    _m("LowRankSwappedFactors", "LowRank", "report", "right_inverse returns (B, A)", LowRankSwappedFactors, "right_inverse_round_trips"),
    _m("LowRankDetachedA", "LowRank", "gradient", "A.detach() @ B: no gradient reaches A", LowRankDetachedA, "gradient_reaches_every_original"),
    _m("LowRankNoSquareRoot", "LowRank", "value", "right_inverse splits s, not sqrt(s)", LowRankNoSquareRoot, "right_inverse_round_trips"),
    _m("StiefelSignOfDiagonal", "StiefelQR", "edge", "sign(diag R) is 0 on a zero column", StiefelSignOfDiagonal, "edge_of_domain"),
    _m("StiefelNoSignFix", "StiefelQR", "value", "no sign fix: QR not unique, round trip flips columns", StiefelNoSignFix, "right_inverse_round_trips"),
    _m("StiefelCompleteQ", "StiefelQR", "value", "mode='complete' returns n x n", StiefelCompleteQ, "keeps_shape_and_dtype"),
    _m("StiefelDiagOf2D", "StiefelQR", "batch", "diagonal over dims (0, 1): right on 2-D only", StiefelDiagOf2D, "batched_forward_matches_per_item"),
    _m("SoftplusByLogOnePlusExp", "SoftplusPositive", "edge", "log(1 + exp(X)) overflows for large X", SoftplusByLogOnePlusExp, "edge_of_domain"),
    _m("SoftplusOfData", "SoftplusPositive", "gradient", "softplus(X.data): gradient cut", SoftplusOfData, "gradient_reaches_every_original"),
    _m("SoftplusBetaMismatch", "SoftplusPositive", "value", "forward uses beta=2, right_inverse beta=1", SoftplusBetaMismatch, "right_inverse_round_trips"),
    _m("ExpPositiveUnderflows", "SoftplusPositive", "edge", "exp(X) without a floor is 0 for very negative X", ExpPositiveUnderflows, "edge_of_domain"),
    _m("SoftmaxOverDim1", "SoftmaxRows", "batch", "softmax over dim=1, not -1: right on 2-D only", SoftmaxOverDim1, "batched_forward_matches_per_item"),
    _m("SoftmaxWithoutMax", "SoftmaxRows", "edge", "exp without max-subtraction overflows", SoftmaxWithoutMax, "edge_of_domain"),
    _m("SoftmaxDetachedNormalizer", "SoftmaxRows", "gradient", "normalizer detached: wrong gradient", SoftmaxDetachedNormalizer, "gradient_matches_finite_differences"),
    _m("SoftmaxRightInverseIdentity", "SoftmaxRows", "value", "right_inverse returns Y, not log Y", SoftmaxRightInverseIdentity, "right_inverse_round_trips"),
    _m("UnitNormNoEps", "UnitNormRows", "edge", "norm without eps: NaN on a zero row", UnitNormNoEps, "edge_of_domain"),
    _m("UnitNormColumns", "UnitNormRows", "value", "normalises columns (dim=0)", UnitNormColumns, "batched_forward_matches_per_item"),
    _m("UnitNormNoGradNorm", "UnitNormRows", "gradient", "norm computed under no_grad: wrong gradient", UnitNormNoGradNorm, "gradient_matches_finite_differences"),
    _m("UnitNormForgotKeepdim", "UnitNormRows", "batch", "norm without keepdim broadcasts along the wrong axis", UnitNormForgotKeepdim, "batched_forward_matches_per_item"),
    _m("CholeskyRawDiagonal", "CholeskySPD", "value", "no softplus on the diagonal: singular at a zero", CholeskyRawDiagonal, "constraint_holds"),
    _m("CholeskyRightInverseNoInverseSoftplus", "CholeskySPD", "value", "right_inverse forgets the inverse softplus", CholeskyRightInverseNoInverseSoftplus, "right_inverse_round_trips"),
    _m("CholeskyUpperFactor", "CholeskySPD", "value", "right_inverse takes the upper factor", CholeskyUpperFactor, "right_inverse_round_trips"),
    _m("CholeskyDiagOf2D", "CholeskySPD", "batch", "torch.diag: right on 2-D only", CholeskyDiagOf2D, "batched_forward_matches_per_item"),
    _m("HankelNotToeplitz", "Toeplitz", "value", "index i + j: a Hankel matrix", HankelNotToeplitz, "constraint_holds_after_training_steps"),
    _m("ToeplitzByPythonFloats", "Toeplitz", "gradient", "entries through float(): gradient cut", ToeplitzByPythonFloats, "gradient_reaches_every_original"),
    _m("ToeplitzRowNotFlipped", "Toeplitz", "value", "right_inverse forgets to flip the first row", ToeplitzRowNotFlipped, "right_inverse_round_trips"),
    _m("SpectralNormGlobalRNG", "PowerIterationSpectralNorm", "state", "init_state draws from the global RNG", SpectralNormGlobalRNG, "init_state_is_reproducible"),
    _m("SpectralNormStateWithGraph", "PowerIterationSpectralNorm", "state", "power step outside no_grad: new state holds a graph", SpectralNormStateWithGraph, "new_state_holds_no_graph"),
    _m("SpectralNormUpdatesInEval", "PowerIterationSpectralNorm", "state", "power step in eval too", SpectralNormUpdatesInEval, "eval_keeps_state"),
    _m("SpectralNormDetachedSigma", "PowerIterationSpectralNorm", "gradient", "sigma detached: wrong gradient", SpectralNormDetachedSigma, "gradient_matches_finite_differences"),
    _m("SpectralNormUnnormalizedStep", "PowerIterationSpectralNorm", "state", "power step without normalisation", SpectralNormUnnormalizedStep, "constraint_holds"),
    _m("TorchStyleWritesInEval", "TorchStyleSpectralNorm", "state", "buffers written in eval mode too", lambda: TorchStyleWritesInEval(3, 4), "eval_writes_no_buffers"),
    _m("TorchStyleBufferWithGraph", "TorchStyleSpectralNorm", "state", "buffers reassigned outside no_grad: state holds a graph", lambda: TorchStyleBufferWithGraph(3, 4), "new_state_holds_no_graph"),
    _m("IntervalRightInverseForgetsAffine", "Interval", "value", "right_inverse forgets the affine map", IntervalRightInverseForgetsAffine, "right_inverse_round_trips"),
    _m("IntervalWrongBackward", "Interval", "gradient", "custom autograd.Function: backward 1 - y, not 1 - y^2", _interval_with(_TanhWrongBackward), "gradient_matches_finite_differences"),
    _m("IntervalNoJvp", "Interval", "gradient", "custom autograd.Function without jvp", _interval_with(_TanhNoJvp), "forward_mode_matches_reverse_mode"),
    _m("IntervalWrongJvp", "Interval", "gradient", "custom autograd.Function: jvp 1 - y, not 1 - y^2", _interval_with(_TanhWrongJvp), "forward_mode_matches_reverse_mode"),
    _m("WeightNormWholeTensorNorm", "WeightNormRows", "value", "norm of the whole v, not per row", WeightNormWholeTensorNorm, "right_inverse_round_trips"),
    _m("WeightNormSwappedOriginals", "WeightNormRows", "report", "right_inverse returns (v, g)", WeightNormSwappedOriginals, "right_inverse_round_trips"),
    _m("WeightNormView", "WeightNormRows", "batch", "v.view(...) fails on a non-contiguous v", WeightNormView, "non_contiguous_inputs_give_the_same_output"),
    _m("WeightNormDetachedG", "WeightNormRows", "gradient", "g.detach(): no gradient reaches g", WeightNormDetachedG, "gradient_reaches_every_original"),
    _m("SymmetricTransposeDims01", "TutorialSymmetric", "batch", "transpose(0, 1): right on 2-D only", SymmetricTransposeDims01, "batched_forward_matches_per_item"),
    _m("SymmetricNoGradUpper", "TutorialSymmetric", "gradient", "the mirrored half under no_grad: wrong gradient", SymmetricNoGradUpper, "gradient_matches_finite_differences"),
    _m("SymmetricRightInverseStrictUpper", "TutorialSymmetric", "value", "right_inverse forgets the diagonal", SymmetricRightInverseStrictUpper, "right_inverse_round_trips"),
]
