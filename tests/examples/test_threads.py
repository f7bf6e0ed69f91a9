"""examples/threads.py: torch keeps to the idle cores unless --threads says otherwise."""

import os

import pytest
import torch

from examples.threads import choose_threads


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_a_busy_machine_runs_on_its_idle_cores_and_says_so_unless_threads_is_given(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    for load in (9.0, 1.7):
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        torch.set_num_threads(2)
        note = choose_threads(None)
        assert torch.get_num_threads() == 1
        assert note == (f"note: this machine is busy (load average {load:.1f} on 2 cores): running on 1 thread instead of "
                        "torch's 2, which is many times faster when other processes compete for the cores "
                        "(--threads 2 to use them anyway)")
    torch.set_num_threads(2)
    assert choose_threads(2) is None and torch.get_num_threads() == 2     # --threads is obeyed
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 1.0, 1.0))
    assert choose_threads(None) is None and torch.get_num_threads() == 2  # idle cores keep torch's default
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 1.0, 1.0))
    torch.set_num_threads(16)
    assert "running on 13 threads instead of torch's 16" in choose_threads(None) and torch.get_num_threads() == 13


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


def test_an_unknown_load_leaves_torchs_threads(monkeypatch):
    def unknown():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unknown)
    torch.set_num_threads(2)
    assert choose_threads(None) is None and torch.get_num_threads() == 2
