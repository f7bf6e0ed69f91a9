"""examples/threads.py: torch keeps to the cores idle at start-up (measured over a short window, not the
load average's minutes-long memory) unless --threads says otherwise."""

import os

import pytest
import torch

import examples.threads as threads
from examples.threads import choose_threads, cpu_times, idle_cores


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _stat(idle: int, busy: int) -> str:
    """A /proc/stat first line: user nice system idle iowait irq softirq steal guest guest_nice."""
    return f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"


def _snapshots(tmp_path, monkeypatch, *lines):
    """Make threads.cpu_times read these /proc/stat contents in turn (real files, the real parser)."""
    files = []
    for i, text in enumerate(lines):
        files.append(tmp_path / f"stat{i}")
        files[-1].write_text(text)
    it = iter(files)
    monkeypatch.setattr(threads, "cpu_times", lambda: cpu_times(str(next(it))))


def test_a_load_average_left_by_an_earlier_job_does_not_cut_the_threads_of_idle_cores(tmp_path, monkeypatch):
    # the README's install-then-train command: pip leaves the 1-minute load average at 5, the cores are idle now
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 3.0, 1.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    _snapshots(tmp_path, monkeypatch, _stat(1000, 500), _stat(1100, 501))  # 100 of 101 ticks idle over the window
    torch.set_num_threads(2)
    assert choose_threads(None) is None and torch.get_num_threads() == 2


def test_a_machine_busy_during_the_window_runs_on_its_idle_cores_and_says_so_unless_threads_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # the load average has not caught up yet
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    _snapshots(tmp_path, monkeypatch, _stat(1000, 500), _stat(1050, 550))  # one of the two cores busy
    torch.set_num_threads(2)
    assert choose_threads(None) == (
        f"note: this machine is busy (1.0 of 2 cores idle over the last {threads.WINDOW_S:g} s): running on 1 thread instead "
        "of torch's 2, which is many times slower when other processes compete for the cores (--threads 2 to use them anyway)")
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert choose_threads(2) is None and torch.get_num_threads() == 2     # --threads is obeyed, nothing measured
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    _snapshots(tmp_path, monkeypatch, _stat(0, 0), _stat(1300, 300))      # 13 of 16 cores idle
    torch.set_num_threads(16)
    assert "running on 13 threads instead of torch's 16" in choose_threads(None) and torch.get_num_threads() == 13


def test_without_proc_stat_the_load_average_decides_and_without_either_torchs_default_stays(monkeypatch):
    monkeypatch.setattr(threads, "cpu_times", lambda: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.7, 1.0, 1.0))
    torch.set_num_threads(2)
    assert "running on 1 thread" in choose_threads(None) and torch.get_num_threads() == 1

    def unknown():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", unknown)
    torch.set_num_threads(2)
    assert choose_threads(None) is None and torch.get_num_threads() == 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_the_real_measurement_is_a_share_of_this_machines_cores():
    idle, total = cpu_times()
    assert 0 <= idle <= total
    assert 0.0 <= idle_cores(0.05) <= (os.cpu_count() or 1) + 1e-9
