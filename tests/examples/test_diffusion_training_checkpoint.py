"""A checkpoint with a valid digest is still checked in full before anything starts: every required
key with the right type, the config's values, tensor names, shapes and dtypes against the model,
the optimizer state against the params, the random streams. Each bad payload is one line naming the
field, exit 1, from both commands, and nothing is written."""

import copy

import pytest
import torch

from examples.diffusion import sample, train
from examples.diffusion.checkpoint import load_checkpoint, save_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/examples/conftest.py


TINY = [
    "--dim", "8", "--dim-mults", "1,2", "--image-size", "8", "--channels", "1", "--attn-heads", "2",
    "--attn-dim-head", "8", "--resnet-block-groups", "4", "--batch-size", "4", "--train-size", "32",
    "--sampling-steps", "2", "--num-samples", "4", "--eval-samples", "0", "--timesteps", "50",
]


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    assert train.main([*TINY, "--steps", "3", "--results-dir", str(root)]) == 0
    (run,) = list(root.iterdir())
    return load_checkpoint(run / "checkpoint.pt")


def _first(d):
    return next(iter(d))


def _set(path, value):
    def edit(p):
        *keys, last = path
        for k in keys:
            p = p[k]
        p[last] = value
    return edit


def _delete(path):
    def edit(p):
        *keys, last = path
        for k in keys:
            p = p[k]
        del p[last]
    return edit


CASES = {
    "params missing": (_delete(["params"]), "lacks 'params'"),
    "rng missing": (_delete(["rng"]), "lacks 'rng'"),
    "step a string": (_set(["step"], "3"), "'step' must be an integer, got str"),
    "step a float": (_set(["step"], 3.0), "'step' must be an integer, got float"),
    "step past the config's steps": (_set(["step"], 99), "'step' 99 is outside [0, 3] (the config's steps)"),
    "config not a dict": (_set(["config"], [1, 2]), "'config' must be a dict, got list"),
    "dim_mults not a sequence": (_set(["config", "dim_mults"], 5), "its config is invalid: --dim-mults must be a comma-separated list of positive integers, got 5"),
    "dim a string": (_set(["config", "dim"], "8"), "its config is invalid: --dim must be a positive integer, got '8'"),
    "lr not a number": (_set(["config", "lr"], "fast"), "its config is invalid: --lr must be a finite number, got 'fast'"),
    "lr nan": (_set(["config", "lr"], float("nan")), "its config is invalid: --lr must be a finite number, got nan"),
    "bf16 not a bool": (_set(["config", "bf16"], "no"), "its config is invalid: --bf16 must be true or false, got 'no'"),
    "config field missing": (_delete(["config", "objective"]), "its config is invalid: config has unknown fields [] and lacks fields ['objective']"),
    "params not a dict": (_set(["params"], [1.0]), "'params' must be a dict of tensors, got list"),
    "ema entry not a tensor": (lambda p: p["ema"].__setitem__(_first(p["ema"]), 1.0), "must be a tensor under a string key, got float"),
    "optimizer not a state_dict": (_set(["optimizer"], {"lr": 1}), "'optimizer' must be an optimizer state_dict"),
    "rng coin missing": (_delete(["rng", "coin"]), "'rng' lacks 'coin'"),
    "rng noise not bytes": (_set(["rng", "noise"], torch.zeros(3)), "rng['noise'] must be a generator state (1-D uint8 tensor), got torch.float32 tensor"),
    "rng perm not a permutation": (_set(["rng", "order", "perm"], torch.zeros(32, dtype=torch.int64)), "rng['order']['perm'] is not a permutation of 0..31"),
    "rng pos out of range": (_set(["rng", "order", "pos"], 99), "rng['order']['pos'] must be an integer in [0, 32], got 99"),
}

FIT_CASES = {
    "a param of another shape": (lambda p: p["params"].__setitem__("final_conv.weight", torch.zeros(1, 8, 1, 1, 1)),
                                 "params['final_conv.weight'] is torch.float32 (1, 8, 1, 1, 1), but this model's is torch.float32 (1, 8, 1, 1): the checkpoint does not fit this model"),
    "a param in float64": (lambda p: p["params"].__setitem__("final_conv.weight", p["params"]["final_conv.weight"].double()),
                           "params['final_conv.weight'] is torch.float64 (1, 8, 1, 1), but this model's is torch.float32 (1, 8, 1, 1)"),
    "a state tensor missing": (lambda p: p["state"].pop(_first(p["state"])) if p["state"] else p["state"].__setitem__("x", torch.zeros(1)),
                               "its state do not fit this model"),
    "an EMA tensor extra": (lambda p: p["ema"].__setitem__("extra.weight", torch.zeros(1)), "its EMA params do not fit this model: missing [], unexpected ['extra.weight']"),
    "optimizer moments of another shape": (lambda p: p["optimizer"]["state"][0].__setitem__("exp_avg", torch.zeros(2)),
                                           "optimizer state[0]['exp_avg']"),
    "optimizer over other params": (lambda p: p["optimizer"]["param_groups"][0].__setitem__("params", [0, 1]),
                                    "optimizer param_groups must be one group over params 0.."),
    "optimizer step not the checkpoint's": (lambda p: p["optimizer"]["state"][0].__setitem__("step", torch.tensor(2.0)),
                                            "optimizer state[0]['step'] is 2.0, the checkpoint's step is 3"),
    "NaN weights": (lambda p: p["ema"][_first(p["ema"])].fill_(float("nan")), "its ema hold NaN or infinite values"),
}


def _bad(payload, edit, tmp_path):
    bad = copy.deepcopy(payload)
    edit(bad)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "checkpoint.pt", bad)   # a valid digest: only the content is wrong
    return run


@pytest.mark.parametrize("case", sorted({**CASES, **FIT_CASES}))
def test_a_payload_with_a_valid_digest_is_checked_in_full_naming_the_field(case, payload, tmp_path, capsys):
    edit, message = {**CASES, **FIT_CASES}[case]
    run = _bad(payload, edit, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    assert train.main(["--resume", str(run), "--steps", "5"]) == 1
    err = capsys.readouterr().err
    assert message in err and f"checkpoint '{run / 'checkpoint.pt'}'" in err
    assert len(err.strip().splitlines()) == 1, err
    assert sample.main([str(run), "--out", str(tmp_path / "samples")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run.iterdir()) == before and not (tmp_path / "samples").exists()


def test_the_untouched_payload_passes_every_check(payload, tmp_path, capsys):
    run = _bad(payload, lambda p: None, tmp_path)
    assert train.main(["--resume", str(run), "--steps", "4"]) == 0
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 4
