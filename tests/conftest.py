"""Shared test set-up: one intra-op thread (the CI machine has two cores and tests may run
beside other work) and a fixed global seed so failures reproduce."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture
def noise_registry() -> Iterator[None]:
    """Snapshot the global noise registries (theory's kinds, layers' modules, functions and
    methods) and restore them afterwards, so a test that registers its own noise leaves no
    trace for the tests after it."""
    from varshift.layers import registry
    from varshift.theory import noise

    saved = (
        dict(noise._KINDS),
        dict(registry._MODULES),
        dict(registry._FUNCTIONS),
        set(registry._METHODS),
    )
    try:
        yield
    finally:
        for live, copy in zip((noise._KINDS, registry._MODULES, registry._FUNCTIONS), saved):
            live.clear()
            live.update(copy)  # type: ignore[attr-defined]
        registry._METHODS.clear()
        registry._METHODS.update(saved[3])
