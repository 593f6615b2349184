"""Fixtures shared by the backend tests."""

import pytest
import torch


@pytest.fixture
def poisoned_empty():
    """New tensors (outputs, the split-K workspace) start as NaN, so an output
    element that a kernel fails to write shows in the result."""
    old = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0], warn_only=old[1])
    torch.utils.deterministic.fill_uninitialized_memory = old[2]
