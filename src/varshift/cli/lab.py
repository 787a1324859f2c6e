"""``varshift lab``: list and inspect studies, run them into a results database, watch, export
and report.

    varshift lab list
    varshift lab show STUDY [--preset P]
    varshift lab run STUDY [--preset quick] [--db FILE] [--backend local|process|ray] ...
    varshift lab status [STUDY] [--db FILE] [--preset P]
    varshift lab export STUDY [--db FILE] [--out PATH] [--format csv|parquet] [--preset P]
    varshift lab report STUDY [--db FILE] [--out DIR] [--preset P] [--metric M] ...

One convention for every sub-command: STUDY is the positional argument (a built-in name, a path
to a study TOML file, or for ``status``/``export``/``report`` a study name in the database),
``--db`` names the results database (default ``./varshift-lab.db``; one file holds any number of
studies) and ``--out`` defaults to ``./varshift-report/STUDY/`` (``report``) or
``./varshift-export/STUDY/`` (``export``), with ``-PRESET`` appended when ``--preset`` is given.
Every argument is checked before anything is created or written. ``run`` exits 0 when every
trial of the preset is done, 1 when some failed (or ``--fail-fast`` stopped it), 130 when
interrupted; re-running it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from varshift.cli.arguments import output_file

if TYPE_CHECKING:
    from varshift.lab.store import ResultStore, StoredTrial
    from varshift.lab.study import Study

__all__ = ["register"]

# varshift.lab.runner.DEFAULT_DB, repeated so that `varshift --help` need not import the lab.
_DEFAULT_DB = "varshift-lab.db"
_REPORT_ROOT = "varshift-report"
_EXPORT_ROOT = "varshift-export"
# The file names the old form (`lab status runs.db`) passed where the study now goes.
_DATABASE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SQLITE_HEADER = b"SQLite format 3\x00"
# `lab status` lists at most this many running or failed trials per preset.
_LISTED_TRIALS = 20


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``lab`` and its sub-commands to the top-level parser."""
    lab = subparsers.add_parser(
        "lab",
        help="run studies of the variance shift and report on them",
        description="Run studies (grids of trials over seeds) into a results database that "
        "survives crashes, then export or report them.",
    )
    commands = lab.add_subparsers(dest="lab_command", metavar="COMMAND")
    commands.required = True

    listing = commands.add_parser("list", help="the built-in studies")
    listing.set_defaults(handler=_list)

    show = commands.add_parser(
        "show", help="a study's presets: shared configuration, axes, arms and trial count"
    )
    _add_study(show, "built-in name or path to a study TOML file")
    show.add_argument("--preset", default=None, help="show only this preset (default: all)")
    show.set_defaults(handler=_show)

    _register_run(commands)

    status = commands.add_parser(
        "status", help="trials by status, with attempts and failures, in a results database"
    )
    _add_stored_study(status, "only this study (default: every study in the database)",
                      optional=True)
    _add_db(status)
    status.add_argument("--preset", default=None, help="only this preset")
    status.set_defaults(handler=_status)

    export = commands.add_parser("export", help="write a study's results as CSV or Parquet")
    _add_stored_study(export, "study name in the database (or its TOML file)")
    _add_db(export)
    export.add_argument(
        "--out", default=None,
        help=f"folder, or file name ending in .csv/.parquet (default ./{_EXPORT_ROOT}/STUDY/, "
        "or STUDY-PRESET/ with --preset)",
    )
    export.add_argument("--format", choices=("csv", "parquet"), default="csv")
    export.add_argument("--preset", default=None, help="only this preset's trials")
    export.set_defaults(handler=_export)

    report = commands.add_parser("report", help="statistics and figures of a study")
    _add_stored_study(report, "study name in the database (or its TOML file)")
    _add_db(report)
    report.add_argument(
        "--out", default=None,
        help=f"folder for the report (default ./{_REPORT_ROOT}/STUDY/, or STUDY-PRESET/ with "
        "--preset)",
    )
    report.add_argument("--preset", default=None, help="only this preset's trials (default: all)")
    report.add_argument(
        "--metric", default="test_metric",
        help="trial column to compare (default test_metric; e.g. test_loss, recal_test_metric)",
    )
    report.add_argument(
        "--reference", default=None,
        help="arm label to compare against (default: the study's reference arm)",
    )
    report.add_argument(
        "--target", type=float, default=None,
        help="also report the epochs each arm needs to reach this test metric",
    )
    report.set_defaults(handler=_report)


def _register_run(commands: argparse._SubParsersAction[Any]) -> None:
    run = commands.add_parser(
        "run",
        help="run a study's trials that are not done yet",
        description="Run every trial of a study preset that is not done yet, recording each as "
        "it finishes; re-running resumes. Exit status: 0 all done, 1 some failed, 130 "
        "interrupted.",
    )
    _add_study(run, "built-in name or path to a study TOML file")
    run.add_argument("--preset", default="quick", help="preset to run (default quick)")
    run.add_argument(
        "--backend", choices=("local", "process", "ray"), default="local",
        help="local: one at a time in this process (default); process: worker processes; "
        "ray: Ray tasks (pip install 'varshift[ray]')",
    )
    run.add_argument(
        "--workers", type=int, default=None,
        help="trials at once (default 1 for local, else the number of cores)",
    )
    _add_db(run)
    run.add_argument("--data-dir", default=None, help="folder of on-disk datasets")
    run.add_argument("--ray-address", default=None, help="join this Ray cluster (ray backend)")
    run.add_argument(
        "--gpus-per-trial", type=float, default=0.0, help="GPUs per Ray task (default 0)"
    )
    run.add_argument("--retry-failed", action="store_true", help="re-run failed trials")
    run.add_argument(
        "--extend", action="store_true",
        help="accept a changed study that only adds trials, and run the new ones",
    )
    run.add_argument("--fail-fast", action="store_true", help="stop at the first failed trial")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(handler=_run)


def _add_study(parser: argparse.ArgumentParser, what: str, *, optional: bool = False) -> None:
    parser.add_argument("study", metavar="STUDY", nargs="?" if optional else None, help=what)


def _add_stored_study(parser: argparse.ArgumentParser, what: str, *,
                      optional: bool = False) -> None:
    """STUDY of a command that reads the database (status, export, report)."""
    _add_study(parser, what, optional=optional)
    # The old form's option (`lab report DB --study NAME`), kept only to explain the new one.
    parser.add_argument("--study", dest="old_study", default=None, help=argparse.SUPPRESS)


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db", default=_DEFAULT_DB, type=output_file,
        help=f"results database file (default ./{_DEFAULT_DB})",
    )


# -- arguments -----------------------------------------------------------------------------------


def _refuse_old_form(args: argparse.Namespace) -> None:
    """The database used to be the positional argument and the study ``--study``: say the new
    form in one line instead of misreading a database file as a study."""
    from varshift.cli import CommandError

    given = args.study
    if args.old_study is None and not (given is not None and _looks_like_database(given)):
        return
    study = args.old_study or "STUDY"
    database = given if given is not None and _looks_like_database(given) else args.db
    raise CommandError(
        f"lab {args.lab_command} takes the study as its argument and the database as --db: "
        f"varshift lab {args.lab_command} {study} --db {database}"
    )


def _looks_like_database(argument: str) -> bool:
    if argument.lower().endswith(_DATABASE_SUFFIXES):
        return True
    path = Path(argument)
    try:
        with path.open("rb") as file:
            return file.read(len(_SQLITE_HEADER)) == _SQLITE_HEADER
    except OSError:  # not a readable file: a study name
        return False


def _study_name(argument: str) -> str:
    """The name a study is stored under: a study file is read for its name; anything else (a
    built-in study is stored under its own name) is taken as the stored name itself."""
    from varshift.lab.study import load_study

    if argument.endswith(".toml") or "/" in argument or "\\" in argument:
        return load_study(argument).name
    return argument


def _existing_database(path: str) -> str:
    """``path``, unless no database is there: then a one-line error naming ``--db``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no results database at {path}; name one with --db FILE "
                                f"(default ./{_DEFAULT_DB})")
    return path


def _default_out(root: str, study: str, preset: str | None) -> Path:
    return Path(root) / (study if preset is None else f"{study}-{preset}")


def _check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; the report needs a folder")


# -- list and show -------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    from varshift.lab.study import builtin_studies, load_study

    studies = [load_study(name) for name in builtin_studies()]
    # A study per block: the presets list can be long, so it gets its own line.
    for study in studies:
        print(f"{study.name}: {study.description}")
        print(f"    presets: {', '.join(study.presets)}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from varshift.lab.study import load_study

    study = load_study(args.study)
    presets = study.presets if args.preset is None else [args.preset]
    study.expand(presets[0])  # an unknown --preset is refused before anything is printed
    lines = [f"{study.name}: {study.description}"]
    if study.path is not None:
        lines.append(f"  file: {study.path}")
    for preset in presets:
        lines += _preset_lines(study, preset)
    print("\n".join(lines))
    return 0


def _preset_lines(study: Study, preset: str) -> list[str]:
    arms, seeds = study.arms(preset), study.seeds(preset)
    lines = [f"preset {preset}: {len(arms) * len(seeds)} trials = {len(arms)} arms x "
             f"{len(seeds)} seeds ({_seed_text(seeds)})"]
    lines.append("  shared by every arm:")
    for section, keys in study.shared_config(preset).items():
        if keys:
            settings = " ".join(f"{key}={_setting_text(key, value)}" for key, value in keys.items())
            lines.append(textwrap.fill(f"{section}: {settings}", width=100, initial_indent="    ",
                                       subsequent_indent="      ", break_on_hyphens=False))
    for axis, values in study.axes(preset).items():
        lines.append(f"  axis {axis}: {', '.join(map(str, values))}")
    reference = study.reference_arm(preset)
    lines += [f"  arm {arm}{'  (reference)' if arm == reference else ''}" for arm in arms]
    return lines


def _seed_text(seeds: list[int]) -> str:
    if seeds == list(range(len(seeds))):
        return f"seeds 0-{len(seeds) - 1}" if len(seeds) > 1 else "seed 0"
    return "seeds " + ", ".join(map(str, seeds))


def _setting_text(key: str, value: Any) -> str:
    """A configuration value as a study file would write it (an absent size is ``all`` of the
    split; any other absent value is left to the architecture, ``unset``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "all" if key.endswith(("_size", "_samples")) else "unset"
    if isinstance(value, list):
        return "[" + ",".join(_setting_text(key, item) for item in value) + "]"
    return str(value)


# -- run -----------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    from varshift.cli import CommandError
    from varshift.lab.runner import run_study
    from varshift.lab.store import DriverLockError, StoreError
    from varshift.lab.study import load_study

    workers = _checked_run_options(args)
    study = load_study(args.study)
    study.expand(args.preset)  # an unknown preset is refused before the database is opened
    try:
        summary = run_study(
            study,
            preset=args.preset,
            db_path=args.db,
            backend=args.backend,
            workers=workers,
            retry_failed=args.retry_failed,
            extend=args.extend,
            fail_fast=args.fail_fast,
            data_dir=args.data_dir,
            ray_address=args.ray_address,
            progress=not args.no_progress,
            gpus_per_trial=args.gpus_per_trial,
        )
    except (DriverLockError, StoreError) as exc:
        raise CommandError(str(exc)) from None
    print(summary.describe())
    if summary.not_retried and not summary.interrupted:
        print(f"{summary.not_retried} trials failed in an earlier run; --retry-failed re-runs them")
    if summary.interrupted:
        return 130
    return 0 if summary.complete else 1


def _checked_run_options(args: argparse.Namespace) -> int:
    """The number of workers, after refusing every option that cannot work: nothing is opened
    or created before this (a missing Ray is found here, not after the database exists)."""
    from varshift.cli import CommandError
    from varshift.lab.backends import default_threads, import_ray

    if args.backend != "ray" and (args.ray_address or args.gpus_per_trial):
        raise CommandError("--ray-address and --gpus-per-trial need --backend ray")
    if not math.isfinite(args.gpus_per_trial) or args.gpus_per_trial < 0:
        raise CommandError(f"--gpus-per-trial must be a number >= 0, got {args.gpus_per_trial}")
    if args.workers is not None and args.workers < 1:
        raise CommandError(f"--workers must be >= 1, got {args.workers}")
    if args.backend == "local" and args.workers not in (None, 1):
        raise CommandError(f"the local backend runs one trial at a time; got --workers "
                           f"{args.workers} (use --backend process)")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise CommandError(f"--data-dir {args.data_dir} is not a folder")
    if args.backend == "ray":
        import_ray()  # ImportError, one line, when Ray is not installed
    if args.workers is not None:
        return int(args.workers)
    # default_threads(1) is the number of cores this process may use.
    return 1 if args.backend == "local" else default_threads(1)


# -- status --------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    from varshift.lab.runner import DEFAULT_MAX_ATTEMPTS
    from varshift.lab.store import ResultStore

    _refuse_old_form(args)
    study = None if args.study is None else _study_name(args.study)
    with ResultStore(_existing_database(args.db), create=False) as store:
        names = store.study_names() if study is None else [study]
        if not names:
            print(f"{args.db}: no studies yet")
        for name in names:
            presets = store.presets(name) if args.preset is None else [args.preset]
            for preset in presets:
                print("\n".join(_preset_status(store, name, preset, DEFAULT_MAX_ATTEMPTS)))
    return 0


def _preset_status(store: ResultStore, study: str, preset: str, limit: int) -> list[str]:
    """A line of counts, then one line per running or failed trial (with its attempts and, for
    a failure, the first line of its error)."""
    counts = store.summary(study, preset)
    total = sum(counts.values())
    text = ", ".join(f"{count} {status}" for status, count in counts.items())
    lines = [f"{study} [{preset}]: {counts['done']}/{total} done ({text}); "
             f"at most {limit} attempts per trial"]
    listed = [trial for trial in store.trials(study, preset)
              if trial.status in ("running", "failed")]
    errors: dict[int, str] = {}
    if any(trial.status == "failed" for trial in listed):
        trials = store.frames(study, preset)["trials"]
        errors = {int(row.trial_id): _first_error_line(row.error)
                  for row in trials[trials["status"] == "failed"].itertuples()}
    for trial in listed[:_LISTED_TRIALS]:
        lines.append(_trial_status_line(trial, limit, errors.get(trial.id, "")))
    if len(listed) > _LISTED_TRIALS:
        lines.append(f"  ... and {len(listed) - _LISTED_TRIALS} more running or failed trials "
                     "(lab export lists them all)")
    return lines


def _trial_status_line(trial: StoredTrial, limit: int, error: str) -> str:
    # ``attempts`` counts the times a worker began the trial: a claimed trial still waiting for
    # its worker has not begun the attempt it is queued for.
    waiting = "waiting for a worker" if trial.status == "running" else "never started"
    attempt = (f"attempt {trial.attempts} of {limit}" if trial.attempts
               else f"{waiting}; at most {limit} attempts")
    where = f"  {trial.status}: arm {trial.arm} seed {trial.seed} ({attempt})"
    return where if trial.status == "running" else f"{where}: {error}"


def _first_error_line(error: Any) -> str:
    text = error if isinstance(error, str) else ""
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


# -- export and report ---------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from varshift.lab.store import ResultStore

    _refuse_old_form(args)
    study = _study_name(args.study)
    out = args.out or _default_out(_EXPORT_ROOT, study, args.preset)
    with ResultStore(_existing_database(args.db), create=False) as store:
        for path in store.export(study, out, fmt=args.format, preset=args.preset):
            print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from varshift.lab.report import check_report_options, write_report

    _refuse_old_form(args)
    check_report_options(metric=args.metric, target=args.target)
    study = _study_name(args.study)
    out = Path(args.out) if args.out else _default_out(_REPORT_ROOT, study, args.preset)
    _check_out_folder(out)
    written = write_report(_existing_database(args.db), study, out, metric=args.metric,
                           reference=args.reference, preset=args.preset, target=args.target)
    print(written.markdown)
    print(written.html)
    return 0
