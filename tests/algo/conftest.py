"""Shared fixtures for tests/algo: a fixed RNG state, and one intra-op thread (the tensors are
tiny; on a shared 2-core machine thread spin-waiting costs more than it saves)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_single_thread():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
