"""``python -m benchmarks.diffusion_quality`` and item 10: the main job against denoising-diffusion-pytorch."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import diffusion_quality, reference_diffusion
from benchmarks.comparison import Comparison, Variant

TINY_BUDGET = ["--steps", "2", "--samples", "6", "--sampling-steps", "2", "--train-seeds", "0", "--sampling-seeds", "0,1"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_each_arm_trains_scores_every_sampling_seed_and_a_second_run_reuses_the_results(tmp_path, capsys, one_thread):
    out = tmp_path / "q"
    assert diffusion_quality.main(["--arms", "classic,classic+mem_kv", *TINY_BUDGET, "--out", str(out)]) == 0
    result = json.loads((out / "classic+mem_kv-seed0.json").read_text())
    assert result["options"]["num_mem_kv"] == 4 and result["steps"] == 2 and len(result["scores"]) == 2
    assert all(s["fcd"] > 0 and sum(s["class_counts"]) == 6 for s in result["scores"])
    printed = capsys.readouterr().out
    assert "| classic |" in printed and "| classic+mem_kv |" in printed
    # a second run with the same budget trains nothing (no judge, no arm), and prints the same table
    assert diffusion_quality.main(["--arms", "classic,classic+mem_kv", *TINY_BUDGET, "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert "judge trained" not in again and "training seed 0:" not in again
    assert again.strip().splitlines()[-2:] == printed.strip().splitlines()[-2:]


def test_a_result_of_another_budget_or_a_broken_file_is_refused_naming_it(tmp_path, capsys, one_thread):
    out = tmp_path / "q"
    assert diffusion_quality.main(["--arms", "classic", *TINY_BUDGET, "--out", str(out)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        diffusion_quality.main(["--arms", "classic", *TINY_BUDGET, "--steps", "3", "--out", str(out)])
    assert e.value.code == 2
    assert "classic-seed0.json holds a run of --steps 2 --samples 6 --sampling-steps 2 --sampling-seeds 0,1, not this command's" in capsys.readouterr().err
    (out / "classic-seed0.json").write_text('{"steps": 2')      # truncated
    with pytest.raises(SystemExit):
        diffusion_quality.main(["--arms", "classic", *TINY_BUDGET, "--out", str(out)])
    assert "classic-seed0.json is not a result this command wrote (JSONDecodeError" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--arms", "classic,newest"], "--arms: unknown arm 'newest'"),
    (["--arms", "classic@steps=3"], "--arms: classic@steps=3: 'steps=3' is not FIELD=VALUE"),
    (["--arms", "classic@lr=x"], "--arms: classic@lr=x: lr must be a float, got 'x'"),
    (["--arms", "classic@objective=pred_y"], "--arms: classic@objective=pred_y: --objective must be one of"),
    (["--arms", ""], "--arms: give at least one of"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--samples", "1"], "--samples must be at least 2"),
    (["--sampling-steps", "1000"], "--sampling-steps must be below the 1000 training timesteps"),
    (["--train-seeds", "-1"], "--train-seeds and --sampling-seeds must be non-empty lists of non-negative integers"),
    (["--sampling-seeds", "x"], "expected comma-separated integers like 0,1,2, got 'x'"),
    (["--arms", "ddpm", "--reference", "/nonexistent"], "--arms ddpm: /nonexistent: holds no denoising_diffusion_pytorch"),
])
def test_bad_flags_are_one_line_naming_the_flag(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        diffusion_quality.main([*argv, "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()                           # nothing written


def test_the_table_gives_each_arms_mean_over_every_run(tmp_path):
    for seed, fcds in ((0, [10.0, 20.0]), (1, [30.0, 40.0])):
        scores = [{"sampling_seed": i, "fcd": f, "class_counts": [100, 100, 100, 100, 100]} for i, f in enumerate(fcds)]
        (tmp_path / f"modern-seed{seed}.json").write_text(json.dumps({"seed": seed, "scores": scores, "final_loss": 0.03}))
    row = diffusion_quality.table(tmp_path).splitlines()[-1]
    assert row.startswith("| modern | s0: 15.0, s1: 35.0 | **25.0** | 15.0-35.0 | 100 / 100 / 100 | 0.0300 |")


def test_a_variant_timed_beside_the_others_but_not_checked_may_differ():
    x = torch.ones(3)
    c = Comparison(family="demo", labels={"op": "double"},
                   variants={"right": Variant(lambda: 2 * x), "other": Variant(lambda: 3 * x, checked=False)},
                   reference="right", ratios=(("other", "right"),))
    c.check()                                                        # no MismatchError


def test_item_10_needs_the_benchmarks_extra_and_otherwise_yields_no_row():
    rows = list(reference_diffusion.comparisons(None))
    if not reference_diffusion.available():
        assert rows == []
        pytest.skip("denoising-diffusion-pytorch is not installed (pip install -e \".[benchmarks]\"): item 10's row is not built")
    (row,) = rows
    row.check()                                                      # the modern layout's step equals the package's


def test_the_readme_table_is_what_the_committed_results_give():
    """The main job's README shows the comparison's table as ``--table`` prints it from the results in the
    repository, not typed by hand."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    expected = diffusion_quality.table(repo / "benchmarks" / "diffusion_quality_runs")
    readme = (repo / "examples" / "diffusion" / "README.md").read_text()
    assert expected in readme
    assert expected.count("\n") + 1 == 2 + len(diffusion_quality.TABLE_ORDER)   # every arm shown, with 3 seeds each
    assert all(row.count("s0:") and row.count("s2:") for row in expected.splitlines()[2:])


def test_arms_predict_the_noise_unless_their_name_says_otherwise_whatever_the_presets_default():
    diffusion_quality.ARMS.update(diffusion_quality._arms())
    assert diffusion_quality.config(0, 10).objective == "pred_noise"
    assert diffusion_quality.arm("modern").training == {}
    assert diffusion_quality.arm("modern@objective=pred_v").training == {"objective": "pred_v"}
    assert diffusion_quality.arm("classic").options["weight_standardization"] is True
    assert diffusion_quality.arm("modern").options["weight_standardization"] is False
