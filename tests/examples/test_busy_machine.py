"""examples/busy_machine.py: advice only when the load is above the core count and the user chose no thread count."""

import torch

from examples import busy_machine
from examples.busy_machine import busy_machine_advice


def test_advice_only_on_a_busy_machine_with_several_threads_not_chosen(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(busy_machine.os, "cpu_count", lambda: 2)
        monkeypatch.setattr(busy_machine.os, "getloadavg", lambda: (6.3, 5.0, 4.0))
        advice = busy_machine_advice(threads=None)
        assert advice is not None and "load 6.3 on 2 cores" in advice and "--threads 1" in advice
        assert busy_machine_advice(threads=2) is None  # the user chose
        monkeypatch.setattr(busy_machine.os, "getloadavg", lambda: (1.9, 5.0, 4.0))
        assert busy_machine_advice(threads=None) is None  # not busy now
        torch.set_num_threads(1)
        monkeypatch.setattr(busy_machine.os, "getloadavg", lambda: (6.3, 5.0, 4.0))
        assert busy_machine_advice(threads=None) is None  # one thread does not stall

        def unknown():
            raise OSError("no load average here")

        torch.set_num_threads(2)
        monkeypatch.setattr(busy_machine.os, "getloadavg", unknown)
        assert busy_machine_advice(threads=None) is None
    finally:
        torch.set_num_threads(threads)
