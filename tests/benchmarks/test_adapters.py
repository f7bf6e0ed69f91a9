"""Item 9 (adapters): on tiny sizes the N-adapter ensemble, the pfunc loop and the torch loop agree,
and the runner knows the family. No timing is asserted."""

from benchmarks import adapters, run
from benchmarks.sizes import SMOKE


def test_adapter_ensemble_rows_equal_the_torch_loop_of_single_adapters():
    rows = list(adapters.comparisons(SMOKE))
    assert [c.labels["N"] for c in rows] == [str(n) for n in SMOKE.ensemble_sizes]
    for comparison in rows:
        comparison.check()  # losses and new adapters of every variant equal the torch loop's
    assert run.FAMILY_MODULES["adapters"] is adapters
