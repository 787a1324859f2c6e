"""Shared test set-up: one intra-op thread (the CI machine has two cores and tests may run
beside other work) and a fixed global seed so failures reproduce."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture
def noise_registry() -> Iterator[None]:
    """Snapshot the global noise registries (theory's kinds; layers' modules, functions and
    methods; lint's mask groupings) and restore them afterwards, so a test that registers its
    own noise leaves no trace for the tests after it."""
    from varshift.diagnose import lint_predictions
    from varshift.layers import registry
    from varshift.theory import noise

    tables: list[Any] = [
        noise._KINDS,
        registry._MODULES,
        registry._FUNCTIONS,
        registry._METHODS,
        lint_predictions._GROUPINGS,
    ]
    saved = [table.copy() for table in tables]
    try:
        yield
    finally:
        for table, copy in zip(tables, saved):
            table.clear()
            table.update(copy)
