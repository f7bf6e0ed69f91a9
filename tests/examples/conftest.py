"""Fixtures shared by the diffusion example's tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP threads stall badly on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
