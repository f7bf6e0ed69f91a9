"""The training CLI: bad values fail before any work with a message naming the flag; a bad or
mismatched checkpoint is refused (never a silent restart); --help documents every flag."""

import json

import pytest
import torch

from examples.diffusion.checkpoint import load_checkpoint, save_checkpoint
from examples.diffusion.config import PRESETS, TrainConfig
from examples.diffusion.data import draw_shapes
from examples.diffusion.train import build_parser, main, resolve_device
from examples.plotting import save_image_grid


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py


TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--channels", "1", "--attn-heads", "2",
    "--attn-dim-head", "8", "--resnet-block-groups", "4", "--batch-size", "4", "--train-size", "32",
    "--sampling-steps", "2", "--num-samples", "4", "--eval-samples", "0", "--timesteps", "50",
]


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
        (["--resnet-block-groups", "3"], "--resnet-block-groups 3 must divide every level width"),
        (["--batch-size", "64"], "--batch-size 64 is larger than --train-size 32"),
        (["--epochs", "-1"], "--epochs must be positive"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--eval-samples", "1"], "--eval-samples must be 0 (no quality score) or at least 2"),
        (["--dim-mults", "1,x"], "expected comma-separated integers"),
    ],
)
def test_bad_values_fail_before_any_work_naming_the_flag(argv, message, capsys, tmp_path):
    err = _fails([*TINY, *argv], capsys, tmp_path)
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
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
        main(["--resume", str(finished_run), "--dim", "16", "--objective", "pred_v", "--steps", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--dim: checkpoint 8, now 16" in err and "--objective: checkpoint 'pred_noise', now 'pred_v'" in err
    assert "--steps" not in err.split("differs")[-1]  # a run option may change


def test_resume_from_a_checkpoint_of_another_model_is_refused(finished_run, capsys, tmp_path):
    ckpt = load_checkpoint(finished_run / "checkpoint.pt")
    ckpt["config"]["dim"] = 16  # the config now disagrees with the command line ...
    save_checkpoint(tmp_path / "other.pt", ckpt)
    with pytest.raises(SystemExit):
        main(["--resume", str(tmp_path / "other.pt"), "--dim", "8"])
    assert "--dim: checkpoint 16, now 8" in capsys.readouterr().err
    # ... and without flags, the tensors do not fit the model the config describes
    assert main(["--resume", str(tmp_path / "other.pt")]) == 1
    assert "do not fit this model" in capsys.readouterr().err


def test_truncated_checkpoint_on_resume_is_an_error_not_a_fresh_start(finished_run, capsys, tmp_path):
    blob = (finished_run / "checkpoint.pt").read_bytes()
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(blob[: len(blob) - 100])
    assert main(["--resume", str(bad), "--results-dir", str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err
    assert "truncated" in err and "Refusing to start from scratch" in err
    assert sorted(p.name for p in bad.iterdir()) == ["checkpoint.pt"] and not (tmp_path / "results").exists()


def test_missing_checkpoint_on_resume_is_an_error(capsys, tmp_path):
    assert main(["--resume", str(tmp_path / "nothing_here")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_preset_with_resume_is_refused(finished_run, capsys):
    with pytest.raises(SystemExit):
        main(["--resume", str(finished_run), "--preset", "gpu"])
    assert "--preset cannot be combined with --resume" in capsys.readouterr().err


def test_folder_dataset_trains_and_scores_by_nearest_neighbour(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    x, _ = draw_shapes(8, 12, 3, torch.Generator().manual_seed(0))
    for i in range(8):
        save_image_grid(images / f"{i}.png", x[i : i + 1], nrow=1, padding=0)
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
