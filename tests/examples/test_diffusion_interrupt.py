"""examples/diffusion/interrupt.py: the first Ctrl-C (or SIGTERM) is a request the loop reads between
steps, acknowledged at once (even while the main thread waits in a collective), or a stop at once inside
an ``at_once`` phase; the second Ctrl-C stops at once, and the previous handlers come back afterwards."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from examples.diffusion.interrupt import TRAINING, StopNow, StopRequest, Stopped

REPO = Path(__file__).resolve().parents[2]


def test_the_first_signal_is_a_request_and_the_second_ctrl_c_stops_at_once():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        stop.check()                                  # nothing asked yet: no exception
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT" and stop.exit_status == 130
        with pytest.raises(Stopped, match="SIGINT"):
            stop.check()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_is_a_request_too_with_its_own_exit_status():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM" and stop.exit_status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_inside_an_at_once_phase_the_first_signal_raises_stop_now_and_is_acknowledged_with_what_it_does(capfd):
    with StopRequest() as stop:
        with pytest.raises(StopNow) as e:
            with stop.phase("stopping the sampling now", at_once=True):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)   # the handler raises in the main thread at once
        assert e.value.exit_status == 143 and stop.doing == TRAINING
        with pytest.raises(StopNow):   # a phase entered after the signal stops at once too
            with stop.phase("compiling", at_once=True):
                pass
    assert capfd.readouterr().err == "\nSIGTERM received: stopping the sampling now\n"


_WAITING_RANK = r"""
import sys, time, torch, torch.distributed as dist
from examples.diffusion.interrupt import StopRequest
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
if rank == 1:
    time.sleep(5)          # rank 0 waits in the collective meanwhile
with StopRequest() as stop:
    print("waiting", flush=True)
    dist.all_reduce(torch.ones(1))
    print("returned", stop.signal_name, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_a_signal_is_acknowledged_at_once_while_the_main_thread_waits_in_a_collective(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WAITING_RANK, str(rank), str(tmp_path / "store")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        assert procs[0].stdout.readline().strip() == "waiting"
        time.sleep(0.5)
        sent = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].stdout.readline() == "\n"
        line = procs[0].stdout.readline().strip()
        assert time.monotonic() - sent < 3.0, "acknowledged only when the collective returned"
        assert line.startswith("SIGTERM received: ")
        assert procs[0].stdout.readline().strip() == "returned SIGTERM"   # the flag was set: the loop would stop
    finally:
        for p in procs:
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [0, 0]
