"""Every built-in parametrization (and the seeds' torch-style ones) through pfunc.testing, in float32 and float64.

Each entry of CHECKS names the parametrization (or chain), the inputs it is
defined on, its constraint, a reference where one exists (the torch version,
or a slow exact formula), and the properties that cannot apply to it (no
right_inverse, stateless...). The test asserts that every other property was
actually checked and held: nothing is skipped silently. Examples per check
follow the Hypothesis profile (25 in CI).

Input domains, and why:
  * matrix exponentials and Cayley maps get entries in [-2, 2] ([-1, 1] for SPD), so the
    image is well conditioned in float32 (the SPD constraint is strict: eigenvalues > 0);
  * householder Orthogonal gets originals with a diagonal of +-1 (what right_inverse stores),
    where it equals torch; test_orthogonal_householder_is_orthogonal_for_any_original covers
    the rest (torch's ``.int()`` zeroes columns there, pfunc's sign does not);
  * spectral norm gets matrices with a spectral gap (s1 >= 2 s2), on which power iteration
    converges, so "unit spectral norm" and "training converges" are exact statements;
  * weight norm gets v and g without zeros (v / ||v|| is 0/0 on a zero slice, see
    test_weight_norm_round_trip_on_a_zero_slice).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from pfunc.parametrizations import (
    SPD,
    Bounded,
    Cayley,
    Mask,
    MatrixExp,
    Orthogonal,
    Positive,
    Skew,
    SpectralNorm,
    Symmetric,
    WeightNorm,
    WeightStandardization,
)
from pfunc.testing import PROPERTIES, ParametrizationCheckError, check_parametrization, torch_reference
from pfunc.testing import constraints as C
from pfunc.testing import strategies as S

DTYPES = [torch.float32, torch.float64]
STATE_PROPERTIES = frozenset({
    "eval_keeps_state", "state_stays_finite", "training_converges", "new_state_holds_no_graph", "init_state_is_reproducible",
})
NO_MODULE_BUFFERS = frozenset({"eval_writes_no_buffers"})  # only torch-style nn.Module parametrizations with buffers
UNBATCHED = frozenset({"batched_forward_matches_per_item"})  # inputs without batch dims, or stateful
COMPILED_DTYPE = torch.float32  # torch.compile is checked in one dtype per row: compiling is the slow part
NO_FORWARD_AD = frozenset({"forward_mode_matches_reverse_mode"})
NO_RIGHT_INVERSE = frozenset({"right_inverse_round_trips"})
NO_REFERENCE = frozenset({"matches_reference"})
NO_CONSTRAINT = frozenset({"constraint_holds"})


# ---------------------------------------------------------------------- the seeds' torch-style parametrizations
class TutorialSymmetric(nn.Module):
    """The parametrize tutorial's Symmetric, with the API page's right_inverse."""

    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)

    def right_inverse(self, A):
        return A.triu()


class TutorialSkew(nn.Module):
    """The tutorial's Skew, with right_inverse."""

    def forward(self, X):
        A = X.triu(1)
        return A - A.transpose(-1, -2)

    def right_inverse(self, A):
        return A.triu(1)


class CayleyMap(nn.Module):
    """The parametrize tutorial's CayleyMap (an ``Id`` buffer), with the right_inverse it meant: the map is an involution."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("Id", torch.eye(n))

    def forward(self, X):
        return torch.linalg.solve(self.Id + X, self.Id - X)

    def right_inverse(self, A):
        return torch.linalg.solve(self.Id + A, self.Id - A)


class MatrixExponential(nn.Module):
    """The tutorial's MatrixExponential."""

    def forward(self, X):
        return torch.matrix_exp(X)


class PruningParametrization(nn.Module):
    """The tutorial's PruningParametrization (its mask is a plain attribute, drawn once)."""

    def __init__(self, X, p_drop=0.2):
        super().__init__()
        mask = torch.full_like(X, 1.0 - p_drop)
        self.mask = torch.bernoulli(mask, generator=torch.Generator().manual_seed(0))

    def forward(self, X):
        return X * self.mask

    def right_inverse(self, A):
        return A


# ---------------------------------------------------------------------- input strategies
def _nonzero(dtype: torch.dtype, low: float = 0.5, high: float = 4.0) -> st.SearchStrategy[float]:
    width = 32 if dtype == torch.float32 else 64
    return st.floats(low, high, width=width) | st.floats(-high, -low, width=width)


def square(dtype: torch.dtype, bound: float = S.DEFAULT_BOUND, n: Any = None) -> st.SearchStrategy[torch.Tensor]:
    batch = () if n is not None else S.batch_shapes(max_dims=1, max_side=2)
    return S.square_matrices(n, batch_shape=batch, dtype=dtype, min_value=-bound, max_value=bound)


@st.composite
def rectangular(draw, dtype: torch.dtype, bound: float = 2.0) -> torch.Tensor:
    n, k = draw(st.tuples(st.integers(1, 4), st.integers(1, 4)).filter(lambda nk: nk[0] != nk[1]))
    return draw(S.matrices(n, k, batch_shape=S.batch_shapes(1, 2), dtype=dtype, min_value=-bound, max_value=bound))


def unit_diagonal(matrices: st.SearchStrategy[torch.Tensor]) -> st.SearchStrategy[torch.Tensor]:
    """Householder originals: the diagonal replaced by its sign (+-1), as right_inverse leaves it."""

    def fix(X: torch.Tensor) -> torch.Tensor:
        signs = torch.where(X.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(X.dtype)
        return torch.diagonal_scatter(X, signs, dim1=-2, dim2=-1)

    return matrices.map(fix)


@st.composite
def conv_weights(draw, dtype: torch.dtype, make=S.spectral_gap_matrices) -> torch.Tensor:
    """``(out, in, k, k)`` kernels whose matrix view ``(out, in * k * k)`` is drawn by ``make``."""
    o, c, k = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return draw(make(o, c * k * k, dtype=dtype)).reshape(o, c, k, k)


def gap_weights(dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    return S.spectral_gap_matrices(dtype=dtype) | conv_weights(dtype)


def separated_spectrum(rows: Any = None, cols: Any = None, *, dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    """At least 2 x 2, singular values s_i = 4^(p-1-i) * [1, 1.5]: every s_i > 0 and s_i / s_(i+1) >= 2.6,
    so BigGAN's deflated second singular value is well defined (on a rank-1 matrix it is rounding noise)."""

    def values(p: int) -> st.SearchStrategy[list[float]]:
        scale = st.lists(st.floats(1.0, 1.5), min_size=p, max_size=p)
        return scale.map(lambda xs: [x * 4.0 ** (p - 1 - i) for i, x in enumerate(xs)])

    side = st.integers(2, 4)
    return S.matrices_with_singular_values(
        side if rows is None else rows, side if cols is None else cols, singular_values=values, dtype=dtype
    )


@st.composite
def separated_conv_weights(draw, dtype: torch.dtype) -> torch.Tensor:
    o, (c, k) = draw(st.integers(2, 3)), draw(st.sampled_from([(2, 1), (1, 2), (2, 2)]))
    return draw(separated_spectrum(o, c * k * k, dtype=dtype)).reshape(o, c, k, k)


def full_rank_square(dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    """Square, condition number <= 10: power iteration from any unit start vector stays nonzero."""
    n = st.shared(st.integers(1, 4), key="n")
    return S.well_conditioned_matrices(n, n, dtype=dtype)


def sn_inputs(dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    vectors = S.tensors(S.shapes(1, 1, 1, 4), dtype=dtype, elements_strategy=_nonzero(dtype))
    return gap_weights(dtype) | vectors


@st.composite
def weight_norm_inputs(draw, dtype: torch.dtype, dim: Any) -> tuple[torch.Tensor, torch.Tensor]:
    shape = draw(st.sampled_from([(2, 3), (3, 1), (2, 2, 2, 2), (1, 4)]))
    v = draw(S.tensors(shape, dtype=dtype, elements_strategy=_nonzero(dtype)))
    g_shape = tuple(torch.norm_except_dim(v, 2, -1 if dim is None else dim).shape)
    g = draw(S.tensors(g_shape, dtype=dtype, elements_strategy=_nonzero(dtype)))
    return g, v


def ws_inputs(dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    return S.matrices(dtype=dtype) | S.tensors(st.sampled_from([(2, 1, 2, 2), (3, 2, 1, 1), (1, 2, 3, 3)]), dtype=dtype)


def elementwise(dtype: torch.dtype) -> st.SearchStrategy[torch.Tensor]:
    return S.tensors(S.shapes(0, 3, 1, 3), dtype=dtype)


# ---------------------------------------------------------------------- references (torch, or exact formulas)
def _spd_by_eigh(X: torch.Tensor) -> torch.Tensor:
    L, V = torch.linalg.eigh(X.triu() + X.triu(1).mT)
    return (V * L.exp().unsqueeze(-2)) @ V.mT


def _ws_formula(W: torch.Tensor) -> torch.Tensor:
    """denoising-diffusion-pytorch's WeightStandardizedConv2d, for any number of dims."""
    eps = 1e-5 if W.dtype == torch.float32 else 1e-3
    dims = tuple(range(1, W.ndim))
    mean = W.mean(dim=dims, keepdim=True)
    var = W.var(dim=dims, unbiased=False, keepdim=True)
    return (W - mean) * (var + eps).rsqrt()


def _biggan_reference(sn: SpectralNorm) -> Callable[..., Any]:
    """BigGAN's SN.W_ with its power_iteration (in place on copies of the buffers)."""

    def proj(x, y):
        return torch.mm(y, x.t()) * y / torch.mm(y, y.t())

    def gram_schmidt(x, ys):
        for y in ys:
            x = x - proj(x, y)
        return x

    def power_iteration(W, u_, update=True, eps=1e-12):
        us, vs, svs = [], [], []
        for i, u in enumerate(u_):
            with torch.no_grad():
                v = torch.matmul(u, W)
                v = F.normalize(gram_schmidt(v, vs), eps=eps)
                vs += [v]
                u = torch.matmul(v, W.t())
                u = F.normalize(gram_schmidt(u, us), eps=eps)
                us += [u]
                if update:
                    u_[i][:] = u
            svs += [torch.squeeze(torch.matmul(torch.matmul(v, W.t()), u.t()))]
        return svs, us, vs

    def reference(W, *, state, training):
        u = [row.clone().unsqueeze(0) for row in state["u"]]
        sv = [s.clone().reshape(1) for s in state["sv"]]
        W_mat = W.view(W.size(0), -1)
        if sn.transpose:
            W_mat = W_mat.t()
        for _ in range(sn.n_power_iterations):
            svs, us, vs = power_iteration(W_mat, u, update=training, eps=sn.eps)
        if training:
            with torch.no_grad():
                for i, s in enumerate(svs):
                    sv[i][:] = s
        return W / svs[0], {"u": torch.cat(u), "sv": torch.cat(sv)}

    return reference


def _sigma_max(W: torch.Tensor) -> torch.Tensor:
    if W.ndim == 1:
        return torch.linalg.vector_norm(W)
    return torch.linalg.matrix_norm(W.flatten(1), ord=2)


def _normalised(W: torch.Tensor) -> torch.Tensor:
    return W / _sigma_max(W)


# ---------------------------------------------------------------------- the table
@dataclass(frozen=True)
class BuiltinCheck:
    """One row: how to check one parametrization, per dtype."""

    id: str
    make: Callable[[], Any]
    kwargs: Callable[[torch.dtype], dict]
    not_applicable: frozenset = field(default_factory=frozenset)
    batched: bool = False  # inputs drawn with batch dims (and stateless): batched_forward_matches_per_item applies
    module_buffers: bool = False  # a torch-style nn.Module with buffers: eval_writes_no_buffers applies

    def expected(self, dtype: torch.dtype) -> set[str]:
        """The properties that must be checked (and hold) for this row in ``dtype``."""
        out = set(PROPERTIES) - self.not_applicable
        if not self.batched:
            out -= UNBATCHED
        if not self.module_buffers:
            out -= NO_MODULE_BUFFERS
        if dtype != COMPILED_DTYPE:
            out.discard("compiled_matches_eager")
        return out


def _orthogonal_checks() -> list[BuiltinCheck]:
    checks = []
    for omap in ("matrix_exp", "cayley", "householder", None):
        for trivial in (True, False):
            for kind in ("square", "rectangular"):

                def kwargs(dtype, omap=omap, trivial=trivial, kind=kind):
                    inputs = square(dtype, bound=2.0) if kind == "square" else rectangular(dtype)
                    if omap == "householder" or (omap is None and kind == "rectangular"):
                        inputs = unit_diagonal(inputs)
                    if kind == "square":
                        n = st.shared(st.integers(1, 4), key="n")
                        image = S.orthogonal_matrices(n, n, batch_shape=S.batch_shapes(1, 2), dtype=dtype)
                    else:
                        image = S.orthogonal_matrices(*_rect_sides(), batch_shape=S.batch_shapes(1, 2), dtype=dtype)
                    return dict(
                        inputs=inputs,
                        constraint=C.orthogonal(),
                        image=image,
                        reference=torch_reference(
                            lambda m: P.orthogonal(m, orthogonal_map=omap, use_trivialization=trivial)
                        ),
                    )

                not_applicable = frozenset() if trivial else STATE_PROPERTIES
                if not trivial and omap in ("matrix_exp", "cayley", None) and not (omap is None and kind == "rectangular"):
                    not_applicable |= NO_RIGHT_INVERSE  # torch's too: "not possible to assign ... use_trivialization=False"
                householder = omap == "householder" or (omap is None and kind == "rectangular")
                checks.append(
                    BuiltinCheck(
                        f"Orthogonal-{omap or 'default'}-{'trivialized' if trivial else 'direct'}-{kind}",
                        lambda omap=omap, trivial=trivial: Orthogonal(omap, use_trivialization=trivial),
                        kwargs,
                        not_applicable,
                        batched=not trivial and not householder,  # trivialized: stateful; unit_diagonal: a map
                    )
                )
    return checks


def _rect_sides():
    sides = st.shared(st.tuples(st.integers(1, 4), st.integers(1, 4)).filter(lambda nk: nk[0] != nk[1]), key="rect")
    return sides.map(lambda nk: nk[0]), sides.map(lambda nk: nk[1])


CHECKS: list[BuiltinCheck] = [
    BuiltinCheck(
        "Symmetric",
        Symmetric,
        lambda dtype: dict(
            inputs=square(dtype),
            constraint=C.symmetric(),
            image=S.symmetric_matrices(batch_shape=S.batch_shapes(1, 2), dtype=dtype),
            reference=torch_reference(lambda m: parametrize.register_parametrization(m, "weight", TutorialSymmetric())),
        ),
        STATE_PROPERTIES,
        batched=True,
    ),
    BuiltinCheck(
        "Skew",
        Skew,
        lambda dtype: dict(
            inputs=square(dtype),
            constraint=C.skew(),
            image=S.skew_matrices(batch_shape=S.batch_shapes(1, 2), dtype=dtype),
            reference=torch_reference(lambda m: parametrize.register_parametrization(m, "weight", TutorialSkew())),
        ),
        STATE_PROPERTIES,
        batched=True,
    ),
    BuiltinCheck(
        "Skew->Cayley",
        lambda: [Skew(), Cayley()],
        lambda dtype: dict(
            inputs=square(dtype, bound=2.0),
            constraint=C.special_orthogonal(),
            reference=lambda X: CayleyMap(X.shape[-1]).to(X.dtype)(TutorialSkew()(X)),
        ),
        STATE_PROPERTIES,
        batched=True,
    ),
    BuiltinCheck(
        "Skew->MatrixExp",
        lambda: [Skew(), MatrixExp()],
        lambda dtype: dict(
            inputs=square(dtype, bound=2.0),
            constraint=C.special_orthogonal(),
            reference=lambda X: MatrixExponential()(TutorialSkew()(X)),
        ),
        NO_RIGHT_INVERSE | STATE_PROPERTIES,
        batched=True,
    ),
    BuiltinCheck(
        "Symmetric->MatrixExp",
        lambda: [Symmetric(), MatrixExp()],
        lambda dtype: dict(inputs=square(dtype, bound=1.0), constraint=C.spd(), reference=_spd_by_eigh),
        NO_RIGHT_INVERSE | STATE_PROPERTIES,
        batched=True,
    ),
    BuiltinCheck(
        "SPD",
        SPD,
        lambda dtype: dict(
            inputs=square(dtype, bound=1.0),
            constraint=C.spd(),
            image=S.spd_matrices(batch_shape=S.batch_shapes(1, 2), dtype=dtype, min_eigenvalue=0.1, max_eigenvalue=10.0),
            reference=_spd_by_eigh,
        ),
        STATE_PROPERTIES,
        batched=True,
    ),
    *_orthogonal_checks(),
    BuiltinCheck(
        "SpectralNorm-torch",
        SpectralNorm,
        lambda dtype: dict(
            inputs=sn_inputs(dtype),
            constraint=C.unit_spectral_norm(),
            reference=torch_reference(lambda m: P.spectral_norm(m)),
            converges_to=_normalised,
        ),
    ),
    BuiltinCheck(
        "SpectralNorm-torch-no-warmup-converges",
        lambda: SpectralNorm(warmup_iterations=0),
        lambda dtype: dict(
            inputs=gap_weights(dtype), reference=torch_reference(lambda m: P.spectral_norm(m)), converges_to=_normalised
        ),
        NO_CONSTRAINT,  # no warm-up: sigma is exact only once training has converged
    ),
    BuiltinCheck(
        "SpectralNorm-torch-drawn-states",
        SpectralNorm,
        lambda dtype: dict(
            inputs=full_rank_square(dtype),
            states=lambda X: S.spectral_norm_states(SpectralNorm(dim=0), tuple(X[0].shape), dtype=dtype),
            reference=torch_reference(lambda m: P.spectral_norm(m)),
            skip=["training_converges"],  # from an arbitrary start, power iteration may sit on a lower singular vector
        ),
        NO_CONSTRAINT | {"training_converges"},
    ),
    *[
        BuiltinCheck(
            f"SpectralNorm-biggan-svs{k}-itrs{itrs}{'-transposed' if transpose else ''}",
            lambda k=k, itrs=itrs, transpose=transpose: SpectralNorm.biggan(num_svs=k, num_itrs=itrs, transpose=transpose),
            lambda dtype, k=k, itrs=itrs, transpose=transpose: dict(
                inputs=gap_weights(dtype) if k == 1 else separated_spectrum(dtype=dtype) | separated_conv_weights(dtype),
                warmup=40,
                constraint=C.unit_spectral_norm(),
                reference=_biggan_reference(SpectralNorm.biggan(num_svs=k, num_itrs=itrs, transpose=transpose)),
                converges_to=_normalised,
            ),
        )
        for k, itrs, transpose in [(1, 1, False), (2, 2, False), (1, 1, True)]
    ],
    *[
        BuiltinCheck(
            f"WeightNorm-dim{dim}",
            lambda dim=dim: WeightNorm(dim),
            lambda dtype, dim=dim: dict(
                inputs=weight_norm_inputs(dtype, dim),
                reference=torch_reference(lambda m: P.weight_norm(m, dim=dim)),
                skip=sorted(NO_FORWARD_AD),  # torch._weight_norm has no forward AD: test_weight_norm_forward_mode
            ),
            NO_CONSTRAINT | STATE_PROPERTIES | NO_FORWARD_AD,
        )
        for dim in (0, 1, None)
    ],
    BuiltinCheck(
        "WeightStandardization",
        WeightStandardization,
        lambda dtype: dict(inputs=ws_inputs(dtype), constraint=C.standardized(), reference=_ws_formula),
        NO_RIGHT_INVERSE | STATE_PROPERTIES,
    ),
    BuiltinCheck(
        "Positive-softplus",
        lambda: Positive("softplus"),
        lambda dtype: dict(inputs=elementwise(dtype), constraint=C.positive(), reference=lambda X: torch.log1p(torch.exp(X))),
        STATE_PROPERTIES,
    ),
    BuiltinCheck(
        "Positive-exp",
        lambda: Positive("exp"),
        lambda dtype: dict(inputs=elementwise(dtype), constraint=C.positive(), reference=torch.exp),
        STATE_PROPERTIES,
    ),
    BuiltinCheck(
        "Bounded",
        lambda: Bounded(-1.0, 2.0),
        lambda dtype: dict(
            inputs=elementwise(dtype), constraint=C.in_interval(-1.0, 2.0), reference=lambda X: -1.0 + 3.0 / (1.0 + torch.exp(-X))
        ),
        STATE_PROPERTIES,
    ),
    BuiltinCheck(
        "Mask-given",
        lambda: Mask(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])),
        lambda dtype: dict(
            inputs=S.matrices(2, 3, dtype=dtype),
            constraint=C.zero_where(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])),
            reference=lambda X, state, training: X * torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=X.dtype),
        ),
    ),
    BuiltinCheck(
        "Mask-drawn",
        lambda: Mask(p_drop=0.5),
        lambda dtype: dict(inputs=elementwise(dtype), reference=lambda X, state, training: X * state["mask"]),
        NO_CONSTRAINT,
    ),
    BuiltinCheck(
        "seed-Skew->CayleyMap",
        lambda: [TutorialSkew(), CayleyMap(3)],
        lambda dtype: dict(
            inputs=square(dtype, bound=2.0, n=3), constraint=C.special_orthogonal(), reference=lambda X: Cayley()(Skew()(X))
        ),
        module_buffers=True,
    ),
    BuiltinCheck(
        "seed-Symmetric->MatrixExponential",
        lambda: [TutorialSymmetric(), MatrixExponential()],
        lambda dtype: dict(inputs=square(dtype, bound=1.0), constraint=C.spd(), reference=_spd_by_eigh),
        NO_RIGHT_INVERSE | STATE_PROPERTIES,
        batched=True,
    ),
    BuiltinCheck(
        "seed-PruningParametrization",
        lambda: PruningParametrization(torch.ones(3, 4), p_drop=0.5),
        lambda dtype: dict(
            inputs=S.matrices(3, 4, dtype=dtype),
            constraint=C.zero_where(PruningParametrization(torch.ones(3, 4), p_drop=0.5).mask),
        ),
        NO_REFERENCE | STATE_PROPERTIES,
    ),
]


def _kwargs(check: BuiltinCheck, dtype: torch.dtype) -> dict:
    kwargs = check.kwargs(dtype)
    kwargs.setdefault("name", f"{check.id} [{str(dtype).removeprefix('torch.')}]")
    if dtype != COMPILED_DTYPE:
        kwargs["skip"] = sorted(set(kwargs.get("skip", ())) | {"compiled_matches_eager"})
    return kwargs


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("check", CHECKS, ids=[c.id for c in CHECKS])
def test_builtin_parametrization_keeps_every_invariant(check: BuiltinCheck, dtype: torch.dtype):
    report = check_parametrization(check.make(), **_kwargs(check, dtype))
    assert set(report.checked) == check.expected(dtype), report.summary()
    assert report.examples > 0


# ---------------------------------------------------------------------- findings: where built-ins break, caught by the kit
# Each is a strict xfail: the kit reports exactly the named property, and the test starts failing
# (XPASS) the day the built-in is fixed, so the domain restrictions above can then be lifted.


def test_orthogonal_householder_is_orthogonal_for_any_original():
    # torch multiplies columns by X.diagonal().int(): a diagonal that training moves off +-1
    # (one AdamW step with weight decay: -1 -> -0.99999 -> int 0) gives a zero column. pfunc
    # takes the sign instead, equal to torch's on the +-1 diagonals right_inverse stores.
    check_parametrization(
        Orthogonal("householder"), S.matrices(3, 2, min_value=-2.0, max_value=2.0), constraint=C.orthogonal(),
        properties=["constraint_holds"],
    )


@pytest.mark.xfail(strict=True, raises=ParametrizationCheckError, reason=(
    "WeightNorm.right_inverse(w) = (||w||, w): a zero slice of w (a zero-initialised layer) gives 0 * 0/0 = NaN, as torch"
))
def test_weight_norm_round_trip_on_a_zero_slice():
    check_parametrization(
        WeightNorm(0),
        weight_norm_inputs(torch.float64, 0),
        image=S.matrices(2, 3, dtype=torch.float64, elements_strategy=st.sampled_from([0.0, 1.0])),
        properties=["right_inverse_round_trips"],
    )


@pytest.mark.xfail(strict=True, raises=ParametrizationCheckError, reason=(
    "SpectralNorm of a zero weight is 0 / sigma = 0/0 = NaN (eps guards the vectors, not sigma), as torch"
))
def test_spectral_norm_of_a_zero_weight_is_finite():
    check_parametrization(SpectralNorm(), S.matrices(dtype=torch.float64), properties=["finite_output_and_gradients"])


def test_bounded_stays_inside_the_open_interval_in_float32():
    # in float32 sigmoid(17) == 1: without the clamp to the values next to the bounds, X >= 17 gave
    # exactly high (and right_inverse(high) = +inf)
    check_parametrization(
        Bounded(0.0, 1.0),
        S.tensors(S.shapes(0, 1), dtype=torch.float32, min_value=-100.0, max_value=100.0),
        constraint=C.in_interval(0.0, 1.0),
        properties=["constraint_holds"],
    )


@pytest.mark.parametrize("kind", ["softplus", "exp"])
def test_positive_stays_positive_in_float32(kind):
    # softplus(-104) and exp(-104) underflow to 0 in float32; Positive clamps to the smallest normal
    check_parametrization(
        Positive(kind),
        S.tensors(S.shapes(0, 1), dtype=torch.float32, min_value=-200.0, max_value=200.0),
        constraint=C.positive(),
        properties=["constraint_holds"],
    )


@pytest.mark.xfail(strict=True, raises=ParametrizationCheckError, reason=(
    "WeightNorm calls torch._weight_norm, which has no forward-mode AD (torch.func.jvp raises), as torch's weight_norm"
))
@pytest.mark.parametrize("dim", [0, None])
def test_weight_norm_forward_mode(dim):
    check_parametrization(WeightNorm(dim), weight_norm_inputs(torch.float64, dim), properties=["forward_mode_matches_reverse_mode"])


# ---------------------------------------------------------------------- torch's own parametrizations through the kit
# torch.nn.utils.parametrizations' modules (_Orthogonal, _SpectralNorm, _WeightNorm) checked as torch-style
# parametrizations with the kit's defaults. Each test pins what the kit reports on them (the findings table
# of pfunc/testing/README.md); torch's orthogonal with matrix_exp and cayley maps passes every property.


def _torch_parametrization(register: Callable[[nn.Module], Any], rows: int = 3, cols: int = 3) -> nn.Module:
    layer = nn.Linear(cols, rows).double()
    register(layer)
    return layer.parametrizations.weight[0]


def _failures(parametrization: Any, inputs: Any, **kwargs: Any) -> tuple[list[str], set]:
    try:
        report = check_parametrization(parametrization, inputs, **kwargs)
    except ParametrizationCheckError as error:
        return error.properties, {(w.probe, w.kind) for w in error.report.warnings}
    return [], {(w.probe, w.kind) for w in report.warnings}


@pytest.mark.parametrize("omap", ["matrix_exp", "cayley"])
def test_torch_orthogonal_keeps_every_invariant(omap):
    failed, warnings = _failures(
        _torch_parametrization(lambda m: P.orthogonal(m, orthogonal_map=omap)),
        S.square_matrices(3, min_value=-2.0, max_value=2.0),
        constraint=C.orthogonal(),
        image=S.orthogonal_matrices(3, 3),
        max_examples=10,
    )
    assert failed == [] and warnings == set()


@pytest.mark.parametrize("trivial", [True, False])
def test_torch_orthogonal_householder_leaves_the_constraint_after_adamw_steps(trivial):
    # the .int() of the diagonal: weight decay moves a -1 to -0.99..., int() makes it 0 and zeroes a column
    failed, warnings = _failures(
        _torch_parametrization(lambda m: P.orthogonal(m, orthogonal_map="householder", use_trivialization=trivial)),
        unit_diagonal(S.square_matrices(3, min_value=-2.0, max_value=2.0)),
        constraint=C.orthogonal(),
        image=S.orthogonal_matrices(3, 3),
        max_examples=10,
    )
    assert failed == ["constraint_holds_after_training_steps"]
    assert ("zero", "off the constraint") in warnings  # int(0) = 0 on the diagonal: a zero column


def test_torch_spectral_norm_cannot_run_under_vmap_in_training_mode_and_is_nan_at_zero():
    failed, warnings = _failures(
        _torch_parametrization(lambda m: P.spectral_norm(m), 3, 4),
        S.spectral_gap_matrices(3, 4),
        constraint=C.unit_spectral_norm(),
        warmup=30,
        converges_to=_normalised,
        max_examples=10,
    )
    assert failed == ["vmap_matches_loop"]  # F.normalize(out=...): no batching rule for aten::div.out
    assert ("zero", "non-finite output") in warnings


def test_torch_weight_norm_has_no_forward_mode_ad():
    from torch.nn.utils.parametrizations import _WeightNorm

    failed, warnings = _failures(_WeightNorm(0), weight_norm_inputs(torch.float64, 0), max_examples=10)
    assert failed == ["forward_mode_matches_reverse_mode"]
    assert ("zero", "non-finite output") in warnings
