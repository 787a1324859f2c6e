"""An endless one-shot iterator that counts what was taken from it: the test double for "an
endless generator passed as data", shared by the budget tests of batches, measure and recalibrate.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

CEILING = 10_000  # batches it yields before it gives up: a test that ignores a budget fails


class CountingBatches:
    """Yields ``make_batch()`` forever (up to :data:`CEILING`, then fails rather than hang);
    ``taken`` is the number of batches read so far."""

    def __init__(self, make_batch: Callable[[], Any]) -> None:
        self.make_batch = make_batch
        self.taken = 0
        self._numbers = itertools.count()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self.taken = next(self._numbers) + 1
        if self.taken > CEILING:
            raise AssertionError(f"read {self.taken} batches of an endless iterator")
        return self.make_batch()
