"""Hypothesis strategies shared by the property tests of theory and layers."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def mostly(
    valid: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """``valid`` four times in five, else ``anything``: every example has a fair chance of
    reaching the computation instead of stopping at the first bad argument."""
    return st.integers(0, 4).flatmap(lambda i: anything if i == 0 else valid)
