"""The sampling command: a new timestamped folder per call with the grid, optional single images and a
JSON of the settings, the checkpoint's step and SHA-256 and the score; the run's own files never
change; the same seed gives the same images; every bad flag or file is one line before any work;
Ctrl-C leaves nothing behind."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from examples.diffusion import sample, train
from examples.diffusion.train_args import sample_command


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--channels", "1", "--attn-heads", "2",
    "--attn-dim-head", "8", "--resnet-block-groups", "4", "--batch-size", "4", "--train-size", "32",
    "--sampling-steps", "2", "--num-samples", "4", "--eval-samples", "0", "--timesteps", "50",
    "--ema-after", "0", "--seed", "11",
]
HINT = f"({sample_command()} --help explains every flag)"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step tiny run (in-process) whose EMA differs from its params."""
    root = tmp_path_factory.mktemp("run")
    assert train.main([*TINY, "--steps", "3", "--results-dir", str(root)]) == 0
    (folder,) = list(root.iterdir())
    return folder


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        im.load()
        return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, -1)


def _sample(argv, out: Path) -> Path:
    """Run the command into ``out`` and return the one new folder it made."""
    before = set(out.iterdir()) if out.exists() else set()
    assert sample.main([*argv, "--out", str(out)]) == 0
    (new,) = set(out.iterdir()) - before
    return new


def test_it_writes_a_new_timestamped_folder_with_grid_images_and_settings_and_never_touches_the_run(run, capsys):
    before = _snapshot(run)
    assert sample.main([str(run), "--num-samples", "5", "--save-each", "--seed", "3"]) == 0
    out = capsys.readouterr()
    (folder,) = list((run / "samples").iterdir())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_steps2_eta1", folder.name)
    assert sorted(p.name for p in folder.iterdir()) == ["images", "samples.png", "sampling.json"]
    assert sorted(p.name for p in (folder / "images").iterdir()) == [f"0000{i}.png" for i in range(5)]
    settings = json.loads((folder / "sampling.json").read_text())
    assert settings["checkpoint_sha256"] == hashlib.sha256((run / "checkpoint.pt").read_bytes()).hexdigest()
    assert settings["checkpoint"] == str((run / "checkpoint.pt").resolve())
    assert (settings["step"], settings["num_samples"], settings["sampling_steps"], settings["ddim_eta"], settings["seed"]) == (3, 5, 2, 1.0, 3)
    assert (settings["sampler"], settings["weights"], settings["score"], settings["batch_size"]) == ("ddim", "ema", None, 500)
    assert f"wrote {folder}: samples.png, images/, sampling.json" in out.out
    assert "sample: 100% 2/2" in out.err                      # the progress, as plain lines in a log
    assert _snapshot(run) == before                           # the run's own files are untouched
    shutil.rmtree(run / "samples")


def test_the_same_seed_gives_the_same_images_and_another_seed_others(run, tmp_path):
    a = _sample([str(run), "--seed", "7", "--save-each", "--num-samples", "3"], tmp_path)
    b = _sample([str(run / "checkpoint.pt"), "--seed", "7", "--save-each", "--num-samples", "3"], tmp_path)
    c = _sample([str(run), "--seed", "8", "--save-each", "--num-samples", "3"], tmp_path)
    assert a != b
    for i in range(3):
        name = f"images/0000{i}.png"
        assert torch.equal(_pixels(a / name), _pixels(b / name))
        assert not torch.equal(_pixels(a / name), _pixels(c / name))
    assert torch.equal(_pixels(a / "samples.png"), _pixels(b / "samples.png"))


def test_the_training_runs_own_samples_are_seed_plus_three_at_batch_500(run, tmp_path):
    folder = _sample([str(run), "--seed", str(11 + 3), "--num-samples", "4", "--batch-size", "500"], tmp_path)
    assert torch.equal(_pixels(folder / "samples.png"), _pixels(run / "samples.png"))


def test_ema_is_the_default_and_no_ema_samples_the_raw_params(run, tmp_path):
    ema = _sample([str(run), "--seed", "1"], tmp_path)
    raw = _sample([str(run), "--seed", "1", "--no-ema"], tmp_path)
    assert json.loads((raw / "sampling.json").read_text())["weights"] == "params"
    assert not torch.equal(_pixels(ema / "samples.png"), _pixels(raw / "samples.png"))


def test_as_many_steps_as_the_timesteps_is_ddpm_and_one_step_ddim_works(run, tmp_path):
    ddpm = _sample([str(run), "--sampling-steps", "50", "--num-samples", "2"], tmp_path)
    assert ddpm.name.endswith("_steps50_eta1")
    assert json.loads((ddpm / "sampling.json").read_text())["sampler"] == "ddpm"
    one = _sample([str(run), "--sampling-steps", "1", "--ddim-eta", "0", "--num-samples", "2"], tmp_path)
    assert one.name.endswith("_steps1_eta0")


def test_score_gives_the_fcd_with_its_brackets(run, tmp_path):
    folder = _sample([str(run), "--score", "--num-samples", "16"], tmp_path)
    score = json.loads((folder / "sampling.json").read_text())["score"]
    assert score["metric"] == "fcd" and score["n"] == 16
    assert score["real"]["fcd"] < score["noise"]["fcd"] and score["samples"]["fcd"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    (["--sampling-steps", "0"], "--sampling-steps must be a positive integer, got 0"),
    (["--sampling-steps", "51"], "--sampling-steps 51 exceeds the run's --timesteps 50"),
    (["--ddim-eta", "nan"], "--ddim-eta must be a number in [0, 1], got nan"),
    (["--ddim-eta", "inf"], "--ddim-eta must be a number in [0, 1], got inf"),
    (["--ddim-eta", "1.5"], "--ddim-eta must be a number in [0, 1], got 1.5"),
    (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
    (["--seed", str(2**63)], "--seed must be in [0, 2**63), got 9223372036854775808"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--score", "--num-samples", "1"], "--score needs --num-samples of at least 2"),
    (["--out", ""], "--out must name a folder, got ''"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--num-samples", str(10**13)], "--num-samples 10000000000000 needs "),
    (["--num-samples", "many"], "argument --num-samples: invalid int value: 'many'"),
])
def test_bad_flags_are_one_line_naming_the_flag_before_any_work(run, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        sample.main([str(run), *argv, "--out", str(tmp_path / "out")] if "--out" not in argv else [str(run), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("error: ") and message in err.splitlines()[0] and err.splitlines()[1:] == [HINT]
    assert not (tmp_path / "out").exists() and not (run / "samples").exists()


def test_the_memory_check_names_the_flag_and_the_sizes(run, capsys, tmp_path):
    with pytest.raises(SystemExit):
        sample.main([str(run), "--num-samples", str(10**13), "--out", str(tmp_path / "out")])
    need = 10**13 * 1 * 8 * 8 * 4 / 2**30          # images of the run: 1 channel, 8x8, float32
    assert f"--num-samples 10000000000000 needs {need:.1f} GiB for its images alone, more than half of this machine's" \
        in capsys.readouterr().err


def test_bad_checkpoints_and_folders_are_one_line_naming_them(run, capsys, tmp_path):
    def refused(argv, message):
        assert sample.main(argv) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"error: {message}"] or message in err, err
        assert len(err.strip().splitlines()) == 1, err

    refused([str(tmp_path / "missing")], f"checkpoint '{tmp_path / 'missing'}' does not exist")
    (tmp_path / "empty").mkdir()
    refused([str(tmp_path / "empty")], f"'{tmp_path / 'empty'}' is a folder without a checkpoint.pt")
    (tmp_path / "odd" / "checkpoint.pt").mkdir(parents=True)
    refused([str(tmp_path / "odd")], f"'{tmp_path / 'odd' / 'checkpoint.pt'}' is a folder, not a checkpoint file")
    blob = (run / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    refused([str(tmp_path / "cut.pt")], "is truncated or has trailing bytes")
    (tmp_path / "out").write_text("a file")
    refused([str(run), "--out", str(tmp_path / "out")], f"--out '{tmp_path / 'out'}' is a file, not a folder")
    assert not (run / "samples").exists()


def test_a_read_only_run_folder_is_refused_with_the_out_advice_and_out_works(run, capsys, tmp_path, make_read_only):
    ro = tmp_path / "run"
    shutil.copytree(run, ro)
    make_read_only(ro)
    assert sample.main([str(ro)]) == 1
    err = capsys.readouterr().err
    assert f"error: the run's samples folder '{ro / 'samples'}': its parent '{ro}' is not writable" in err
    assert "pass --out DIR to write the samples elsewhere" in err and len(err.strip().splitlines()) == 1
    _sample([str(ro), "--num-samples", "2"], tmp_path / "elsewhere")


def test_help_explains_every_flag():
    parser = sample.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, f"{action.option_strings or action.dest} has no real help"
        for opt in action.option_strings:
            if not opt.startswith("--no-"):
                assert opt in text
    assert "RUN_OR_CHECKPOINT" in text and "DDIM (Song et al.)" in text


def test_ctrl_c_while_sampling_leaves_nothing_behind(run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "examples.diffusion.sample", str(run), "--out", str(out),
                             "--num-samples", "3000", "--sampling-steps", "49", "--batch-size", "100"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (out.exists() and any(out.iterdir())):   # the hidden work folder appears once sampling starts
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text
    assert "SIGINT: stopped while sampling; nothing was written" in text and "Traceback" not in text
    assert list(out.iterdir()) == []
