"""examples/arguments.py: the argparse types refuse NaN, infinities, out-of-range numbers and unknown devices."""

from __future__ import annotations

import argparse

import pytest
import torch

from examples import arguments as A


@pytest.mark.parametrize(
    "kind, good, bad",
    [
        (A.positive_int, {"1": 1, "42": 42}, ["0", "-1", "1.5", "nan", "", "1e3"]),
        (A.non_negative_int, {"0": 0, "7": 7}, ["-1", "x"]),
        (A.seed, {"0": 0, str(2**62 - 1): 2**62 - 1}, ["-1", str(2**62), str(2**63), str(2**64)]),
        (A.finite_float, {"-2.5": -2.5, "1e-3": 1e-3}, ["nan", "inf", "-inf", "NaN", "x", ""]),
        (A.positive_float, {"3e-4": 3e-4}, ["0", "-1", "nan", "inf"]),
        (A.non_negative_float, {"0": 0.0, "0.5": 0.5}, ["-0.1", "nan", "inf"]),
        (A.unit_interval, {"0": 0.0, "0.999": 0.999}, ["1", "-0.1", "nan"]),
    ],
)
def test_number_types_take_what_they_promise_and_refuse_the_rest(kind, good, bad):
    for text, value in good.items():
        assert kind(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


def test_device_takes_cpu_and_refuses_what_this_machine_lacks():
    assert A.device("cpu") == torch.device("cpu")
    for text in ("gpu", "", "cpu:x"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a torch device"):
            A.device(text)
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device"):
            A.device("cuda")
    with pytest.raises(argparse.ArgumentTypeError):
        A.device("meta")


def test_parser_errors_are_two_lines_not_the_whole_usage(capsys):
    p = A.ArgumentParser(prog="prog")
    for i in range(30):
        p.add_argument(f"--flag-{i}", type=A.positive_int, default=1, help="a flag among many")
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--flag-3", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["prog: error: argument --flag-3: must be at least 1, got 0",
                                                    "(see prog --help)"]


def test_help_shows_each_default_once_and_plain_backticks(capsys):
    p = A.ArgumentParser(prog="prog", description="Trains with ``torch.func``.")
    p.add_argument("--seed", type=A.seed, default=0, help="the seed")
    p.add_argument("--lr", type=A.positive_float, default=3e-3, help="learning rate (default 3e-3 for Adam)")
    p.add_argument("--steps", type=A.positive_int, default=None, help="steps (default per data set)")
    p.add_argument("--flag", action="store_true", help="a switch")
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Trains with `torch.func`." in out
    assert "the seed (default: 0)" in out and "a switch --" not in out and "a switch (default" not in out
    assert out.count("default") == 3  # seed's, and the two the helps already state
