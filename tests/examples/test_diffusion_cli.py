"""The training CLI: every bad value fails before any work and before the run folder exists, with one
line naming the flag (exit 2) or the file or folder (exit 1); a bad or mismatched checkpoint is
refused (never a silent restart); a finished run is not re-sampled; --help documents every flag."""

import json
import os

import pytest
import torch
from PIL import Image

from examples.diffusion.checkpoint import load_checkpoint, save_checkpoint
from examples.diffusion.config import PRESETS, TrainConfig
from examples.diffusion.data import draw_shapes, image_extensions
from examples.diffusion.train import build_parser, main, resolve_device
from examples.diffusion.train_args import sample_command, train_command


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py


TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--channels", "1", "--attn-heads", "2",
    "--attn-dim-head", "8", "--resnet-block-groups", "4", "--batch-size", "4", "--train-size", "32",
    "--sampling-steps", "2", "--num-samples", "4", "--eval-samples", "0", "--timesteps", "50",
]


HINT = f"({train_command()} --help explains every flag)"


def _fails(argv, capsys, tmp_path, code=2):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--results-dir", str(tmp_path / "results")])
    assert e.value.code == code
    assert not (tmp_path / "results").exists(), "a run folder was created before the error"
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "-4"], "--batch-size must be a positive integer, got -4"),
        (["--steps", "0"], "--steps must be a positive integer"),
        (["--image-size", "9"], "--image-size 9 is not divisible by 2"),
        (["--image-size", "10", "--dim-mults", "1,2,2"], "--image-size 10 is not divisible by 4, the Unet's downsampling factor"),
        (["--dataset", "folder", "--data-dir", "/nonexistent/images"], "--data-dir '/nonexistent/images' does not exist"),
        (["--dataset", "folder"], "--dataset folder needs --data-dir"),
        (["--device", "tpu:3"], "--device 'tpu:3'"),
        (["--device", "banana"], "--device 'banana' is not a device"),
        (["--sampling-steps", "60"], "--sampling-steps 60 exceeds --timesteps 50"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
        (["--channels", "2"], "--channels must be 1 or 3"),
        (["--ddim-eta", "2"], "--ddim-eta must be in [0, 1]"),
        (["--timesteps", "20", "--beta-schedule", "linear", "--sampling-steps", "5"], "--timesteps must be above 20"),
        (["--layout", "classic", "--resnet-block-groups", "3"], "--resnet-block-groups 3 must divide every level width"),
        (["--batch-size", "64"], "--batch-size 64 is larger than --train-size 32"),
        (["--epochs", "-1"], "--epochs must be a positive, finite number, got -1.0"),
        (["--epochs", "nan"], "--epochs must be a positive, finite number, got nan"),
        (["--epochs", "inf"], "--epochs must be a positive, finite number, got inf"),
        (["--seed", str(2**63)], "--seed must be in [0, 2**63), got 9223372036854775808"),
        (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number, got nan"),
        (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
        (["--max-grad-norm=-inf"], "--max-grad-norm must be a finite number, got -inf"),
        (["--ddim-eta", "nan"], "--ddim-eta must be a finite number, got nan"),
        (["--ddim-eta", "inf"], "--ddim-eta must be a finite number, got inf"),
        (["--ema-decay", "nan"], "--ema-decay must be a finite number, got nan"),
        (["--ema-decay", "inf"], "--ema-decay must be a finite number, got inf"),
        (["--data-dir", ""], "--data-dir must name a folder, got ''"),
        (["--dataset", "folder", "--data-dir", ""], "--data-dir must name a folder, got ''"),
        (["--compile-backend", "no_such_backend"], "--compile-backend 'no_such_backend' is not a registered torch.compile backend"),
        pytest.param(["--compile", "--compile-backend", "inductr"], "--compile-backend 'inductr' is not a registered torch.compile backend",
                     marks=pytest.mark.compile),  # below torch 2.6, --compile itself is refused first
        (["--train-size", str(10**12)], "--train-size 1000000000000 needs"),
        (["--eval-samples", str(10**12)], "--num-samples 4 / --eval-samples 1000000000000 needs"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--eval-samples", "1"], "--eval-samples must be 0 (no quality score) or at least 2"),
        (["--dim-mults", "1,x"], "expected comma-separated integers"),
        (["--layout", "newest"], "argument --layout: invalid choice: 'newest'"),
    ],
)
def test_bad_values_fail_before_any_work_naming_the_flag(argv, message, capsys, tmp_path):
    err = _fails([*TINY, *argv], capsys, tmp_path)
    assert message in err
    # one line of error and one line of usage hint, not the whole usage
    assert err.splitlines() == [f"error: {err.splitlines()[0][len('error: '):]}", HINT]
    assert "usage:" not in err


def test_an_unknown_or_malformed_flag_prints_the_error_and_a_one_line_hint(capsys, tmp_path):
    for argv, message in ((["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                          (["--steps", "many"], "argument --steps: invalid int value: 'many'")):
        err = _fails(argv, capsys, tmp_path)
        assert err.splitlines() == [f"error: {message}", HINT]


def test_results_dir_empty_is_a_flag_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--results-dir", ""])
    assert e.value.code == 2 and "--results-dir must name a folder, got ''" in capsys.readouterr().err


def _refused(argv, capsys):
    """Run main; it must return 1 (a file or folder problem) with a one-line error."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_results_dir_that_is_a_file_or_under_one_is_refused_before_any_work(capsys, tmp_path):
    f = tmp_path / "results"
    f.write_text("a file, not a folder")
    err = _refused([*TINY, "--results-dir", str(f)], capsys)
    assert f"error: --results-dir '{f}' is a file, not a folder" in err
    err = _refused([*TINY, "--results-dir", str(f / "runs")], capsys)
    assert f"--results-dir '{f / 'runs'}' is under '{f}', which is a file, not a folder" in err
    assert f.read_text() == "a file, not a folder" and sorted(os.listdir(tmp_path)) == ["results"]


def test_results_dir_on_a_read_only_folder_is_refused_before_any_work(capsys, tmp_path, make_read_only):
    (tmp_path / "ro").mkdir()
    ro = make_read_only(tmp_path / "ro")
    err = _refused([*TINY, "--results-dir", str(ro / "results")], capsys)
    assert f"error: --results-dir '{ro / 'results'}': its parent '{ro}' is not writable" in err
    err = _refused([*TINY, "--results-dir", str(ro)], capsys)
    assert f"error: --results-dir '{ro}' is not writable" in err
    assert os.listdir(ro) == []


def test_cuda_requested_without_cuda_is_refused(capsys, tmp_path):
    assert "CUDA is not available" in _fails([*TINY, "--device", "cuda"], capsys, tmp_path)


def test_auto_device_is_the_first_cuda_device_else_cpu():
    assert resolve_device("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    assert resolve_device("cpu") == torch.device("cpu")


def test_help_explains_every_flag():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--") and not opt.startswith("--no-"):
                assert opt in text
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, f"{action.option_strings} has no real help"
    assert "cpu preset" in text and "gpu preset" in text


def test_presets_are_valid_configs():
    from examples.diffusion.config import validate

    for name, preset in PRESETS.items():
        validate(TrainConfig(**{**preset, "compile": False}))   # --compile depends on the torch: next test


def test_compile_on_a_torch_that_cannot_compile_the_step_is_refused_naming_the_flag(monkeypatch):
    import pfunc
    from examples.diffusion import config

    cfg = TrainConfig(**PRESETS["gpu"])
    assert cfg.compile
    monkeypatch.setattr(pfunc, "COMPILE_MIN_TORCH", "99.0")
    with pytest.raises(config.ConfigError, match=r"--compile needs torch >= 99.0 \(this is torch "):
        config.validate(cfg)
    config.validate(TrainConfig(**{**PRESETS["gpu"], "compile": False}))


# ------------------------------------------------------------------------------ resume refusals
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step tiny run (in-process)."""
    root = tmp_path_factory.mktemp("run")
    assert main([*TINY, "--steps", "3", "--results-dir", str(root)]) == 0
    (run,) = list(root.iterdir())
    return run


def test_tiny_run_writes_every_output(finished_run):
    for name in ("checkpoint.pt", "samples.png", "loss.png", "data.png", "metrics.json", "losses.jsonl"):
        assert (finished_run / name).is_file(), name
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["config"]["dim"] == 8 and metrics["final_loss"] > 0
    ckpt = load_checkpoint(finished_run / "checkpoint.pt")
    assert set(ckpt) >= {"params", "state", "ema", "optimizer", "step", "rng", "config"}
    assert (finished_run / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_with_a_different_model_flag_names_every_difference(finished_run, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(finished_run), "--dim", "16", "--objective", "pred_noise", "--steps", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dim: checkpoint 8, now 16" in err and "--objective: checkpoint 'pred_v', now 'pred_noise'" in err
    assert "--steps" not in err.split("differs")[-1]  # a run option may change


def test_a_checkpoint_from_before_the_layout_flag_resumes_in_the_classic_layout_it_was_trained_in(capsys, tmp_path):
    # trained as every run was before the flags: classic layout, weight standardization on
    assert main([*TINY, "--layout", "classic", "--weight-standardization", "--steps", "2", "--results-dir", str(tmp_path / "runs")]) == 0
    (run,) = list((tmp_path / "runs").iterdir())
    ckpt = load_checkpoint(run / "checkpoint.pt")
    del ckpt["config"]["layout"], ckpt["config"]["weight_standardization"]   # as written before the flags existed
    save_checkpoint(run / "checkpoint.pt", ckpt)
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(run), "--layout", "modern", "--steps", "3"])
    assert e.value.code == 2 and "--layout: checkpoint 'classic', now 'modern'" in capsys.readouterr().err
    assert main(["--resume", str(run), "--steps", "3"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 3 and metrics["config"]["layout"] == "classic"


def test_both_layouts_train_with_or_without_weight_standardization_and_the_modern_one_needs_no_group_count(tmp_path):
    for layout, standardize, extra in (("modern", False, ["--resnet-block-groups", "3"]), ("modern", True, []), ("classic", True, [])):
        root = tmp_path / f"{layout}-{standardize}"
        flag = "--weight-standardization" if standardize else "--no-weight-standardization"
        assert main([*TINY, "--layout", layout, flag, *extra, "--steps", "2", "--results-dir", str(root)]) == 0
        (run,) = list(root.iterdir())
        params = load_checkpoint(run / "checkpoint.pt")["params"]
        assert any(k.endswith("mem_kv") for k in params) == (layout == "modern")
        assert any("parametrizations" in k for k in params) == standardize


def test_resume_from_a_checkpoint_of_another_model_is_refused(finished_run, capsys, tmp_path):
    ckpt = load_checkpoint(finished_run / "checkpoint.pt")
    ckpt["config"]["dim"] = 16  # the config now disagrees with the command line ...
    save_checkpoint(tmp_path / "other.pt", ckpt)
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path / "other.pt"), "--dim", "8"])
    assert "--dim: checkpoint 16, now 8" in capsys.readouterr().err
    # ... and without flags, the tensors do not fit the model the config describes
    assert main(["--resume", str(tmp_path / "other.pt")]) == 1
    assert "the checkpoint does not fit this model" in capsys.readouterr().err


def test_truncated_checkpoint_on_resume_is_an_error_not_a_fresh_start(finished_run, capsys, tmp_path):
    blob = (finished_run / "checkpoint.pt").read_bytes()
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(blob[: len(blob) - 100])
    assert main(["--resume", str(bad), "--results-dir", str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and "refusing to start from scratch" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in bad.iterdir()) == ["checkpoint.pt"] and not (tmp_path / "results").exists()


def test_missing_checkpoint_on_resume_is_an_error(capsys, tmp_path):
    assert main(["--resume", str(tmp_path / "nothing_here")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_folder_where_the_checkpoint_should_be_is_named_as_such(capsys, tmp_path):
    (tmp_path / "run" / "checkpoint.pt").mkdir(parents=True)
    err = _refused(["--resume", str(tmp_path / "run")], capsys)
    assert f"'{tmp_path / 'run' / 'checkpoint.pt'}' is a folder, not a checkpoint file" in err
    err = _refused(["--resume", str(tmp_path / "run" / "checkpoint.pt")], capsys)
    assert "is a folder, not a checkpoint file" in err


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_resuming_a_finished_run_changes_nothing_and_says_how_to_sample(finished_run, capsys):
    before = _snapshot(finished_run)
    assert main(["--resume", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert f"{finished_run} is already trained to step 3: nothing to train, nothing written" in out
    assert f"{sample_command()} {finished_run}" in out and "wrote" not in out
    assert _snapshot(finished_run) == before and not (finished_run / "samples").exists()
    assert main(["--resume", str(finished_run), "--steps", "3"]) == 0
    assert _snapshot(finished_run) == before


def test_resuming_with_fewer_steps_than_done_is_a_flag_error(finished_run, capsys):
    before = _snapshot(finished_run)
    with pytest.raises(SystemExit) as e:
        main(["--resume", str(finished_run), "--steps", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--steps 2 is below the checkpoint's step 3: a run cannot train backwards" in err
    assert _snapshot(finished_run) == before


def test_resuming_a_run_whose_folder_became_read_only_is_refused_before_any_work(finished_run, capsys, tmp_path, make_read_only):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    make_read_only(run)
    err = _refused(["--resume", str(run), "--steps", "5"], capsys)
    assert f"error: cannot resume: the run folder '{run}' is not writable" in err
    assert "a resumed run writes its checkpoint and log there" in err
    assert _snapshot(run) == before


def test_preset_with_resume_is_refused(finished_run, capsys):
    with pytest.raises(SystemExit):
        main(["--resume", str(finished_run), "--preset", "gpu"])
    assert "--preset cannot be combined with --resume" in capsys.readouterr().err


def _image_folder(tmp_path, n=8):
    images = tmp_path / "images"
    images.mkdir()
    x, _ = draw_shapes(n, 12, 3, torch.Generator().manual_seed(0))
    for i in range(n):
        pixels = (x[i] * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    return images


def test_folder_dataset_trains_and_scores_by_nearest_neighbour(tmp_path):
    images = _image_folder(tmp_path)
    argv = list(TINY)
    argv[argv.index("--eval-samples") + 1] = "4"
    assert main([*argv, "--dataset", "folder", "--data-dir", str(images), "--epochs", "1",
                 "--results-dir", str(tmp_path / "results")]) == 0
    (run,) = list((tmp_path / "results").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 2  # one epoch of 8 images in batches of 4
    q = metrics["quality"]
    assert q["metric"] == "nn_rms" and q["real"]["nn_rms"] > 0 and q["noise"]["nn_rms"] > q["real"]["nn_rms"]
    assert metrics["config"]["data_dir"] == str(images)


def test_resume_accepts_the_same_data_dir_given_as_a_relative_path(tmp_path, monkeypatch, capsys):
    images = _image_folder(tmp_path)
    argv = [*TINY, "--dataset", "folder", "--data-dir", str(images)]
    assert main([*argv, "--steps", "2", "--results-dir", str(tmp_path / "results")]) == 0
    (run,) = list((tmp_path / "results").iterdir())
    monkeypatch.chdir(tmp_path)
    assert main(["--resume", str(run), "--dataset", "folder", "--data-dir", "images", "--steps", "3"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3
    with pytest.raises(SystemExit):   # another folder is still a difference
        main(["--resume", str(run), "--data-dir", "elsewhere", "--steps", "4"])
    assert f"--data-dir: checkpoint '{images}', now '{tmp_path / 'elsewhere'}'" in capsys.readouterr().err


def test_a_malformed_image_in_the_data_is_refused_by_name_or_skipped_with_a_count(tmp_path, capsys):
    images = _image_folder(tmp_path, n=9)
    blob = bytearray((images / "3.png").read_bytes())
    blob[blob.index(b"IDAT") + 6] ^= 0xFF   # a byte of the IDAT data: its CRC no longer matches
    (images / "3.png").write_bytes(bytes(blob))
    argv = [*TINY, "--dataset", "folder", "--data-dir", str(images), "--steps", "1", "--results-dir", str(tmp_path / "results")]
    err = _refused(argv, capsys)
    assert f"error: {images / '3.png'} cannot be decoded: broken PNG file" in err and "--skip-bad-images" in err
    assert not (tmp_path / "results").exists()
    assert main([*argv, "--skip-bad-images"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped {images / '3.png'} cannot be decoded" in err
    assert "warning: --skip-bad-images left out 1 of 9 image files" in err


# ------------------------------------------------------------------------------ issue 19: flags, the GPU preset, trial runs
@pytest.mark.parametrize("argv, line", [
    (["--step", "3"], "error: unrecognized arguments: --step 3 (--step: did you mean --steps?)"),   # no prefix matching
    (["--stpes", "3"], "error: unrecognized arguments: --stpes 3 (--stpes: did you mean --steps?)"),
    (["--image-size", "2", "--dim-mults", "1"],
     "error: --image-size must be at least 4 for --dataset shapes (the smallest the shapes are drawn at), got 2"),
    (["--compile", "--compile-backend", ""], "error: --compile-backend must name a torch.compile backend (e.g. inductor), got ''"),
])
def test_prefixes_misspellings_a_too_small_image_and_an_empty_backend_are_one_line_each(argv, line, capsys, tmp_path):
    assert _fails([*TINY, *argv], capsys, tmp_path).splitlines() == [line, HINT]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_the_gpu_preset_on_a_machine_without_a_gpu_is_refused_in_one_line_unless_the_cpu_is_asked_for(capsys, tmp_path):
    err = _fails(["--preset", "gpu"], capsys, tmp_path)
    assert err.splitlines() == [
        "error: --preset gpu is sized for a GPU (35.7M params, 20000 steps of 128 images at 32px, bf16 + torch.compile) and "
        "this machine has no CUDA device: on the CPU it would run for days. Pass --device cpu to run it on the CPU anyway, "
        "or leave out --preset gpu for the CPU preset (minutes)", HINT]
    # --device cpu says the user means it: the preset runs (here shrunk by flags to finish in a second)
    small = ["--dim", "8", "--dim-mults", "1,2", "--attn-heads", "1", "--attn-dim-head", "8", "--resnet-block-groups", "4",
             "--train-size", "8", "--batch-size", "8", "--no-compile", "--steps", "1", "--num-samples", "1",
             "--sampling-steps", "2", "--eval-samples", "0"]
    assert main(["--preset", "gpu", "--device", "cpu", *small, "--results-dir", str(tmp_path / "results")]) == 0


def test_the_busy_machine_note_comes_only_after_every_check_passed(capsys, tmp_path, monkeypatch):
    import examples.threads as threads

    monkeypatch.setattr(threads, "idle_cores", lambda: 1.0, raising=False)   # a busy machine: one of two cores idle
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))             # (and what an older measure said)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _fails([*TINY, "--dataset", "folder", "--data-dir", str(empty)], capsys, tmp_path)
    assert err.splitlines() == [
        f"error: --data-dir: no images under {str(empty)!r} (files ending in .png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, "
        f".tiff, or one of the {len(image_extensions()) - 8} other extensions Pillow reads)", HINT]
    assert main([*TINY, "--steps", "1", "--results-dir", str(tmp_path / "results")]) == 0   # a run that starts says it
    assert "note: this machine is busy (1.0 of 2 cores idle" in capsys.readouterr().err


def test_a_trial_run_skips_the_score_says_how_to_get_it_and_the_closing_line_lists_every_file_written(capsys, tmp_path):
    argv = [a for a in TINY]
    del argv[argv.index("--eval-samples"):argv.index("--eval-samples") + 2]   # the preset's 500 scored samples
    assert main([*argv, "--steps", "3", "--results-dir", str(tmp_path / "results")]) == 0
    (run,) = list((tmp_path / "results").iterdir())
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["quality"] == {} and metrics["config"]["eval_samples"] == 500
    assert (f"no sample quality score for a trial run of 3 steps, where it says little (pass --eval-samples 500 to score "
            f"anyway); score this run with: {sample_command()} {run} --score --num-samples 500") in out
    closing = next(line for line in out.splitlines() if line.startswith(f"wrote {run}: "))
    listed = [name.split(" ")[0] for name in closing[len(f"wrote {run}: "):].split(" in ")[0].split(", ")]
    assert sorted(listed) == sorted(p.name for p in run.iterdir())
