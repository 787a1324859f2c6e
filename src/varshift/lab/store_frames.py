"""The results store read out as pandas data frames (trials, epochs, layer shifts) and written
as CSV or Parquet files: the queries, the column names and types, and the files
(:meth:`~varshift.lab.store.ResultStore.frames` and ``export`` call these).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from varshift.lab.store_rows import FINAL_COLUMNS, dump_json

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "EPOCHS_COLUMNS",
    "LAYER_SHIFT_COLUMNS",
    "TRIALS_COLUMNS",
    "ExportFormat",
    "FrameRows",
    "export_target",
    "frame_rows",
    "make_frames",
    "write_frames",
]

TRIALS_COLUMNS = (
    "trial_id",
    "arm",
    "seed",
    "status",
    "metric_name",
    "higher_is_better",
    *FINAL_COLUMNS,
    "wall_time_s",
    "error",
)
EPOCHS_COLUMNS = ("trial_id", "arm", "seed", "epoch", "train_loss", "test_loss", "test_metric")
LAYER_SHIFT_COLUMNS = (
    "trial_id",
    "arm",
    "seed",
    "layer",
    "depth",
    "train_var",
    "eval_var",
    "running_var",
    "ratio",
    "predicted",
)

ExportFormat = Literal["csv", "parquet"]

#: The rows of the three frames, as :func:`frame_rows` reads them.
FrameRows = tuple[list[Any], list[Any], list[Any]]


def frame_rows(db: sqlite3.Connection, where: str, params: Mapping[str, Any]) -> FrameRows:
    """The trial, epoch and layer-shift rows of the trials that ``where`` (SQL on alias ``t``,
    with named ``params``) selects; call it inside one read transaction so that the three
    agree."""
    trial_rows = db.execute(
        "SELECT t.id, t.arm, t.seed, t.status, t.metric_name, t.higher_is_better, "
        "t.test_metric, t.test_loss, t.recal_test_metric, t.recal_test_loss, "
        f"t.wall_time_s, t.error, t.axes_json FROM trials t WHERE {where} ORDER BY t.id",
        params,
    ).fetchall()
    epoch_rows = db.execute(
        "SELECT e.trial_id, t.arm, t.seed, e.epoch, e.train_loss, e.test_loss, "
        "e.test_metric FROM epochs e JOIN trials t ON t.id = e.trial_id "
        f"WHERE {where} ORDER BY e.trial_id, e.epoch",
        params,
    ).fetchall()
    shift_rows = db.execute(
        "SELECT s.trial_id, t.arm, t.seed, s.layer, s.depth, s.train_var, s.eval_var, "
        "s.running_var, s.ratio, s.predicted FROM layer_shift s JOIN trials t "
        f"ON t.id = s.trial_id WHERE {where} ORDER BY s.trial_id, s.depth, s.layer",
        params,
    ).fetchall()
    return trial_rows, epoch_rows, shift_rows


def make_frames(rows: FrameRows) -> dict[str, pd.DataFrame]:
    """The ``trials``, ``epochs`` and ``layer_shift`` frames of :func:`frame_rows`'s rows, with
    one more ``trials`` column per swept axis."""
    trial_rows, epoch_rows, shift_rows = rows
    trials = _typed_frame([row[:-1] for row in trial_rows], TRIALS_COLUMNS)
    for name, values in _axis_columns([row[-1] for row in trial_rows]).items():
        trials[name] = values
    return {
        "trials": trials,
        "epochs": _typed_frame(epoch_rows, EPOCHS_COLUMNS),
        "layer_shift": _typed_frame(shift_rows, LAYER_SHIFT_COLUMNS),
    }


def export_target(study: str, out: str | os.PathLike[str], fmt: ExportFormat) -> tuple[Path, str]:
    """The folder and file-name stem of an export of ``study`` to ``out`` in format ``fmt``
    (checked)."""
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    out_path = Path(out)
    if out_path.suffix in (".csv", ".parquet"):
        if out_path.suffix != f".{fmt}":
            raise ValueError(f"{out_path} does not end in .{fmt} (format {fmt!r})")
        return out_path.parent, out_path.stem
    return out_path, study


def write_frames(
    frames: Mapping[str, pd.DataFrame], folder: Path, stem: str, fmt: ExportFormat
) -> list[Path]:
    """Write each frame to ``<folder>/<stem>_<name>.<fmt>`` (the folder is created); returns
    the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in frames.items():
        target = folder / f"{stem}_{name}.{fmt}"
        if fmt == "csv":
            frame.to_csv(target, index=False)
        else:
            frame.to_parquet(target, index=False)
        written.append(target)
    return written


# Column types of the frames, so that an empty or all-NULL column has the same type as a full
# one (SQL NULL becomes NaN in a float column, not None in an object column). Text columns are
# left to pandas, whose text type differs between versions.
_INT_COLUMNS = frozenset({"trial_id", "seed", "epoch", "depth"})
_TEXT_COLUMNS = frozenset({"arm", "status", "metric_name", "error", "layer"})


def _typed_frame(rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(columns))
    types = {
        name: "int64" if name in _INT_COLUMNS else "boolean" if name == "higher_is_better"
        else "float64"
        for name in columns
        if name not in _TEXT_COLUMNS
    }
    return frame.astype(types)


def _axis_columns(axes_texts: Sequence[str]) -> dict[str, list[Any]]:
    """One list per axis name (first-seen order) from the trials' axes JSON; values that are
    not scalars are kept as JSON text so that CSV and Parquet can hold them."""
    axes = [json.loads(text) for text in axes_texts]
    names: dict[str, None] = {}
    for entry in axes:
        names.update(dict.fromkeys(entry))
    columns: dict[str, list[Any]] = {}
    for name in names:
        column = f"axis_{name}" if name in TRIALS_COLUMNS else name
        columns[column] = [
            value
            if value is None or isinstance(value, (str, int, float, bool))
            else dump_json(value)
            for value in (entry.get(name) for entry in axes)
        ]
    return columns
