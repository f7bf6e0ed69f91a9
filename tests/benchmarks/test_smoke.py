"""CI smoke of the benchmark suite: on tiny sizes every compared pair gives equal results,
the runner writes its report, and the checks can fail. No timing is asserted."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from benchmarks import caching, compiled, ensembles, layers, power_iteration, report, run, unet
from benchmarks.comparison import Comparison, MismatchError, Variant
from benchmarks.sizes import SMOKE

EAGER_FAMILIES = {
    "layers": layers,
    "caching": caching,
    "ensembles": ensembles,
    "power_iteration": power_iteration,
}


@pytest.mark.parametrize("family", sorted(EAGER_FAMILIES))
def test_every_variant_of_every_row_equals_the_reference(family):
    labels = set()
    for comparison in EAGER_FAMILIES[family].comparisons(SMOKE):
        comparison.check()
        labels.add(tuple(comparison.labels.values()))
    expected = {"layers": 2 * 5 * 2 * 2, "caching": 2, "ensembles": len(SMOKE.ensemble_sizes), "power_iteration": len(SMOKE.power_iterations)}
    assert len(labels) == expected[family]  # model x parametrization x mode x pass for layers


@pytest.mark.skipif(not unet.available(), reason="examples/diffusion/unet.py not present")
def test_unet_step_pfunc_equals_torch_parametrize():
    (comparison,) = unet.comparisons(SMOKE)
    comparison.check()


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
    # rows with different variants (func.grad only on the MLP) share one table
    text = report.table([c.untimed() for c in rows])
    assert "pfunc func.grad compiled" in text.splitlines()[0] and len(text.splitlines()) == 4


@pytest.mark.slow
def test_every_compiled_row_agrees_with_inductor():
    for comparison in compiled.comparisons(SMOKE):
        comparison.check()


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
