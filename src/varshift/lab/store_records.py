"""The records and errors of the results store's public API: what a cell of a study must offer
(:class:`TrialLike`), a stored trial, where a trial ran, how far a study has got, and the
store's refusals. :mod:`varshift.lab.store` re-exports every name.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "ABANDONED",
    "StatusCounts",
    "StoreError",
    "StoredTrial",
    "StudyChangedError",
    "TrialLike",
    "WorkerInfo",
]

#: How the error of a trial failed by :meth:`~varshift.lab.store.ResultStore.recover` begins.
ABANDONED = "abandoned:"


class StoreError(RuntimeError):
    """The store refused an operation that would break its invariants (e.g. finishing a trial
    that is not running)."""


class StudyChangedError(ValueError):
    """A study's spec differs from the one stored for it, and extending was not asked for (or
    the new spec drops stored cells, which extending cannot do)."""


class TrialLike(Protocol):
    """What the store needs of one cell of a study (:class:`varshift.lab.study.TrialSpec`
    satisfies it; ``config`` is anything with ``to_dict()`` or a mapping)."""

    @property
    def arm(self) -> str: ...
    @property
    def axes(self) -> Mapping[str, Any]: ...
    @property
    def config(self) -> Any: ...
    @property
    def seed(self) -> int: ...
    @property
    def config_hash(self) -> str: ...


@dataclass(frozen=True)
class StoredTrial:
    """One row of the ``trials`` table, as the runner needs it (``attempts``: how many times a
    worker has started it)."""

    id: int
    study: str
    arm: str
    axes: dict[str, Any]
    config: dict[str, Any]
    config_hash: str
    seed: int
    status: str
    attempts: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.config_hash, self.seed)


@dataclass(frozen=True)
class WorkerInfo:
    """Where a trial ran and with which versions; recorded beside its result."""

    hostname: str
    pid: int
    varshift_version: str
    torch_version: str

    @classmethod
    def here(cls) -> WorkerInfo:
        """The current process (call it inside the worker that ran the trial)."""
        import torch

        from varshift import __version__

        return cls(socket.gethostname(), os.getpid(), __version__, str(torch.__version__))


@dataclass(frozen=True)
class StatusCounts:
    """Where a study (or one preset) stands, from
    :meth:`~varshift.lab.store.ResultStore.status_counts`.

    ``by_status``: trials per status (every status, 0 if none); ``attempts``: trials per
    number of attempts (an attempt is counted when a worker starts the trial; 0 = never
    started); ``abandoned``: failed trials whose driver died while running them as often as
    the attempt limit allows.
    """

    by_status: dict[str, int]
    attempts: dict[int, int]
    abandoned: int

    @property
    def total(self) -> int:
        return sum(self.by_status.values())

    def describe(self, max_attempts: int) -> str:
        """One line for people, e.g. ``6/8 done (6 done, 1 failed, 1 pending, 0 running);
        attempts 0:1 1:6 2:1 of at most 3; 1 abandoned at the limit``."""
        statuses = ", ".join(f"{count} {status}" for status, count in self.by_status.items())
        tried = " ".join(f"{tries}:{count}" for tries, count in self.attempts.items())
        line = f"{self.by_status.get('done', 0)}/{self.total} done ({statuses})"
        if tried:
            line += f"; attempts {tried} of at most {max_attempts}"
        if self.abandoned:
            line += f"; {self.abandoned} abandoned at the limit"
        return line
