"""Shared test fixtures."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tiny networks gain nothing from intra-op threads, and the in-process dask worker runs
    # two tasks at once: one thread each avoids oversubscribing a 2-core CI machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    yield
    torch.set_num_threads(old)
