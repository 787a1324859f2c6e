"""The driver: expand a study, record every cell, run what is left on a backend, write results.

:func:`run_study` is the one writer of the results store. It checks every argument first (the
backend, Ray's presence, the study and its seeds), so that a mistake leaves no database behind;
then it holds the database's :class:`~varshift.lab.store.DriverLock` for the whole run, puts
back to ``pending`` whatever a dead driver left ``running``, registers the study's cells
(refusing a changed spec unless extending), claims at most ``backend.capacity`` trials at a
time, counts an attempt when a worker really starts one, and records each result in one
transaction as it arrives. A crash therefore loses at most the trials in flight, and they run
again on the next start; Ctrl-C cancels them and returns them to ``pending``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from varshift.lab.backends import (
    TrialFn,
    TrialOutcome,
    TrialTask,
    check_backend,
    make_backend,
)
from varshift.lab.results import one_line_reason
from varshift.lab.store import ResultStore
from varshift.lab.store_file import remove_database_files
from varshift.lab.store_records import StoredTrial, TrialLike
from varshift.lab.store_rows import check_cells

if TYPE_CHECKING:
    from varshift.lab.backends import Backend

__all__ = ["DEFAULT_DB", "DEFAULT_MAX_ATTEMPTS", "RunSummary", "StudyLike", "run_study"]

#: Where ``varshift lab run`` keeps results unless ``--db`` says otherwise: one file in the
#: current directory, shared by every study (they are told apart by name).
DEFAULT_DB = "varshift-lab.db"

#: How many times a trial may be started (a worker began it) before the driver dying during it
#: once more marks it failed ("abandoned") instead of re-queueing it. ``varshift lab status``
#: shows it beside :meth:`~varshift.lab.store.ResultStore.status_counts`.
DEFAULT_MAX_ATTEMPTS = 3


class StudyLike(Protocol):
    """What the driver needs of a study (:class:`varshift.lab.study.Study` satisfies it)."""

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def presets(self) -> Sequence[str]: ...
    def expand(self, preset: str) -> Sequence[TrialLike]: ...
    def spec_hash(self, preset: str) -> str: ...
    def reference_arm(self, preset: str) -> str: ...
    def spec(self, preset: str) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class RunSummary:
    """What one :func:`run_study` call did.

    ``done``/``failed``: trials finished in this run; ``skipped``: already done before it;
    ``not_retried``: failed earlier and left alone (pass ``retry_failed``); ``recovered``:
    trials a dead driver left running, put back to pending; ``abandoned``: such trials that hit
    the attempt limit and were marked failed. ``counts``: the preset's trials by status at the
    end. ``interrupted``: stopped by Ctrl-C; ``stopped_early``: stopped by ``fail_fast``.
    """

    study: str
    preset: str
    db_path: Path
    backend: str
    total: int
    done: int
    failed: int
    skipped: int
    not_retried: int
    recovered: int
    abandoned: int
    wall_time_s: float
    counts: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False
    stopped_early: bool = False

    @property
    def complete(self) -> bool:
        """Every trial of the preset is done."""
        return self.counts.get("done", 0) == self.total

    def describe(self) -> str:
        """One line for people."""
        state = " (interrupted)" if self.interrupted else ""
        state += " (stopped at the first failure)" if self.stopped_early else ""
        left = self.counts.get("pending", 0) + self.counts.get("running", 0)
        return (
            f"{self.study} [{self.preset}] on {self.backend}: {self.done} done, {self.failed} "
            f"failed, {self.skipped} already done, {self.not_retried} failed earlier, "
            f"{left} left; {self.counts.get('done', 0)}/{self.total} complete in "
            f"{self.wall_time_s:.1f} s{state} -> {self.db_path}"
        )


def _load_study(study: StudyLike | str | os.PathLike[str]) -> StudyLike:
    if isinstance(study, (str, os.PathLike)):
        from varshift.lab.study import load_study

        loaded: StudyLike = load_study(study if isinstance(study, str) else Path(study))
        return loaded
    return study


def _spec_record(study: StudyLike, preset: str) -> dict[str, Any]:
    """The study spec stored beside its hash (the hashed spec itself, plus what people need to
    read it: name, description, reference arm)."""
    return {
        "name": study.name,
        "description": study.description,
        "preset": preset,
        "reference_arm": study.reference_arm(preset),
        **study.spec(preset),
    }


def _print_above_bar(message: str, bar: Any) -> None:
    """Print a line on stderr without tearing the progress bar."""
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


@dataclass
class _Progress:
    """Counts of this run, and the bar that shows them."""

    bar: Any
    done: int = 0
    failed: int = 0

    def record(self, outcome: TrialOutcome, trial: StoredTrial) -> None:
        if outcome.result.status == "done":
            self.done += 1
        else:
            self.failed += 1
            _print_above_bar(
                f"trial {trial.id} failed: arm {trial.arm} seed {trial.seed}: "
                f"{one_line_reason(outcome.result.error)}",
                self.bar,
            )
        self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)


def _drive(
    store: ResultStore,
    backend: Backend,
    queue: list[tuple[StoredTrial, TrialLike]],
    progress: _Progress,
    in_flight: dict[int, StoredTrial],
    *,
    fail_fast: bool,
) -> bool:
    """Run ``queue`` to the end (or the first failure, with ``fail_fast``); True if stopped
    early. ``in_flight`` is kept current so that the caller can release it on any exit."""
    pending = list(reversed(queue))  # pop() from the end keeps the expansion order
    while pending or in_flight:
        while pending and len(in_flight) < backend.capacity:
            trial, spec = pending.pop()
            # Claimed, not yet an attempt: the backend's on_start counts it when it begins.
            if not store.claim(trial.id):  # only this driver writes, so this means a bug
                raise RuntimeError(f"trial {trial.id} could not be claimed; is it pending?")
            in_flight[trial.id] = trial
            backend.submit(TrialTask(trial.id, spec.config, trial.seed))
        outcome = backend.next_outcome()
        store.finish(outcome.trial_id, outcome.result, worker=outcome.worker)
        trial = in_flight.pop(outcome.trial_id)
        progress.record(outcome, trial)
        if fail_fast and outcome.result.status == "failed":
            return True
    return False


def run_study(
    study: StudyLike | str | os.PathLike[str],
    *,
    preset: str = "quick",
    db_path: str | os.PathLike[str] = DEFAULT_DB,
    backend: str = "local",
    workers: int = 1,
    retry_failed: bool = False,
    extend: bool = False,
    fail_fast: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
    ray_address: str | None = None,
    progress: bool = True,
    trial_fn: TrialFn | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    gpus_per_trial: float = 0.0,
) -> RunSummary:
    """Run every trial of ``study``'s ``preset`` that is not done yet, recording each in the
    results database ``db_path``; returns a :class:`RunSummary`.

    ``study`` is a :class:`~varshift.lab.study.Study`, a built-in study name or a TOML path.
    ``backend`` is ``"local"`` (sequential, in this process), ``"process"`` (``workers``
    persistent processes) or ``"ray"`` (Ray tasks; ``ray_address`` joins a cluster, else a
    local one with ``workers`` CPUs is started and stopped). Done trials are skipped; failed ones
    re-run only with ``retry_failed``; a study whose spec changed is refused unless ``extend``
    (new cells only). Trials a dead driver left running are re-queued, until one has been
    started ``max_attempts`` times. ``trial_fn`` replaces :func:`varshift.lab.trial.run_trial`
    (tests). Ctrl-C returns a summary with ``interrupted=True`` and the in-flight trials back
    to pending.

    Every argument, the backend's availability (Ray installed) and every cell of the study are
    checked before the database is touched; a database file this call created is removed again
    if the call fails before any trial was recorded.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
    check_backend(backend, workers=workers, trial_fn=trial_fn, gpus_per_trial=gpus_per_trial)
    loaded = _load_study(study)
    presets = list(loaded.presets)
    if preset not in presets:
        raise ValueError(
            f"study {loaded.name!r} has no preset {preset!r}; it has: {', '.join(presets)}"
        )
    specs = list(loaded.expand(preset))
    check_cells(loaded.name, specs)
    db = Path(db_path)
    created = not db.exists()
    start = time.perf_counter()
    run = _Progress(bar=None)
    try:
        with ResultStore(db) as store, store.lock():
            requeued, abandoned = store.recover(max_attempts=max_attempts)
            if requeued or abandoned:
                print(
                    f"recovered {requeued} trials left running by a driver that died"
                    + (f"; {abandoned} failed after {max_attempts} attempts" if abandoned else ""),
                    file=sys.stderr,
                )
            cells = _register(store, loaded, preset, specs, extend=extend, retry=retry_failed)
            queue = [(trial, spec) for trial, spec in cells if trial.status == "pending"]
            before = _count_status(trial for trial, _ in cells)
            interrupted = stopped_early = False
            if queue:
                interrupted, stopped_early = _run_queue(
                    store,
                    queue,
                    run,
                    name=f"{loaded.name} [{preset}]",
                    backend=backend,
                    workers=workers,
                    trial_fn=trial_fn,
                    data_dir=None if data_dir is None else os.fspath(data_dir),
                    ray_address=ray_address,
                    gpus_per_trial=gpus_per_trial,
                    fail_fast=fail_fast,
                    progress=progress,
                )
            counts = store.summary(loaded.name, preset)
    except BaseException:
        if created and run.done + run.failed == 0:
            _remove_new_database(db)
        raise
    return RunSummary(
        study=loaded.name,
        preset=preset,
        db_path=db,
        backend=backend,
        total=len(specs),
        done=run.done,
        failed=run.failed,
        skipped=before.get("done", 0),
        not_retried=before.get("failed", 0),
        recovered=requeued,
        abandoned=abandoned,
        wall_time_s=time.perf_counter() - start,
        counts=counts,
        interrupted=interrupted,
        stopped_early=stopped_early,
    )


def _register(
    store: ResultStore,
    study: StudyLike,
    preset: str,
    specs: Sequence[TrialLike],
    *,
    extend: bool,
    retry: bool,
) -> list[tuple[StoredTrial, TrialLike]]:
    """Record the preset's cells (re-queueing its failed trials if ``retry``) and return each
    stored trial beside its spec, in the study's order."""
    store.register(
        study.name, preset, study.spec_hash(preset), _spec_record(study, preset), specs,
        extend=extend,
    )
    if retry:
        store.reset_failed(study.name, preset)
    stored = {t.key: t for t in store.trials(study.name, preset)}
    return [(stored[(s.config_hash, int(s.seed))], s) for s in specs]


def _remove_new_database(db: Path) -> None:
    """Remove a database (and its lock file) that this run created but could not use, so that
    a failed first run leaves no empty file behind. The store and the lock are closed by now."""
    remove_database_files(db)
    Path(f"{db}.lock").unlink(missing_ok=True)


def _count_status(trials: Iterable[StoredTrial]) -> Mapping[str, int]:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    return counts


def _run_queue(
    store: ResultStore,
    queue: list[tuple[StoredTrial, TrialLike]],
    run: _Progress,
    *,
    name: str,
    backend: str,
    workers: int,
    trial_fn: TrialFn | None,
    data_dir: str | None,
    ray_address: str | None,
    gpus_per_trial: float,
    fail_fast: bool,
    progress: bool,
) -> tuple[bool, bool]:
    """Start the backend (only now: Ray is started only when there is work), drive the queue
    (counting into ``run``), and on any exit cancel what is in flight and return it to pending.
    Returns ``(interrupted, stopped_early)``."""
    from tqdm import tqdm

    in_flight: dict[int, StoredTrial] = {}
    interrupted = stopped_early = False
    bar = tqdm(total=len(queue), desc=name, unit="trial", file=sys.stderr, disable=not progress)
    run.bar = bar
    engine: Backend | None = None
    try:
        engine = make_backend(
            backend,
            workers=workers,
            trial_fn=trial_fn,
            data_dir=data_dir,
            ray_address=ray_address,
            gpus_per_trial=gpus_per_trial,
            on_start=store.mark_started,
        )
        stopped_early = _drive(store, engine, queue, run, in_flight, fail_fast=fail_fast)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        try:
            if engine is not None:
                if in_flight:
                    engine.cancel()
                engine.close()
        finally:
            # Runs even if closing the backend failed: the store must not keep phantom runners.
            store.release(in_flight)
            bar.close()
    if interrupted:
        _print_above_bar(f"interrupted: {len(in_flight)} running trials returned to pending", None)
    return interrupted, stopped_early
