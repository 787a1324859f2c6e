"""What the results store writes, as table rows: the cells of a study (checked first: each cell
unique, seeds storable, configs serialisable) and the result of a trial, encoded the way SQLite
keeps them (JSON text with sorted keys, NaN as NULL, UTC timestamps).
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from varshift.lab.results import TrialResult
from varshift.lab.store_records import TrialLike, WorkerInfo
from varshift.lab.store_schema import MAX_SEED

__all__ = [
    "FINAL_COLUMNS",
    "cell_rows",
    "check_cells",
    "check_seed",
    "dump_json",
    "epoch_rows",
    "result_values",
    "shift_rows",
    "sql_real",
    "utc_now",
]

# The final metrics that get a column of their own (the rest stay in ``final_json``).
FINAL_COLUMNS = ("test_metric", "test_loss", "recal_test_metric", "recal_test_loss")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"a trial config must have to_dict() or be a mapping, got {type(config)!r}")


def check_seed(seed: object, where: str) -> int:
    """``seed`` as the store keeps it; a one-line ValueError naming ``where`` unless it is an
    integer from 0 to :data:`MAX_SEED`."""
    try:
        value = None if isinstance(seed, bool) else operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        value = None
    if value is None or not 0 <= value <= MAX_SEED:
        raise ValueError(
            f"{where}: seed must be an integer from 0 to 2**63 - 1 (SQLite's 64-bit integers), "
            f"got {seed!r}"
        )
    return value


def check_cells(study: str, trials: Sequence[TrialLike]) -> None:
    """Everything :meth:`~varshift.lab.store.ResultStore.register` checks of ``trials``,
    without a database: each cell unique, seeds storable, configs serialisable. The driver
    calls it before it creates or opens a file, so a bad study leaves nothing behind."""
    cell_rows(study, trials)


def cell_rows(study: str, trials: Sequence[TrialLike]) -> list[dict[str, Any]]:
    """The ``trials`` rows of ``study``'s cells (named for the INSERT), after the checks of
    :func:`check_cells`."""
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], str] = {}
    for trial in trials:
        seed = check_seed(trial.seed, f"study {study!r}, arm {trial.arm!r}")
        key = (trial.config_hash, seed)
        if key in seen:
            raise ValueError(
                f"study {study!r}: arms {seen[key]!r} and {trial.arm!r} have the same config "
                f"(hash {trial.config_hash}) and seed {seed}; each cell must be unique"
            )
        seen[key] = trial.arm
        rows.append(
            {
                "arm": trial.arm,
                "axes_json": json.dumps(dict(trial.axes)),  # unsorted: the study's axis order
                "config_json": dump_json(_config_dict(trial.config)),
                "config_hash": trial.config_hash,
                "seed": seed,
            }
        )
    return rows


def dump_json(value: Any) -> str:
    # sort_keys: the same config always gives the same text, so files diff cleanly.
    return json.dumps(value, sort_keys=True)


def sql_real(value: Any) -> float | None:
    """A metric as SQLite stores it: NaN becomes NULL (SQLite would do so silently anyway)."""
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def result_values(
    trial_id: int, result: TrialResult, worker: WorkerInfo | None
) -> dict[str, Any]:
    """The named parameters of the ``trials`` update that records ``result`` (``now``: the
    time it finished; the worker's fields are ``None`` when the caller did not say)."""
    final = result.final
    return {
        "id": trial_id,
        "status": result.status,
        "now": utc_now(),
        "wall_time_s": sql_real(result.wall_time_s),
        "error": result.error,
        "traceback": result.traceback,
        "metric_name": result.metric_name,
        "higher_is_better": int(result.higher_is_better),
        **{name: sql_real(final.get(name)) for name in FINAL_COLUMNS},
        "final_json": dump_json(final),
        "meta_json": dump_json(result.meta),
        "varshift_version": worker.varshift_version if worker else None,
        "torch_version": worker.torch_version if worker else None,
        "hostname": worker.hostname if worker else None,
        "pid": worker.pid if worker else None,
    }


def epoch_rows(trial_id: int, result: TrialResult) -> list[tuple[Any, ...]]:
    """The ``epochs`` rows of ``result``, in the column order of the store's INSERT."""
    return [
        (
            trial_id,
            e.epoch,
            sql_real(e.train_loss),
            sql_real(e.test_loss),
            sql_real(e.test_metric),
            dump_json(e.extra),
        )
        for e in result.epochs
    ]


def shift_rows(trial_id: int, result: TrialResult) -> list[tuple[Any, ...]]:
    """The ``layer_shift`` rows of ``result``, in the column order of the store's INSERT."""
    return [
        (
            trial_id,
            s.layer,
            s.depth,
            sql_real(s.train_var),
            sql_real(s.eval_var),
            sql_real(s.running_var),
            sql_real(s.ratio),
            sql_real(s.predicted),
        )
        for s in result.layer_shift
    ]
