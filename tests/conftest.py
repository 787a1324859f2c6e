"""Shared test set-up: one intra-op thread (the CI machine has two cores and tests may run
beside other work) and a fixed global seed so failures reproduce."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)
