"""The spectral-norm GAN: scores, spectral norm on every layer type, logged singular values, and that it learns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from examples.gan import train as gan_train
from examples.gan.data import grid, mixture, ring
from examples.gan.metrics import mode_coverage
from pfunc.spectral import singular_values


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
        return im.size


# ---------------------------------------------------------------------------------- the 2-D score
def test_mode_coverage_of_real_data_is_full_and_of_one_mode_is_one():
    mog = grid(5)
    x, y = mog.sample(5000, torch.Generator().manual_seed(0))
    full = mode_coverage(x, mog, y)
    assert (full.modes_hit, full.num_modes) == (25, 25)
    # within 3 std of the centre of a 2-D Gaussian: P(chi2_2 <= 9) = 1 - exp(-4.5) = 0.989, the ceiling
    assert full.high_quality == pytest.approx(1 - torch.exp(torch.tensor(-4.5)).item(), abs=0.006)
    assert full.on_label == full.high_quality
    collapsed = mog.centers[7].expand(500, 2) + 0.01 * torch.randn(500, 2)
    one = mode_coverage(collapsed, mog)
    assert one.modes_hit == 1 and one.counts[7] == 500 and one.on_label is None
    wrong_label = mode_coverage(collapsed, mog, torch.zeros(500, dtype=torch.long))
    assert wrong_label.high_quality == 1.0 and wrong_label.on_label == 0.0


def test_mode_coverage_counts_only_samples_within_three_std_and_modes_with_enough_of_them():
    mog = ring(8, std=0.1)
    near = mog.centers[0] + torch.tensor([[0.29, 0.0]] * 30)   # 2.9 std away: high quality
    far = mog.centers[1] + torch.tensor([[0.31, 0.0]] * 30)    # 3.1 std away: not
    few = mog.centers[2] + torch.zeros(19, 2)                  # high quality, but below min_count
    cov = mode_coverage(torch.cat([near, far, few]), mog, min_count=20)
    assert cov.counts[:3] == [30, 0, 19]
    assert cov.modes_hit == 1
    assert cov.high_quality == pytest.approx(49 / 79)


def test_mode_coverage_and_mixture_errors_name_the_problem():
    with pytest.raises(ValueError, match="samples must have shape"):
        mode_coverage(torch.zeros(4, 3), ring(8))
    with pytest.raises(ValueError, match="labels must have shape"):
        mode_coverage(torch.zeros(4, 2), ring(8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown 2-D data set 'spiral'"):
        mixture("spiral")


# ---------------------------------------------------------------------------------- the networks
def _args(*extra):
    return gan_train._resolve(gan_train._parser().parse_args(list(extra)))


def test_biggan_spectral_norm_is_on_every_linear_and_embedding_weight_of_the_2d_discriminator():
    args = _args("--data", "ring8", "--num-svs", "3", "--num-itrs", "2", "--sn-eps", "1e-6")
    task = gan_train.make_task(args, torch.device("cpu"))
    gan = gan_train.build(task.generator, task.discriminator, z_dim=task.z_dim, num_classes=task.num_classes,
                          num_svs=3, num_itrs=2, sn_eps=1e-6, sn_generator=False, lr_g=1e-3, lr_d=1e-3,
                          betas=(0.0, 0.999), seed=0, device=torch.device("cpu"))
    layers = {name: gan.D.module.get_submodule(name.rpartition(".")[0]) for name in gan.D.chains}
    assert {type(m) for m in layers.values()} == {nn.Linear, nn.Embedding}
    weights = {n for n, p in gan.D.module.named_parameters() if p.ndim >= 2}
    assert set(gan.D.chains) == weights
    for name in gan.D.chains:
        sn = gan.D.chains[name][0]
        assert (sn.mode, sn.num_svs, sn.n_power_iterations, sn.eps) == ("biggan", 3, 2, 1e-6)
    assert not gan.G.chains  # off by default on the 2-D data


def test_training_logs_the_singular_values_that_spectral_norm_keeps_in_state(tmp_path):
    args = _args("--data", "grid25", "--num-svs", "2")
    task = gan_train.make_task(args, torch.device("cpu"))
    gan = gan_train.build(task.generator, task.discriminator, z_dim=task.z_dim, num_classes=task.num_classes,
                          num_svs=2, num_itrs=1, sn_eps=1e-8, sn_generator=True, lr_g=1e-3, lr_d=1e-3,
                          betas=(0.0, 0.999), seed=0, device=torch.device("cpu"))
    assert all(torch.equal(sv, torch.ones(2)) for sv in singular_values(gan.D, gan.d_state).values())
    history = gan_train.train(gan, task.draw_real, steps=6, batch=32, d_steps=2, seed=0,
                              device=torch.device("cpu"), log_every=3)
    assert history["step"] == [3, 6]
    last = singular_values(gan.D, gan.d_state)
    for name, sv in last.items():
        rows = history["singular_values"][f"D {name}"]
        assert len(rows) == 2 and rows[-1] == [float(s) for s in sv]
        assert rows[0] != [1.0, 1.0]  # they moved off their initial ones
    assert set(history["singular_values"]) == {f"D {n}" for n in gan.D.chains} | {f"G {n}" for n in gan.G.chains}


# ---------------------------------------------------------------------------------- end to end
def test_ring8_short_run_covers_the_modes_and_writes_pngs_in_its_own_run_folder(tmp_path, capsys):
    metrics = gan_train.main(["--data", "ring8", "--steps", "500", "--batch", "128", "--log-every", "250",
                              "--eval-samples", "1000", "--min-count", "10", "--results-dir", str(tmp_path)])
    final = metrics["final"]
    assert final["modes_hit"] >= 6, final
    assert final["high_quality"] > 0.05, final  # untrained: about 0
    assert final["on_label"] is not None and final["on_label"] > 0.05
    run = Path(metrics["run_folder"])
    assert run.parent == tmp_path and run.name.endswith("_ring8")
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["final"]["modes_hit"] == final["modes_hit"]
    assert _png_size(run / "samples.png") == (800, 640)
    assert _png_size(run / "singular_values.png") == (900, 500)
    assert _png_size(run / "spectrum.png") == (900, 500)
    err = capsys.readouterr().err
    assert "gan ring8: 100% 500/500" in err and "d_loss=" in err  # the progress lines, with time left
    assert "<00:00" in err


def test_shapes_tiny_config_puts_spectral_norm_on_conv_linear_and_embedding_and_scores_with_the_judge(tmp_path):
    metrics = gan_train.main(["--data", "shapes", "--steps", "3", "--batch", "8", "--log-every", "3",
                              "--image-size", "8", "--width", "8", "--z-dim", "8", "--train-size", "64",
                              "--judge-steps", "2", "--eval-samples", "16", "--results-dir", str(tmp_path)])
    final = metrics["final"]
    assert {"fcd", "fcd_real_data", "fcd_noise", "recognised", "recognised_real_data", "on_label"} <= set(final)
    layers = {name.split(" ", 1)[1] for name in metrics["singular_values"] if name.startswith("D ")}
    assert layers == {"body.0.weight", "body.2.weight", "head.weight", "embed.weight"}
    assert any(name.startswith("G ") for name in metrics["singular_values"])  # on by default for images
    # one row of 8 per class, 8x8 images scaled 3x, 2 pixels of padding
    assert _png_size(Path(metrics["run_folder"]) / "samples.png") == (8 * 26 + 2, 5 * 26 + 2)


def test_two_runs_write_two_folders_and_never_overwrite(tmp_path):
    tiny = ["--data", "ring8", "--steps", "2", "--batch", "8", "--log-every", "1", "--eval-samples", "16",
            "--results-dir", str(tmp_path)]
    first = Path(gan_train.main(tiny)["run_folder"])
    written = {p.name: p.read_bytes() for p in first.iterdir()}
    second = Path(gan_train.main(tiny)["run_folder"])
    assert first != second and sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])
    assert {p.name: p.read_bytes() for p in first.iterdir()} == written


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
        (["--lr-g", "nan"], "argument --lr-g: 'nan' is not a finite number"),
        (["--lr-d", "inf"], "argument --lr-d: 'inf' is not a finite number"),
        (["--beta1", "1"], r"argument --beta1: must be in \[0, 1\)"),
        (["--seed", "-1"], r"argument --seed: must be in \[0, 2\*\*62\)"),
        (["--seed", str(2**63)], r"argument --seed: must be in \[0, 2\*\*62\)"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "argument --device"),
        (["--data", "shapes", "--image-size", "12"], "argument --image-size: must be 4 \\* 2\\*\\*k"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_flags_are_a_two_line_error_before_any_folder_exists(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        gan_train.main([*flags, "--results-dir", str(tmp_path / "runs")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1] == "(see python -m examples.gan.train --help)"
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "runs").exists()


def test_a_results_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --results-dir: the results folder .*file is a file, not a folder$"):
        gan_train.main(["--steps", "1", "--results-dir", str(tmp_path / "file")])
