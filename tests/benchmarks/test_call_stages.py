"""benchmarks.call_stages: every stage of the profiled rows runs and is timed."""

import torch

from benchmarks import call_stages
from benchmarks.sizes import Sizes

TINY = Sizes(width=8, batch=4, rnn_width=4, rnn_steps=3, rnn_batch=2)
STAGES = {
    "floor", "floor: parametrization", "floor: layer math", "pfunc", "pfunc: materialize", "pfunc: checks",
    "pfunc: module on shadow", "module with its own tensors",
}


def test_every_row_times_every_stage():
    rows = call_stages.rows(TINY)
    assert [r.name.split(",")[0] for r in rows] == ["layer", "layer", "RNN"]
    for row in rows:
        med = call_stages.profile(row, budget_s=0.0, min_repeats=1)
        assert set(med) == STAGES and all(v > 0 for v in med.values())


def _output(result):
    """A thunk's output: ``net(...)`` and the floors return ``(out, state)``, the RNN's forwards the tensor."""
    return result[0] if isinstance(result, tuple) else result


def test_the_stages_compute_what_the_rows_compute():
    for row in call_stages.rows(TINY):
        t = row.thunks
        with torch.no_grad():
            torch.testing.assert_close(_output(t["pfunc"]()), _output(t["floor"]()))
            torch.testing.assert_close(t["module with its own tensors"](), t["floor: layer math"]())
            torch.testing.assert_close(_output(t["pfunc: module on shadow"]()), t["floor: layer math"]())
