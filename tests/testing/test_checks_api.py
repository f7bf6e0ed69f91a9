"""check_parametrization's arguments: selection, overrides, images, references, states, warm-up, convergence, errors."""

import hypothesis
import pytest
import torch
from hypothesis import strategies as st
from torch.nn.utils import parametrizations as P
from torch.nn.utils import parametrize

from pfunc.parametrizations import Cayley, Orthogonal, Skew, SpectralNorm, WeightNorm
from pfunc.testing import (
    PROPERTIES,
    ParametrizationCheckError,
    Tolerance,
    check_parametrization,
    hypothesis_settings,
    parametrization_test,
    torch_reference,
)
from pfunc.testing import constraints as C
from pfunc.testing import strategies as S

MATRICES = S.square_matrices()


def test_a_passing_check_reports_its_examples_and_what_it_checked():
    report = check_parametrization(lambda X: 2 * X, MATRICES, max_examples=7)
    assert report.ok and report.examples == 7
    every_example = {
        "forward_runs", "keeps_shape_and_dtype", "deterministic", "does_not_modify_inputs",
        "finite_output_and_gradients", "gradient_reaches_every_original", "func_grad_matches_autograd",
        "gradient_matches_finite_differences", "forward_mode_matches_reverse_mode", "vmap_matches_loop",
    }
    costly = {"constraint_holds_after_training_steps": 2, "edge_of_domain": 2, "compiled_matches_eager": 1}
    assert set(report.checked) == every_example | set(costly) | {"non_contiguous_inputs_give_the_same_output"}
    assert all(report.checked[n] == 7 for n in every_example)
    assert {n: report.checked[n] for n in costly} == costly  # costly properties: a bounded number of examples
    assert 0 < report.checked["non_contiguous_inputs_give_the_same_output"] <= 7  # 1 x 1 inputs are contiguous
    assert report.skipped["right_inverse_round_trips"] == "no right_inverse (<lambda>)"
    assert report.skipped["constraint_holds"] == "no constraint given"
    assert report.skipped["batched_forward_matches_per_item"].startswith("batch dims not declared")
    assert report.name == "<lambda>" and "7 examples" in report.summary() and report.warnings == []


def test_the_check_follows_the_active_profile_unless_overridden():
    report = check_parametrization(lambda X: X, MATRICES, properties=["forward_runs"])
    assert report.examples == hypothesis.settings().max_examples
    custom = hypothesis.settings(max_examples=3)
    assert check_parametrization(lambda X: X, MATRICES, settings=custom, properties=["forward_runs"]).examples == 3
    s = hypothesis_settings(custom, max_examples=5)
    assert s.max_examples == 5 and s.deadline is None and not s.report_multiple_bugs
    assert hypothesis.HealthCheck.too_slow in s.suppress_health_check


def test_properties_and_skip_choose_what_is_checked():
    report = check_parametrization(Skew(), MATRICES, properties=["deterministic", "vmap_matches_loop"], skip=["vmap_matches_loop"], max_examples=3)
    assert set(report.checked) == {"forward_runs", "deterministic"}  # forward_runs always runs
    assert report.skipped["vmap_matches_loop"] == "left out by the caller"
    with pytest.raises(ValueError, match="forward_runs cannot be skipped"):
        check_parametrization(Skew(), MATRICES, skip=["forward_runs"])
    with pytest.raises(ValueError, match=r"unknown properties \['symmetric'\]; valid names: \['forward_runs'"):
        check_parametrization(Skew(), MATRICES, properties=["symmetric"])
    with pytest.raises(ValueError, match="no property left"):
        check_parametrization(Skew(), MATRICES, properties=["deterministic"], skip=["deterministic"])
    with pytest.raises(TypeError, match="not one string"):
        check_parametrization(Skew(), MATRICES, properties="deterministic")


def test_a_crashing_forward_is_reported_whatever_properties_are_chosen():
    def crashes(X):
        raise RuntimeError("boom")

    with pytest.raises(ParametrizationCheckError, match=r"forward \(eval\) raised RuntimeError: boom") as info:
        check_parametrization(crashes, MATRICES, properties=["vmap_matches_loop"])
    assert info.value.properties == ["forward_runs"]

    class ScalesInPlace:  # fine without autograd, breaks on inputs that require grad
        def __call__(self, X):
            return X.mul_(2)

    with pytest.raises(ParametrizationCheckError, match="func_grad_matches_autograd") as info:
        check_parametrization(ScalesInPlace(), MATRICES, properties=["func_grad_matches_autograd"])
    assert "a leaf Variable that requires grad" in str(info.value)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="inputs must be a Hypothesis strategy"):
        check_parametrization(Skew(), torch.zeros(2, 2))
    with pytest.raises(TypeError, match="must be callable or define forward"):
        check_parametrization(3, MATRICES)
    with pytest.raises(ValueError, match="max_examples must be a positive int"):
        check_parametrization(Skew(), MATRICES, max_examples=0)
    with pytest.raises(TypeError, match="reference must be callable"):
        check_parametrization(Skew(), MATRICES, reference="torch")
    with pytest.raises(ValueError, match="inputs must draw floating point tensors; item 0 has dtype torch.int64"):
        check_parametrization(Skew(), st.just(torch.zeros(2, 2, dtype=torch.int64)))
    with pytest.raises(ValueError, match="states must draw one dict of tensors per parametrization"):
        check_parametrization(SpectralNorm(), MATRICES, states=lambda X: st.just([{}, {}]))


def test_every_violated_property_is_reported_with_its_own_minimal_example():
    class Broken:
        def __call__(self, X):
            X.mul_(1.0)
            return X.triu()

    with pytest.raises(ParametrizationCheckError) as info:
        check_parametrization(Broken(), MATRICES, constraint=C.symmetric())
    error = info.value
    assert isinstance(error, AssertionError)
    # the in-place write also breaks autograd on inputs that require grad; through pfunc.parametrize a call
    # hands the parametrization copies of its originals, so the training steps run and find the constraint broken
    assert error.properties == ["does_not_modify_inputs", "constraint_holds", "finite_output_and_gradients",
                                "constraint_holds_after_training_steps"]
    examples = {f.property: f.example for f in error.failures}
    assert examples["does_not_modify_inputs"] == "X = float64[1, 1] = [[0.0]]"
    assert examples["constraint_holds"] in (
        "X = float64[2, 2] = [[0.0, 1.0], [0.0, 0.0]]", "X = float64[2, 2] = [[0.0, 0.0], [1.0, 0.0]]"
    )
    assert "a leaf Variable that requires grad is being used in an in-place operation" in str(error)
    assert "Broken violates 4 properties" in str(error) and "properties checked" in str(error)


def test_tolerance_override_decides_what_counts_as_equal():
    reference = lambda X: X  # noqa: E731
    slightly_off = lambda X: X * (1 + 1e-6)  # noqa: E731
    with pytest.raises(ParametrizationCheckError, match=r"differs from the reference: max abs error \S+ > allowed"):
        check_parametrization(slightly_off, MATRICES, reference=reference, properties=["matches_reference"])
    check_parametrization(
        slightly_off, MATRICES, reference=reference, properties=["matches_reference"], tolerance=Tolerance(rtol=1e-5, atol=0.0)
    )
    check_parametrization(
        slightly_off, S.square_matrices(dtype=torch.float32), reference=reference, properties=["matches_reference"]
    )  # float32's default rtol (3.5e-4) covers it


def test_an_image_strategy_feeds_the_round_trip():
    # Cayley after Skew reaches only rotations: a declared image with det -1 is caught, det +1 is fine.
    with pytest.raises(ParametrizationCheckError, match="right_inverse_round_trips"):
        check_parametrization([Skew(), Cayley()], MATRICES, image=S.orthogonal_matrices(det=-1), properties=["right_inverse_round_trips"])
    report = check_parametrization(
        Orthogonal(), MATRICES, image=S.orthogonal_matrices(det=-1), properties=["right_inverse_round_trips"], max_examples=10
    )
    assert report.checked == {"forward_runs": 10, "right_inverse_round_trips": 10}


def test_right_inverse_must_give_back_as_many_originals_as_forward_takes():
    class ForgetsG(WeightNorm):
        def right_inverse(self, weight):
            return (weight,)

    inputs = st.tuples(S.tensors((2, 1), min_value=1, max_value=2), S.tensors((2, 3), min_value=1, max_value=2))
    check_parametrization(WeightNorm(0), inputs, properties=["right_inverse_round_trips"], max_examples=5)
    with pytest.raises(ParametrizationCheckError, match="right_inverse\\(Y\\) gives 1 tensor\\(s\\), forward takes 2 original\\(s\\)"):
        check_parametrization(ForgetsG(0), inputs, properties=["right_inverse_round_trips"])


def test_torch_reference_runs_the_torch_twin_with_pfuncs_state():
    report = check_parametrization(
        SpectralNorm(), S.spectral_gap_matrices(), reference=torch_reference(lambda m: P.spectral_norm(m)),
        properties=["matches_reference"], max_examples=5,
    )
    assert report.checked == {"forward_runs": 5, "matches_reference": 5}
    wrong_dim = torch_reference(lambda m: P.spectral_norm(m, dim=1))
    with pytest.raises(ParametrizationCheckError, match="differs from the reference"):
        check_parametrization(SpectralNorm(), S.spectral_gap_matrices(2, 2), reference=wrong_dim, properties=["matches_reference"])
    with pytest.raises(ValueError, match="must parametrize module.weight"):
        torch_reference(lambda m: m)(torch.zeros(2, 2))


def test_torch_reference_of_a_chain_takes_one_state_per_parametrization():
    class TorchSkew(torch.nn.Module):
        def forward(self, X):
            return X.triu(1) - X.triu(1).mT

    def register(m):
        parametrize.register_parametrization(m, "weight", TorchSkew())
        parametrize.register_parametrization(m, "weight", P.orthogonal(torch.nn.Linear(3, 3)).parametrizations.weight[0])

    reference = torch_reference(register)
    X = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    Y, state = reference(X, state=[{}, {"base": Q}])
    assert state[1]["base"].shape == (3, 3)
    torch.testing.assert_close(Y, Q @ torch.linalg.matrix_exp(torch.tril(X.triu(1) - X.triu(1).mT) - torch.tril(X.triu(1) - X.triu(1).mT).mT))


def test_warmup_and_convergence_for_stateful_parametrizations():
    biggan = SpectralNorm.biggan()
    inputs = S.spectral_gap_matrices(2, 2)
    with pytest.raises(ParametrizationCheckError, match="is not unit spectral norm"):
        check_parametrization(biggan, inputs, constraint=C.unit_spectral_norm(), properties=["constraint_holds"])
    check_parametrization(biggan, inputs, constraint=C.unit_spectral_norm(), properties=["constraint_holds"], warmup=40)
    normalised = lambda W: W / torch.linalg.matrix_norm(W, ord=2)  # noqa: E731
    check_parametrization(biggan, inputs, converges_to=normalised, properties=["training_converges"], max_examples=10)
    with pytest.raises(ParametrizationCheckError, match=r"is not converges_to\(X\)"):
        check_parametrization(biggan, inputs, converges_to=lambda W: 2 * normalised(W), properties=["training_converges"])


def test_parametrization_test_is_a_test_function():
    test = parametrization_test(Skew(), MATRICES, constraint=C.skew(), max_examples=3)
    assert test() is None and "Skew()" in test.__doc__
    failing = parametrization_test(Skew(), MATRICES, constraint=C.symmetric(), properties=["constraint_holds"])
    with pytest.raises(ParametrizationCheckError):
        failing()


def test_every_property_is_documented_in_its_family_module_and_the_readme():
    import importlib
    import pathlib

    import pfunc.testing.properties as package

    families = ["values", "gradients", "round_trips", "transforms", "state", "training", "domain"]
    docs = "".join(importlib.import_module(f"pfunc.testing.properties.{f}").__doc__ for f in families)
    readme = (pathlib.Path(package.__file__).parents[1] / "README.md").read_text()
    for name in PROPERTIES:
        assert f"``{name}``" in docs, name
        assert f"| `{name}` |" in readme, name
        assert getattr(importlib.import_module(PROPERTIES[name].__module__), "__doc__").count(f"``{name}``") == 1


def test_a_declared_shape_change_keeps_every_other_property():
    class VectorToMatrix:  # (6,) -> (2, 3), registered with unsafe=True
        def forward(self, x):
            return x.reshape(*x.shape[:-1], 2, 3)

        __call__ = forward

        def right_inverse(self, W):
            return W.flatten(-2)

    report = check_parametrization(VectorToMatrix(), S.tensors((6,)), unsafe=True, max_examples=10)
    assert "right_inverse_round_trips" in report.checked and "vmap_matches_loop" in report.checked
    assert report.skipped["keeps_shape_and_dtype"] == "declared unsafe=True (forward may change shape and dtype)"


# ---------------------------------------------------------------------- issue 16: reports a user can act on, and the options
from tests.testing.mutants import catalog as mutants  # noqa: E402
from tests.testing.mutants import subjects  # noqa: E402


def test_a_wrong_shaped_right_inverse_is_reported_as_such_before_anything_is_registered():
    # LowRank's correct forward would crash on the transposed factor ("mat1 and mat2 shapes cannot be
    # multiplied") inside pfunc.parametrize; the count/shape/dtype comparison runs first and says what is wrong
    kwargs = subjects.subject("LowRank").kwargs()
    with pytest.raises(ParametrizationCheckError) as info:
        check_parametrization(mutants.LowRankTransposedFactor(), properties=["right_inverse_round_trips"], **kwargs)
    message = info.value.failures[0].message
    assert message == "right_inverse(Y)[1] has shape (3, 2), original1 (2, 3) (forward takes that shape)"
    # with unsafe=True too (it said only "max abs error inf" before)
    with pytest.raises(ParametrizationCheckError, match=r"has shape \(3, 2\), original1 \(2, 3\)"):
        check_parametrization(mutants.LowRankTransposedFactor(), properties=["right_inverse_round_trips"], unsafe=True, **kwargs)


def test_a_crash_names_the_property_that_was_running_and_the_users_frame():
    def boom(Y):
        raise KeyError("no such axis")

    with pytest.raises(ParametrizationCheckError) as info:
        check_parametrization(lambda X: X, MATRICES, constraint=C.predicate(boom, "boom"), max_examples=3)
    assert info.value.properties[0] == "constraint_holds"
    message = info.value.failures[0].message
    assert message.startswith("constraint boom raised KeyError: 'no such axis' (at test_checks_api.py:"), message
    assert message.endswith(" in boom)")


def test_a_crash_while_drawing_the_example_is_a_report_too():
    def states(originals):
        raise ValueError("my states strategy is broken")

    with pytest.raises(ParametrizationCheckError) as info:
        check_parametrization(SpectralNorm(), MATRICES, states=states, max_examples=3)
    message = info.value.failures[0].message
    assert "while drawing and binding the example" in message and "ValueError: my states strategy is broken" in message
    assert "in states)" in message


def test_several_originals_take_a_plain_tuple_of_strategies():
    report = check_parametrization(subjects.LowRank(), (S.tensors((4, 2)), S.tensors((2, 3))), max_examples=3,
                                   properties=["forward_runs", "right_inverse_round_trips"])
    assert report.checked == {"forward_runs": 3, "right_inverse_round_trips": 3}


def test_edge_warnings_never_fail_and_name_the_probe_and_the_input():
    report = check_parametrization(subjects.UnitNormRows(), **dict(subjects.subject("UnitNormRows").kwargs(), max_examples=5))
    assert report.ok
    keys = {(w.property, w.probe, w.kind) for w in report.warnings}
    assert ("edge_of_domain", "zero", "off the constraint") in keys  # a zero row stays zero: genuinely singular
    zero = next(w for w in report.warnings if w.probe == "zero")
    assert "X = float64[" in zero.example and "0.0" in zero.example
    assert "warning(s) at the edge of the domain (not failures" in report.summary()


def test_a_cut_gradient_names_the_original_and_non_differentiable_opts_out():
    kwargs = dict(subjects.subject("WeightNormRows").kwargs(), max_examples=5)
    with pytest.raises(ParametrizationCheckError, match=r"no gradient reaches original0.*non_differentiable=\['original0'\]"):
        check_parametrization(mutants.WeightNormDetachedG(), properties=["gradient_reaches_every_original"], **kwargs)
    report = check_parametrization(
        mutants.WeightNormDetachedG(), properties=["gradient_reaches_every_original"], non_differentiable=["original0"], **kwargs
    )
    assert report.checked["gradient_reaches_every_original"] == 5


def test_batches_are_declared_or_inferred_and_can_be_declined():
    bug = mutants.SoftmaxOverDim1()
    plain = S.matrices()
    assert check_parametrization(bug, plain, properties=["batched_forward_matches_per_item"], max_examples=5).skipped
    with pytest.raises(ParametrizationCheckError, match="batched_forward_matches_per_item"):
        check_parametrization(bug, plain, batched=True, properties=["batched_forward_matches_per_item"], max_examples=5)
    with pytest.raises(ParametrizationCheckError, match="inferred from the strategy"):
        check_parametrization(bug, S.matrices(batch_shape=S.batch_shapes()), properties=["batched_forward_matches_per_item"])
    report = check_parametrization(
        bug, S.matrices(batch_shape=S.batch_shapes()), batched=False, properties=["batched_forward_matches_per_item"], max_examples=5
    )
    assert report.skipped["batched_forward_matches_per_item"] == "declared batched=False"


def test_all_failures_false_stops_at_the_first_violated_property():
    class Broken:
        def __call__(self, X):
            X.mul_(1.0)
            return X.triu()

    with pytest.raises(ParametrizationCheckError) as info:
        check_parametrization(Broken(), MATRICES, constraint=C.symmetric(), all_failures=False)
    assert info.value.properties == ["does_not_modify_inputs"]


def test_costly_properties_run_on_a_bounded_number_of_examples():
    report = check_parametrization(lambda X: 2 * X, MATRICES, max_examples=12, costly_examples=2)
    assert report.checked["edge_of_domain"] == 2 and report.checked["constraint_holds_after_training_steps"] == 2
    assert report.checked["compiled_matches_eager"] == 1 and report.checked["gradient_matches_finite_differences"] == 10
    assert report.checked["func_grad_matches_autograd"] == 12
    with pytest.raises(ValueError, match="costly_examples must be a positive int"):
        check_parametrization(lambda X: X, MATRICES, costly_examples=0)
