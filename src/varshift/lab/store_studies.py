"""The studies of a results store: adding a study's cells (refusing a changed spec unless it
only extends the stored one), and finding a registered study's trials by name and preset
(:class:`~varshift.lab.store.ResultStore` calls these inside its transactions).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from varshift.lab.store_records import StudyChangedError
from varshift.lab.store_rows import dump_json

__all__ = ["add_study", "require_registered", "study_filter", "study_names"]


def add_study(
    db: sqlite3.Connection,
    study: str,
    preset: str,
    spec_hash: str,
    spec: Mapping[str, Any],
    cells: Sequence[Mapping[str, Any]],
    *,
    now: str,
    extend: bool,
) -> int:
    """Record ``study``/``preset`` and insert its ``cells`` (rows of
    :func:`~varshift.lab.store_rows.cell_rows`) as ``pending`` in the open write transaction
    ``db``; returns how many trials were new."""
    seen = {(row["config_hash"], row["seed"]): row["arm"] for row in cells}
    rows = [{"study": study, "preset": preset, **row} for row in cells]
    stored = db.execute(
        "SELECT spec_hash FROM studies WHERE name = ? AND preset = ?", (study, preset)
    ).fetchone()
    if stored is None:
        db.execute(
            "INSERT INTO studies (name, preset, spec_hash, spec_json, created, updated) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (study, preset, spec_hash, dump_json(dict(spec)), now, now),
        )
    elif stored[0] != spec_hash:
        _check_extension(db, study, preset, stored[0], spec_hash, seen, extend)
        db.execute(
            "UPDATE studies SET spec_hash = ?, spec_json = ?, updated = ? "
            "WHERE name = ? AND preset = ?",
            (spec_hash, dump_json(dict(spec)), now, study, preset),
        )
    before = db.total_changes
    db.executemany(
        "INSERT OR IGNORE INTO trials "
        "(study, preset, arm, axes_json, config_json, config_hash, seed) VALUES "
        "(:study, :preset, :arm, :axes_json, :config_json, :config_hash, :seed)",
        rows,
    )
    added = db.total_changes - before
    db.executemany(
        "INSERT OR IGNORE INTO preset_trials (study, preset, trial_id) "
        "SELECT study, ?, id FROM trials WHERE study = ? AND config_hash = ? AND seed = ?",
        [(preset, study, config_hash, seed) for config_hash, seed in seen],
    )
    return added


def _check_extension(
    db: sqlite3.Connection,
    study: str,
    preset: str,
    old_hash: str,
    new_hash: str,
    new_keys: Mapping[tuple[str, int], str],
    extend: bool,
) -> None:
    if not extend:
        raise StudyChangedError(
            f"study {study!r} (preset {preset!r}) has changed since it was stored "
            f"(spec {old_hash[:12]} -> {new_hash[:12]}); pass --extend to add its new "
            "cells only, or use another --db"
        )
    dropped = [
        (arm, seed)
        for arm, config_hash, seed in db.execute(
            "SELECT t.arm, t.config_hash, t.seed FROM trials t JOIN preset_trials p "
            "ON p.trial_id = t.id WHERE p.study = ? AND p.preset = ?",
            (study, preset),
        )
        if (config_hash, seed) not in new_keys
    ]
    if dropped:
        arm, seed = dropped[0]
        raise StudyChangedError(
            f"cannot extend study {study!r} (preset {preset!r}): {len(dropped)} stored "
            f"trials (e.g. arm {arm!r} seed {seed}) are not in the new spec; extending only "
            "adds cells, so use another --db"
        )


def study_names(db: sqlite3.Connection) -> list[str]:
    """The studies in the file, sorted."""
    return [r[0] for r in db.execute("SELECT DISTINCT name FROM studies ORDER BY name")]


def require_registered(
    db: sqlite3.Connection, path: Path, study: str, preset: str | None = None
) -> None:
    """Raise a one-line ValueError naming what there is, unless ``study`` (and ``preset``)
    are registered in the database ``path``."""
    presets = [r[0] for r in db.execute(
        "SELECT preset FROM studies WHERE name = ? ORDER BY preset", (study,)
    )]
    if not presets:
        names = study_names(db)
        has = f"it has: {', '.join(names)}" if names else "it has no studies yet"
        raise ValueError(f"no study named {study!r} in {path}; {has}")
    if preset is not None and preset not in presets:
        raise ValueError(
            f"study {study!r} has no preset {preset!r} in {path}; it has: "
            f"{', '.join(presets)}"
        )


def study_filter(
    db: sqlite3.Connection, path: Path, study: str, preset: str | None
) -> tuple[str, dict[str, Any]]:
    """SQL filter (on alias ``t``, with named parameters ``:study`` and ``:preset``) for the
    trials of ``study``, or of one of its presets (both must be registered)."""
    require_registered(db, path, study, preset)
    if preset is None:
        return "t.study = :study", {"study": study}
    return (
        "t.study = :study AND t.id IN (SELECT trial_id FROM preset_trials "
        "WHERE study = :study AND preset = :preset)",
        {"study": study, "preset": preset},
    )
