"""CI smoke of the benchmark suite: on tiny sizes every compared pair gives equal results,
the runner writes its report, and the checks can fail. No timing is asserted."""

from __future__ import annotations

import doctest
import importlib
import os

import pytest
import torch

from benchmarks import call_overhead, caching, compiled, distributed, ensembles, layers, power_iteration, report, run, unet
from benchmarks.comparison import Comparison, MismatchError, Row, Variant
from benchmarks.timing import Timing
from benchmarks.sizes import SMOKE

EAGER_FAMILIES = {
    "layers": layers,
    "caching": caching,
    "ensembles": ensembles,
    "power_iteration": power_iteration,
    "call_overhead": call_overhead,
}


@pytest.mark.parametrize("family", sorted(EAGER_FAMILIES))
def test_every_variant_of_every_row_equals_the_reference(family):
    labels = set()
    for comparison in EAGER_FAMILIES[family].comparisons(SMOKE):
        comparison.check()
        labels.add(tuple(comparison.labels.values()))
    expected = {"layers": 2 * 5 * 2 * 2, "caching": 2, "ensembles": len(SMOKE.ensemble_sizes), "power_iteration": len(SMOKE.power_iterations), "call_overhead": 4}
    assert len(labels) == expected[family]  # model x parametrization x mode x pass for layers


@pytest.mark.skipif(not unet.available(), reason="examples/diffusion/unet.py not present")
def test_unet_step_pfunc_equals_torch_parametrize():
    (comparison,) = unet.comparisons(SMOKE)
    comparison.check()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_distributed_rows_agree_across_two_real_ranks_and_report_their_columns():
    rows = list(distributed.comparisons(SMOKE))
    for comparison in rows:
        comparison.check()  # the 2-rank averaged gradient is the whole batch's; every bucket size, the same mean
    assert [c.labels["row"] for c in rows] == ["step", "step, bucket size", "all-reduce"]
    text = report.table([c.run(budget_s=0.0) for c in rows])
    for column in ("2 processes / 1 process", "all-reduce share of the 2-process step", "step time the all-reduce adds",
                   "1 MB buckets / 25 MB buckets", "buckets"):
        assert column in text.splitlines()[0], text
    assert list(distributed.comparisons(SMOKE, "cuda")) == []  # not measured without a GPU: a note says what would be


@pytest.mark.compile
def test_compiled_rows_agree_and_pfunc_code_has_no_graph_break():
    # aot_eager: dynamo capture and AOTAutograd as with inductor, without code generation (CI time)
    rows = [
        compiled.mlp_row(layers.FAMILIES["SpectralNorm"], SMOKE, torch.device("cpu"), "aot_eager"),
        compiled.ensemble_row(SMOKE, torch.device("cpu"), "aot_eager"),
    ]
    for comparison in rows:
        comparison.check()
        for name, breaks in comparison.facts["breaks"].items():
            if name.startswith("pfunc"):
                assert breaks.in_pfunc == 0, breaks.reasons
    # rows with different variants (func.grad and pf.grad only on the MLP) share one table
    text = report.table([c.untimed() for c in rows])
    header = text.splitlines()[0]
    assert "pfunc func.grad compiled" in header and "pfunc pf.grad compiled" in header and len(text.splitlines()) == 4


@pytest.mark.slow
def test_every_compiled_row_agrees_with_inductor():
    for comparison in compiled.comparisons(SMOKE):
        comparison.check()


@pytest.mark.skipif(not unet.available(), reason="examples/diffusion/unet.py not present")
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS needs Linux's /proc/self/clear_refs")
def test_unet_peak_rss_runs_a_route_in_its_own_process():
    peak = unet.peak_rss_bytes("pfunc pf.grad", SMOKE, torch.device("cpu"))  # tiny sizes: may be ~0
    assert isinstance(peak, int) and peak >= 0
    with pytest.raises(SystemExit):
        unet.main(["--route", "no such route", "--sizes", "{}"])


def _timed(family, labels, medians, extras=None):
    """A row with made-up medians, to exercise the goals' bookkeeping."""
    variants = {name: Variant(lambda: None) for name in medians}
    c = Comparison(family, labels, variants, reference=next(iter(medians)), ratios=())
    t = Timing(medians=medians, q1=medians, q3=medians, repeats=1, numbers={k: 1 for k in medians})
    return Row(c, t, extras or {})


@pytest.mark.parametrize("pf_time, pf_peak, status", [(0.99, "205", "met"), (1.01, "205", "not met"), (0.99, "240", "not met")])
def test_the_unet_goal_judges_time_and_both_memory_figures(pf_time, pf_peak, status):
    extras = {"peak MB (torch)": "204", "peak MB (pfunc pf.grad)": pf_peak, "peak RSS MB (torch)": "209", "peak RSS MB (pfunc pf.grad)": "209"}
    row = _timed("unet", {"Unet": "dim 16"}, {"torch": 1.0, "pfunc pf.grad": pf_time}, extras)
    (goal,) = [g for g in report.goals([row], "cpu") if g.text.startswith("Unet step")]
    assert goal.status == status and f"time {pf_time:.3f}" in goal.evidence and f"{pf_peak} vs 204 MB" in goal.evidence


@pytest.mark.parametrize("ratio, status", [(1 / 6.5, "met"), (1 / 5.5, "not met")])
def test_the_ensemble_grad_goal_needs_six_times_at_32(ratio, status):
    medians = {"torch loop": 1.0, "pfunc ensemble.grad_and_value": ratio, "pfunc vmap(pf.grad)": 0.3}
    rows = [_timed("ensembles", {"N": n}, medians) for n in ("8", "32")]
    (goal,) = [g for g in report.goals(rows, "cpu") if g.text.startswith("pf.ensemble.grad_and_value")]
    assert goal.status == status and f"({1 / ratio:.1f}x faster)" in goal.evidence


def test_the_pf_grad_goals_count_only_rows_that_have_the_variant():
    rows = [
        _timed("layers", {"pass": "fwd"}, {"floor": 1.0, "pfunc": 1.0, "torch": 1.0}),
        _timed("layers", {"pass": "fwd+bwd"}, {"floor": 1.0, "pfunc": 1.0, "torch": 1.0, "pfunc pf.grad": 1.12}),
    ]
    (goal,) = [g for g in report.goals(rows, "cpu") if g.text.startswith("pf.grad within")]
    assert goal.status == "not met (0 of 1 rows)" and "fwd+bwd 1.12" in goal.evidence


def test_torch_vmap_route_is_reported():
    notes = ensembles.notes(SMOKE)
    assert notes and all(isinstance(n, str) and n for n in notes)


def test_a_disagreeing_variant_fails_the_check():
    x = torch.ones(3)
    c = Comparison(
        family="demo",
        labels={"op": "double"},
        variants={"right": Variant(lambda: 2 * x), "wrong": Variant(lambda: 2 * x + 1e-3)},
        reference="right",
        ratios=(("wrong", "right"),),
    )
    with pytest.raises(MismatchError, match="'wrong' differs from 'right'"):
        c.check()


def test_a_ratio_naming_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        Comparison("demo", {}, {"a": Variant(lambda: 1)}, "a", (("a", "b"),))


def test_peak_memory_counts_tensors_alive_at_once():
    def step():
        a = torch.empty(1024, 1024)  # 4 MiB
        b = torch.empty(1024, 1024)  # 4 MiB, both alive
        del a, b
        c = torch.empty(512, 1024)  # 2 MiB
        return c

    peak = unet.peak_memory_bytes(step, torch.device("cpu"))
    assert 8 * 2**20 <= peak < 9 * 2**20


def test_runner_writes_cpu_section_and_keeps_gpu_section(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "sizes_for", lambda device, quick: SMOKE)
    out = tmp_path / "BENCHMARKS.md"
    threads = torch.get_num_threads()
    try:
        assert run.main(["--only", "caching,power_iteration", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = out.read_text()
    assert "<!-- BEGIN cpu -->" in text and "<!-- END cpu -->" in text
    assert "Not yet measured" in text  # the GPU placeholder
    assert "| pfunc / torch cached |" in text and "| pfunc vmap / pfunc loop |" in text
    power_goals = [line for line in text.splitlines() if line.startswith("| vmapped power iteration at most 1.05x")]
    assert len(power_goals) == 2                                 # against the fastest; against vmap of the floor
    assert not any("not measured" in goal for goal in power_goals)  # judged on the power_iteration rows
    assert "the main job's step at least as fast as denoising-diffusion-pytorch's" in text
    gpu = "<!-- BEGIN cuda -->\n## CUDA results\nmeasured elsewhere\n<!-- END cuda -->\n"
    notes = "<!-- BEGIN notes -->\nhand-written analysis\n<!-- END notes -->\n"
    out.write_text(text.replace(text[text.index("<!-- BEGIN cuda -->"):], gpu) + notes)
    try:
        assert run.main(["--only", "power_iteration", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    again = out.read_text()
    assert "measured elsewhere" in again and "hand-written analysis" in again
    assert "pfunc / torch cached" not in again  # the CPU section was rewritten for the new run


@pytest.mark.parametrize(
    "name", ["timing", "comparison", "sizes", "twins", "report", "machine"]
)
def test_docstring_examples_run(name):
    module = importlib.import_module(f"benchmarks.{name}")
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0
