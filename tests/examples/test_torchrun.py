"""examples/torchrun.py: what torchrun's environment says, read strictly; a plain process is left alone."""

import doctest
import sys

import pytest

from examples import torchrun
from examples.torchrun import Launch, LaunchError, backend_reason, launch_from_env, silenced

FULL = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}


def test_a_plain_process_has_no_launch_and_torchruns_variables_give_one():
    assert launch_from_env({"LOCAL_RANK": "0"}) is None  # a stray LOCAL_RANK alone is not a launch
    launch = launch_from_env(FULL)
    assert launch == Launch(rank=3, world_size=4, local_rank=1, local_world_size=2) and not launch.is_writer
    assert launch_from_env({**FULL, "RANK": "0"}).is_writer


@pytest.mark.parametrize(
    "change, message",
    [
        ({"MASTER_PORT": None}, "the environment sets RANK but not MASTER_PORT: launch several processes with torchrun"),
        ({"RANK": None}, "the environment sets WORLD_SIZE but not RANK"),
        ({"RANK": "x"}, "the environment variable RANK='x' is not a non-negative integer"),
        ({"RANK": "-1"}, "RANK='-1' is not a non-negative integer"),
        ({"RANK": "4"}, "RANK 4, WORLD_SIZE 4, LOCAL_RANK 1, LOCAL_WORLD_SIZE 2 do not fit together"),
        ({"LOCAL_RANK": "2"}, "do not fit together"),
        ({"LOCAL_WORLD_SIZE": "8"}, "do not fit together"),
    ],
)
def test_an_incomplete_or_inconsistent_environment_is_one_clear_error(change, message):
    env = {k: v for k, v in {**FULL, **change}.items() if v is not None}
    with pytest.raises(LaunchError) as e:
        launch_from_env(env)
    assert message in str(e.value)


def test_a_backends_failure_is_said_in_a_few_words():
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:11409. "
                        "This is typically caused by a remote worker crashing.\nmore")
    assert backend_reason(gloo) == "Connection closed by peer [127.0.0.1]:11409"
    wrapped = ValueError("outer")
    wrapped.__cause__ = RuntimeError("Timed out waiting 5000ms for recv operation to complete")
    assert backend_reason(wrapped) == "Timed out waiting 5000ms for recv operation to complete"


def test_silenced_swallows_what_a_non_writer_rank_would_repeat(capsys):
    with silenced(True):
        print("repeated")
        print("repeated", file=sys.stderr)
    with silenced(False):
        print("said")
    out = capsys.readouterr()
    assert out.out == "said\n" and out.err == ""


def test_the_module_docstring_example_runs():
    result = doctest.testmod(torchrun)
    assert result.attempted and not result.failed
