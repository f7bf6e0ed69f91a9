"""The kit's checks are tested: each deliberately broken parametrization is caught, by the right property,
with a readable report (the property, the parametrization's name, a small minimal input, the discrepancy)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from pfunc.parametrizations import Symmetric
from pfunc.testing import ParametrizationCheckError, check_parametrization, torch_reference
from pfunc.testing import constraints as C
from pfunc.testing import strategies as S

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop:UserWarning",  # vmap's fallback for the in-place planted bug
    "ignore:The use of `x.T`:UserWarning",  # the API page's Symmetric on batches
)

MATRICES = S.square_matrices(batch_shape=S.batch_shapes(1, 2))


def caught(parametrization, inputs=MATRICES, **kwargs) -> ParametrizationCheckError:
    with pytest.raises(ParametrizationCheckError) as info:
        check_parametrization(parametrization, inputs, **kwargs)
    return info.value


def minimal_input(error: ParametrizationCheckError, prop: str) -> str:
    return next(f.example for f in error.failures if f.property == prop)


def shapes_in(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(s) for s in m.split(", ") if s) for m in re.findall(r"\w+\[([\d, ]*)\]", text)]


def assert_readable(error: ParametrizationCheckError, prop: str, name: str, max_numel: int = 4) -> str:
    """The report names the parametrization and the property, shows the minimal input, and that input is small."""
    text = str(error)
    assert text.startswith(f"{name} violates"), text
    assert f"[{prop}]" in text and "minimal failing input:" in text, text
    example = minimal_input(error, prop)
    sizes = [torch.Size(s).numel() for s in shapes_in(example.splitlines()[0])]
    assert sizes and max(sizes) <= max_numel, f"minimal input not small:\n{example}"
    return text


# ---------------------------------------------------------------------- the planted bugs
class WrongRightInverse:
    """Symmetric whose right_inverse forgets the diagonal."""

    def forward(self, X):
        return X.triu() + X.triu(1).mT

    __call__ = forward

    def right_inverse(self, A):
        return A.triu(1)


def test_wrong_right_inverse_is_caught_by_the_round_trip():
    error = caught(WrongRightInverse(), constraint=C.symmetric())
    assert error.properties == ["right_inverse_round_trips"]
    text = assert_readable(error, "right_inverse_round_trips", "WrongRightInverse", max_numel=1)
    assert re.search(r"forward\(right_inverse\(Y\)\) != Y: max abs error \S+ > allowed", text)


class InPlaceClamp:
    """Clamps its input in place."""

    def __call__(self, X):
        return X.clamp_(-1.0, 1.0)


def test_in_place_mutation_of_the_input_is_caught_even_when_values_do_not_change():
    error = caught(InPlaceClamp())
    assert "does_not_modify_inputs" in error.properties
    text = assert_readable(error, "does_not_modify_inputs", "InPlaceClamp", max_numel=1)
    assert "modified its input X in place" in text and "version counter 0 -> 1" in text


class NormalizeRows:
    """Rows scaled to sum to one: 0/0 on a zero row."""

    def __call__(self, X):
        return X / X.sum(-1, keepdim=True)


def test_nan_for_some_inputs_is_caught_with_the_zero_row_that_causes_it():
    error = caught(NormalizeRows())
    assert error.properties == ["finite_output_and_gradients"]
    assert_readable(error, "finite_output_and_gradients", "NormalizeRows", max_numel=1)
    assert "X = float64[1, 1] = [[0.0]]" in minimal_input(error, "finite_output_and_gradients")


class SqrtWhere:
    """The where/sqrt trap: finite output, NaN gradient at negative inputs."""

    def __call__(self, X):
        return torch.where(X > 0, X.sqrt(), torch.zeros_like(X))


def test_nan_gradient_behind_a_finite_output_is_caught():
    error = caught(SqrtWhere())
    assert error.properties == ["finite_output_and_gradients"]
    text = assert_readable(error, "finite_output_and_gradients", "SqrtWhere", max_numel=1)
    assert "gradient of sum(G * forward(X))" in text and "non-finite" in text


class DropLastColumn:
    """Changes the shape without saying so."""

    def __call__(self, X):
        return X[..., :-1]


def test_shape_change_is_caught_unless_declared_unsafe():
    error = caught(DropLastColumn())
    assert error.properties == ["keeps_shape_and_dtype"]
    text = assert_readable(error, "keeps_shape_and_dtype", "DropLastColumn", max_numel=1)
    assert "has shape (1, 0), X has (1, 1)" in text and "unsafe=True" in text
    report = check_parametrization(DropLastColumn(), MATRICES, unsafe=True, max_examples=5)
    assert report.skipped["keeps_shape_and_dtype"].startswith("declared unsafe")


class ToFloat32:
    """Changes the dtype without saying so."""

    def __call__(self, X):
        return X.float()


def test_dtype_change_is_caught():
    error = caught(ToFloat32())
    assert error.properties == ["keeps_shape_and_dtype"]
    assert "has dtype torch.float32, X has torch.float64" in str(error)


class ClipByItem:
    """Data-dependent Python control flow: .item() cannot run under vmap."""

    def __call__(self, X):
        m = X.abs().max().item()
        return X / m if m > 1 else X


def test_vmap_incompatible_code_is_caught_and_so_is_the_gradient_item_cuts():
    error = caught(ClipByItem())
    # m = max|X| through .item() is a constant to autograd: the gradient misses dm/dX. On a batch, m is the
    # max over every item, also a batch bug, found when the drawn batch holds items of different maxima
    # (draw_batch stacks other drawn inputs of the same shape; which exist depends on the search)
    reported = error.properties
    assert reported[:2] == ["gradient_matches_finite_differences", "vmap_matches_loop"]
    assert reported[2:] in ([], ["batched_forward_matches_per_item"])
    text = assert_readable(error, "vmap_matches_loop", "ClipByItem", max_numel=1)
    assert "torch.func.vmap(forward) (eval) raised RuntimeError" in text and ".item()" in text


class _OldStyleSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class OldStyleFunction:
    """A custom autograd.Function without setup_context: autograd works, torch.func does not."""

    def __call__(self, X):
        return _OldStyleSquare.apply(X)


def test_autograd_function_unsupported_by_torch_func_is_caught():
    error = caught(OldStyleFunction())
    assert {"func_grad_matches_autograd", "vmap_matches_loop"} <= set(error.properties)
    assert "torch.func.grad(sum(G * forward(X))) raised RuntimeError" in str(error)


class NotSymmetric:
    """A "Symmetric" that forgot the transpose."""

    def forward(self, X):
        return X.triu() + X.triu(1)

    __call__ = forward

    def right_inverse(self, A):
        return A.triu()


def test_non_symmetric_symmetric_is_caught_by_the_constraint():
    error = caught(NotSymmetric(), constraint=C.symmetric())
    assert "constraint_holds" in error.properties
    text = assert_readable(error, "constraint_holds", "NotSymmetric")
    assert re.search(r"forward\(X\) \(eval\) is not symmetric: max \|Y - Y\^T\| = \S+ > allowed", text)


class SymmetricFromLower:
    """Symmetric, right_inverse exact, but built from the lower triangle: not torch's Symmetric."""

    def forward(self, X):
        return X.tril() + X.tril(-1).mT

    __call__ = forward

    def right_inverse(self, A):
        return A.tril()


class TorchSymmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)


def test_disagreement_with_the_reference_is_caught_and_nothing_else():
    reference = torch_reference(lambda m: parametrize.register_parametrization(m, "weight", TorchSymmetric()))
    error = caught(SymmetricFromLower(), constraint=C.symmetric(), reference=reference)
    assert error.properties == ["matches_reference"]
    assert "differs from the reference: max abs error" in str(error)
    check_parametrization(Symmetric(), MATRICES, constraint=C.symmetric(), reference=reference, max_examples=10)


class NoisyForward:
    """Adds noise from the global RNG: not deterministic."""

    def __call__(self, X):
        return X + 1e-3 * torch.randn_like(X)


def test_nondeterministic_forward_is_caught():
    error = caught(NoisyForward(), properties=["deterministic"])
    assert error.properties == ["deterministic"]
    assert "two identical forward calls (eval) differ" in str(error)


# ---------------------------------------------------------------------- the seeds' CayleyMap, verbatim and "fixed"
class SeedCayleyMap(nn.Module):
    """The parametrize tutorial, verbatim: right_inverse refers to an undefined X."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("Id", torch.eye(n))

    def forward(self, X):
        # Assume X skew-symmetric
        # (I + X)(I - X)^{-1}
        return torch.linalg.solve(self.Id + X, self.Id - X)

    def right_inverse(self, A):
        # Assume A orthogonal
        # See https://en.wikipedia.org/wiki/Cayley_transform#Matrix_map
        # (X - I)(X + I)^{-1}
        return torch.linalg.solve(X - self.Id, self.Id + X)  # noqa: F821  (the tutorial's bug)


class SeedCayleyMapTypoFixed(SeedCayleyMap):
    """The seed's right_inverse with X renamed A: runs, but it is not the inverse of forward."""

    def right_inverse(self, A):
        return torch.linalg.solve(A - self.Id, self.Id + A)


class Skew(nn.Module):
    def forward(self, X):
        A = X.triu(1)
        return A - A.transpose(-1, -2)

    def right_inverse(self, A):
        return A.triu(1)


CAYLEY_INPUTS = S.square_matrices(3, min_value=-2.0, max_value=2.0, dtype=torch.float32)


def test_seed_cayley_map_right_inverse_is_caught_raising_name_error():
    error = caught([Skew(), SeedCayleyMap(3)], CAYLEY_INPUTS, constraint=C.special_orthogonal())
    assert error.properties == ["right_inverse_round_trips"]
    assert "right_inverse(Y) raised NameError: name 'X' is not defined" in str(error)


def test_seed_cayley_map_right_inverse_with_the_typo_fixed_is_still_wrong():
    error = caught([Skew(), SeedCayleyMapTypoFixed(3)], CAYLEY_INPUTS, constraint=C.special_orthogonal())
    assert error.properties == ["right_inverse_round_trips"]
    # (A - I)^{-1} (I + A) at A = forward(0) = I: the minimal counterexample is the identity
    assert "right_inverse(Y) raised _LinAlgError" in str(error) and "singular" in str(error)
    assert "Y = forward(X) = float32[3, 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]" in str(error)


class SeedSymmetric(nn.Module):
    """The API page's Symmetric: .T, which is only a matrix transpose for 2-D tensors."""

    def forward(self, X):
        return X.triu() + X.triu(1).T

    def right_inverse(self, A):
        return A.triu()


def test_seed_symmetric_with_dot_t_is_caught_on_batches_of_matrices():
    batched = S.square_matrices(batch_shape=st.tuples(st.integers(2, 3)))
    error = caught(SeedSymmetric(), batched, constraint=C.symmetric(), properties=["keeps_shape_and_dtype", "constraint_holds"])
    assert set(error.properties) & {"forward_runs", "keeps_shape_and_dtype", "constraint_holds"}
    check_parametrization(SeedSymmetric(), S.square_matrices(), constraint=C.symmetric(), max_examples=10)


# ---------------------------------------------------------------------- stateful bugs
class _PowerIterationBase:
    """Spectral norm by power iteration, state {"u", "v"}; subclasses plant one bug each."""

    def init_state(self, W, *, generator=None):
        u = torch.randn(W.shape[0], generator=generator, dtype=W.dtype)
        v = torch.randn(W.shape[1], generator=generator, dtype=W.dtype)
        return {"u": u / u.norm(), "v": v / v.norm()}

    def step(self, W, u, v):
        u = W @ v
        u = u / u.norm()
        v = W.mT @ u
        return u, v / v.norm()

    def forward(self, W, state, *, training=False):
        u, v = state["u"], state["v"]
        if training:
            u, v = self.step(W.detach(), u, v)
        sigma = u @ W @ v / (u.norm() * v.norm())
        return W / sigma, ({"u": u, "v": v} if training else state)

    def right_inverse(self, Y, state, *, generator=None):
        return Y, state


class UpdatesInEval(_PowerIterationBase):
    def forward(self, W, state, *, training=False):
        u, v = self.step(W.detach(), state["u"], state["v"])
        return W / (u @ W @ v), {"u": u, "v": v}


class UnnormalizedPowerIteration(_PowerIterationBase):
    def step(self, W, u, v):
        return W @ v, W.mT @ (W @ v)


class WritesStateInPlace(_PowerIterationBase):
    def forward(self, W, state, *, training=False):
        if training:
            u, v = self.step(W.detach(), state["u"], state["v"])
            state["u"].copy_(u)
            state["v"].copy_(v)
        return W / (state["u"] @ W @ state["v"]), state


GAP = S.spectral_gap_matrices(dtype=torch.float32)
STATE_PROPS = ["deterministic", "does_not_modify_inputs", "eval_keeps_state", "state_stays_finite", "training_converges"]


def test_the_correct_power_iteration_passes_the_state_properties():
    report = check_parametrization(_PowerIterationBase(), GAP, properties=STATE_PROPS, converges_to=lambda W: W / torch.linalg.matrix_norm(W, ord=2))
    assert set(report.checked) == {"forward_runs", *STATE_PROPS}


def test_state_changed_by_an_eval_call_is_caught():
    error = caught(UpdatesInEval(), GAP, properties=STATE_PROPS)
    assert "eval_keeps_state" in error.properties
    assert "an eval-mode call changed the state: state[0].u" in str(error)


def test_unnormalized_power_iteration_overflows_and_is_caught():
    error = caught(UnnormalizedPowerIteration(), GAP, properties=["state_stays_finite"])
    assert error.properties == ["state_stays_finite"]
    assert re.search(r"after training call \d+, state\[0\]\.[uv] is not finite", str(error))


def test_state_written_in_place_is_caught():
    error = caught(WritesStateInPlace(), GAP, properties=["deterministic", "does_not_modify_inputs"])
    assert error.properties == ["deterministic", "does_not_modify_inputs"]  # the second call saw the first's writes
    assert "forward (training) modified its input state[0].u in place" in str(error)
    before = re.search(r"before: (.*)", str(error)).group(1)
    assert f"state.u = {before}" in minimal_input(error, "does_not_modify_inputs")  # shown as drawn, not as mutated
