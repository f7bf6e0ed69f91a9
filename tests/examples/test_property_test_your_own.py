"""The property-testing example: the user's Interval and LowRank pass every applicable invariant, the bug is caught."""

from examples import property_test_your_own as example
from pfunc.testing import PROPERTIES

STATELESS_WITHOUT_REFERENCE = set(PROPERTIES) - {
    "matches_reference", "eval_keeps_state", "state_stays_finite", "training_converges", "new_state_holds_no_graph",
    "init_state_is_reproducible", "eval_writes_no_buffers",
    "batched_forward_matches_per_item",  # inputs drawn without batch_shape, and batched= not declared
}


def test_interval_and_low_rank_keep_every_applicable_invariant():
    for check in (example.check_interval, example.check_low_rank):
        report = check(max_examples=10)
        assert report.ok and report.examples == 10
        assert set(report.checked) == STATELESS_WITHOUT_REFERENCE


def test_buggy_interval_is_caught_by_the_round_trip_with_a_scalar_counterexample():
    error = example.check_buggy_interval(max_examples=10)
    assert error.properties == ["right_inverse_round_trips"]
    assert "X = float64[] = 0.0" in error.failures[0].example


def test_main_prints_the_reports(capsys):
    assert example.main(["--max-examples", "5"]) == 0
    out = capsys.readouterr().out
    assert "Interval(-1.0, 3.0): 5 examples" in out and "LowRank(2): 5 examples" in out
    assert "[right_inverse_round_trips]" in out
