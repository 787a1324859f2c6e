"""Where trials run: in this process, in persistent worker processes, or as Ray tasks.

A backend only runs trials and hands back their results; it never touches the results store
(the driver in :mod:`varshift.lab.runner` is the one writer). Every backend has the same small
interface: :meth:`Backend.submit` a :class:`TrialTask` while fewer than ``capacity`` are in
flight, :meth:`Backend.next_outcome` blocks until one of them has finished, :meth:`Backend.cancel`
abandons the rest (Ctrl-C, ``--fail-fast``). Each backend calls its ``on_start(trial_id)`` when a
trial really begins, so that the driver counts an attempt only then (see
:meth:`varshift.lab.store.ResultStore.mark_started`): a trial handed to a worker that is still
starting up has not been tried.

* ``local`` — sequential, in-process; the default and the reference for determinism. A trial
  starts when the driver asks for its outcome.
* ``process`` — ``workers`` persistent processes (forkserver where the platform has it, else
  spawn) with ``torch`` threads set so that workers × threads ≤ cores. Each worker has its own
  pipe, so when one dies the driver knows exactly which trial it was running: that trial fails
  with "worker died", a fresh worker takes its place and the study goes on. A worker reports
  "started" just before it calls the trial function.
* ``ray`` — each trial a Ray task (``num_cpus=1``, ``num_gpus`` as asked); joins the cluster at
  ``ray_address`` or starts a local one with ``num_cpus = workers`` and shuts it down at the end.
  Ray does not say when a task begins, so a trial counts as started when it is submitted (the
  cluster is already up by then).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import signal
import time
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from varshift.lab.results import TrialResult, one_line_reason
from varshift.lab.store_records import WorkerInfo

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext
    from multiprocessing.process import BaseProcess

__all__ = [
    "BACKENDS",
    "Backend",
    "LocalBackend",
    "ProcessBackend",
    "RayBackend",
    "TrialFn",
    "TrialOutcome",
    "TrialTask",
    "StartCallback",
    "check_backend",
    "default_threads",
    "execute_trial",
    "import_ray",
    "make_backend",
]

BACKENDS = ("local", "process", "ray")

#: ``trial_fn(config, seed, *, data_dir=None, threads=None) -> TrialResult``, the signature of
#: :func:`varshift.lab.trial.run_trial`. It must be picklable (a module-level function) for the
#: process and Ray backends.
TrialFn = Callable[..., TrialResult]

#: ``on_start(trial_id)``: called in the driver when a submitted trial really begins.
StartCallback = Callable[[int], None]

# How long a worker gets to exit after being asked before it is terminated.
_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TrialTask:
    """One trial to run: the store's id (so the result finds its row), its config and seed."""

    trial_id: int
    config: Any
    seed: int


@dataclass(frozen=True)
class _TrialStarted:
    """A worker process's message: it is about to call the trial function for ``trial_id``."""

    trial_id: int


def _ignore_start(trial_id: int) -> None:
    """The default ``on_start``: nobody is counting."""


@dataclass(frozen=True)
class TrialOutcome:
    """A finished trial: its result and the worker that produced it."""

    trial_id: int
    result: TrialResult
    worker: WorkerInfo


def _failed_result(
    error: str, *, wall_time_s: float = 0.0, tb: str | None = None
) -> TrialResult:
    # metric_name is unknown when the trial never got to build its task.
    return TrialResult(
        status="failed",
        metric_name="unknown",
        higher_is_better=True,
        wall_time_s=wall_time_s,
        error=error,
        traceback=tb,
    )


def default_trial_fn() -> TrialFn:
    """:func:`varshift.lab.trial.run_trial`, imported only when a trial is about to run."""
    from varshift.lab.trial import run_trial

    return run_trial


def default_threads(workers: int) -> int:
    """torch threads per worker so that ``workers`` × threads ≤ the cores this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // workers)


def execute_trial(
    trial_fn: TrialFn, task: TrialTask, data_dir: str | None, threads: int | None
) -> TrialOutcome:
    """Run one trial wherever this is called (driver, worker process or Ray task).

    An exception from ``trial_fn`` becomes a failed result (its message on one line, see
    :func:`~varshift.lab.results.one_line_reason`, and its traceback), so a worker survives a
    bad trial; ``threads`` (if given) sets torch's intra-op threads first.
    """
    start = time.perf_counter()
    try:
        if threads is not None:
            import torch

            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        result = trial_fn(task.config, task.seed, data_dir=data_dir, threads=threads)
    except Exception as exc:
        result = _failed_result(
            one_line_reason(f"{type(exc).__name__}: {exc}", limit=None),
            wall_time_s=time.perf_counter() - start,
            tb=traceback.format_exc(),
        )
    return TrialOutcome(task.trial_id, result, WorkerInfo.here())


class Backend(ABC):
    """Runs trials; see the module docstring for the protocol."""

    name: ClassVar[str]
    #: How many trials may be in flight at once (the driver claims no more than this).
    capacity: int

    @abstractmethod
    def submit(self, task: TrialTask) -> None:
        """Start ``task``; only call while fewer than ``capacity`` trials are in flight."""

    @abstractmethod
    def next_outcome(self) -> TrialOutcome:
        """Block until one submitted trial has finished and return it."""

    @abstractmethod
    def cancel(self) -> None:
        """Abandon every trial in flight (their outcomes will never be returned); only
        :meth:`close` may follow."""

    def close(self) -> None:  # noqa: B027 - a backend with nothing to release keeps it
        """Release workers and clusters; safe to call twice."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LocalBackend(Backend):
    """Runs each trial in this process when its outcome is asked for; one at a time."""

    name = "local"

    def __init__(
        self,
        trial_fn: TrialFn,
        *,
        data_dir: str | None = None,
        on_start: StartCallback | None = None,
    ) -> None:
        self.capacity = 1
        self._trial_fn = trial_fn
        self._data_dir = data_dir
        self._on_start = on_start or _ignore_start
        self._queue: deque[TrialTask] = deque()

    def submit(self, task: TrialTask) -> None:
        self._queue.append(task)

    def next_outcome(self) -> TrialOutcome:
        if not self._queue:
            raise RuntimeError("no trial in flight")
        task = self._queue.popleft()
        self._on_start(task.trial_id)
        # threads=None: the caller's torch settings stand, as for any in-process library call.
        return execute_trial(self._trial_fn, task, self._data_dir, None)

    def cancel(self) -> None:
        self._queue.clear()


def _worker_main(
    conn: Connection, trial_fn: TrialFn | None, data_dir: str | None, threads: int
) -> None:
    """Loop of one persistent worker: receive a task, say it has started, run it, send the
    outcome; ``None`` ends. Everything before the first task (imports, unpickling the trial
    function) is start-up: a trial waiting in the pipe meanwhile has not started."""
    # Ctrl-C reaches the whole process group; the driver decides what stops, and how.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fn = trial_fn if trial_fn is not None else default_trial_fn()
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the driver went away
            return
        if task is None:
            return
        try:
            conn.send(_TrialStarted(task.trial_id))
        except OSError:  # the driver died while this worker was idle
            return
        outcome = execute_trial(fn, task, data_dir, threads)
        try:
            conn.send(outcome)
        except OSError:  # the driver died (e.g. SIGKILL) while this trial ran; it will re-run
            return
        except Exception as exc:  # e.g. a result that does not pickle
            failed = _failed_result(f"result not sent: {exc}")
            conn.send(TrialOutcome(task.trial_id, failed, outcome.worker))


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    task: TrialTask | None = None


class ProcessBackend(Backend):
    """``workers`` persistent worker processes, each fed through its own pipe."""

    name = "process"

    def __init__(
        self,
        trial_fn: TrialFn | None,
        *,
        workers: int,
        data_dir: str | None = None,
        threads: int | None = None,
        start_method: Literal["forkserver", "spawn"] | None = None,
        on_start: StartCallback | None = None,
    ) -> None:
        check_backend("process", workers=workers, trial_fn=trial_fn)
        self._on_start = on_start or _ignore_start
        # Never plain fork: forking a driver whose torch already runs threads can deadlock.
        if start_method == "spawn" or "forkserver" not in multiprocessing.get_all_start_methods():
            self._context: SpawnContext | ForkServerContext = multiprocessing.get_context("spawn")
        else:
            self._context = multiprocessing.get_context("forkserver")
            # Import torch and the trial code once in the fork server, so that each worker (and
            # each replacement of a dead one) starts in milliseconds; the server runs no torch
            # code, so forking it is safe. Modules that fail to import are skipped.
            preload = ["torch", "varshift.lab.trial"]
            module = getattr(trial_fn, "__module__", None)
            if module and module != "__main__":
                preload.append(module)
            self._context.set_forkserver_preload(preload)
        self.capacity = workers
        self._args = (trial_fn, data_dir, threads or default_threads(workers))
        self._workers: list[_Worker] = []
        self._started = 0
        try:
            self._workers = [self._start_worker() for _ in range(workers)]
        except BaseException:
            self.close()
            raise

    def _start_worker(self) -> _Worker:
        self._started += 1
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=_worker_main,
            args=(theirs, *self._args),
            name=f"varshift-worker-{self._started}",
            daemon=True,
        )
        process.start()
        theirs.close()  # only the worker holds its end, so its death reads as EOF here
        return _Worker(process, ours)

    def submit(self, task: TrialTask) -> None:
        idle = next((w for w in self._workers if w.task is None), None)
        if idle is None:
            raise RuntimeError(f"all {self.capacity} workers are busy")
        idle.task = task
        idle.conn.send(task)

    def next_outcome(self) -> TrialOutcome:
        """Wait for the next outcome, passing each worker's "started" message on to
        ``on_start`` as it comes."""
        while True:
            busy = [w for w in self._workers if w.task is not None]
            if not busy:
                raise RuntimeError("no trial in flight")
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            worker = next(w for w in busy if w.conn in ready or w.process.sentinel in ready)
            message = _receive(worker.conn)
            if isinstance(message, _TrialStarted):
                self._on_start(message.trial_id)
                continue
            return self._collect(worker, message)

    def _collect(self, worker: _Worker, outcome: TrialOutcome | None) -> TrialOutcome:
        """The outcome a worker sent, or (``None``: it died) a failed one; a dead worker is
        replaced."""
        task, worker.task = worker.task, None
        if task is None:
            raise RuntimeError("internal error: collecting from an idle worker")
        if outcome is None or not worker.process.is_alive():
            self._replace_dead_worker(worker)
        if outcome is not None:
            return outcome
        code = worker.process.exitcode
        why = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        where = dataclasses.replace(WorkerInfo.here(), pid=worker.process.pid or 0)
        return TrialOutcome(task.trial_id, _failed_result(f"worker died ({why})"), where)

    def _replace_dead_worker(self, worker: _Worker) -> None:
        worker.process.join(_JOIN_TIMEOUT_S)
        worker.conn.close()
        fresh = self._start_worker()
        self._workers[self._workers.index(worker)] = fresh

    def cancel(self) -> None:
        """Terminate the busy workers (their trials are abandoned); only :meth:`close` may
        follow."""
        busy = [w for w in self._workers if w.task is not None]
        self._workers = [w for w in self._workers if w.task is None]
        for worker in busy:
            worker.process.terminate()
        for worker in busy:
            worker.process.join(_JOIN_TIMEOUT_S)
            worker.conn.close()

    def close(self) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            if worker.process.is_alive() and not worker.conn.closed:
                try:
                    worker.conn.send(None)
                except OSError:
                    worker.process.terminate()
        for worker in workers:
            worker.process.join(_JOIN_TIMEOUT_S)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            if not worker.conn.closed:
                worker.conn.close()


def _receive(conn: Connection) -> TrialOutcome | _TrialStarted | None:
    """The next message from a worker whose pipe is ready; ``None`` when it has closed (the
    worker died)."""
    try:
        if conn.poll():
            message: TrialOutcome | _TrialStarted = conn.recv()
            return message
    except (EOFError, OSError):
        pass
    return None


def import_ray() -> Any:
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(
            "the ray backend needs Ray, which is not installed: pip install 'varshift[ray]'"
        ) from None
    return ray


class RayBackend(Backend):
    """Each trial a Ray task; a local Ray instance is started (and later shut down) unless one is
    already running in this process or ``address`` names a cluster to join.

    ``capacity`` is twice the workers, so that Ray has the next trial queued when one finishes
    and no worker waits for a round trip through the driver.
    """

    name = "ray"

    def __init__(
        self,
        trial_fn: TrialFn,
        *,
        workers: int,
        data_dir: str | None = None,
        address: str | None = None,
        threads: int | None = None,
        gpus_per_trial: float = 0.0,
        on_start: StartCallback | None = None,
    ) -> None:
        check_backend("ray", workers=workers, trial_fn=trial_fn, gpus_per_trial=gpus_per_trial)
        ray = import_ray()
        self._on_start = on_start or _ignore_start
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                self._owns_ray = True
        self.capacity = 2 * workers
        # max_retries=0: a crashed trial is reported, not silently re-run by Ray.
        self._remote = ray.remote(execute_trial).options(
            num_cpus=1, num_gpus=gpus_per_trial, max_retries=0
        )
        self._fn_ref = ray.put(trial_fn)
        self._data_dir = data_dir
        self._threads = threads or default_threads(workers)
        self._in_flight: dict[Any, TrialTask] = {}

    def submit(self, task: TrialTask) -> None:
        ref = self._remote.remote(self._fn_ref, task, self._data_dir, self._threads)
        self._in_flight[ref] = task
        self._on_start(task.trial_id)  # Ray cannot tell when the task begins; count it now

    def next_outcome(self) -> TrialOutcome:
        if not self._in_flight:
            raise RuntimeError("no trial in flight")
        [ref], _ = self._ray.wait(list(self._in_flight), num_returns=1)
        task = self._in_flight.pop(ref)
        try:
            outcome: TrialOutcome = self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            why = one_line_reason(str(exc) or type(exc).__name__)
            failed = _failed_result(f"worker died ({why})")
            return TrialOutcome(task.trial_id, failed, WorkerInfo.here())
        return outcome

    def cancel(self) -> None:
        for ref in self._in_flight:
            self._ray.cancel(ref, force=True)
        self._in_flight.clear()

    def close(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False


def check_backend(
    name: str,
    *,
    workers: int = 1,
    trial_fn: TrialFn | None = None,
    gpus_per_trial: float = 0.0,
) -> None:
    """Refuse, in one line and without starting anything, what :func:`make_backend` could not
    run: an unknown backend, a bad worker or GPU count, a trial function the process backend
    cannot send to its workers, Ray when it is not installed. The driver calls it before it
    touches the results store."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    if name == "local" and workers != 1:
        raise ValueError(f"the local backend runs one trial at a time; got workers={workers}")
    if not gpus_per_trial >= 0:  # also refuses NaN
        raise ValueError(f"gpus_per_trial must be >= 0, got {gpus_per_trial}")
    if gpus_per_trial and name != "ray":
        raise ValueError(f"gpus_per_trial needs the ray backend, got backend {name!r}")
    if name == "process":
        try:  # now, rather than as a puzzling error when the first trial is sent
            pickle.dumps(trial_fn)
        except Exception as exc:
            raise TypeError(
                f"the process backend needs a module-level trial function, got {trial_fn!r} "
                f"({exc})"
            ) from None
    if name == "ray":
        import_ray()


def make_backend(
    name: str,
    *,
    workers: int = 1,
    trial_fn: TrialFn | None = None,
    data_dir: str | None = None,
    ray_address: str | None = None,
    gpus_per_trial: float = 0.0,
    on_start: StartCallback | None = None,
) -> Backend:
    """The backend called ``name`` (one of :data:`BACKENDS`), after :func:`check_backend`;
    ``trial_fn`` defaults to :func:`varshift.lab.trial.run_trial`, ``on_start`` is called with
    a trial's id when it really begins."""
    check_backend(name, workers=workers, trial_fn=trial_fn, gpus_per_trial=gpus_per_trial)
    if name == "local":
        return LocalBackend(trial_fn or default_trial_fn(), data_dir=data_dir, on_start=on_start)
    if name == "process":
        # None: each worker imports run_trial itself, after the fork server preloaded it.
        return ProcessBackend(trial_fn, workers=workers, data_dir=data_dir, on_start=on_start)
    return RayBackend(
        trial_fn or default_trial_fn(),
        workers=workers,
        data_dir=data_dir,
        address=ray_address,
        gpus_per_trial=gpus_per_trial,
        on_start=on_start,
    )
