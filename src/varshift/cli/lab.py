"""``varshift lab``: list and inspect studies, run them into a results database, watch, export
and report.

    varshift lab list
    varshift lab show example --preset quick
    varshift lab run example --preset quick --backend process --workers 2 --db runs.db
    varshift lab status runs.db
    varshift lab export runs.db --study example --out results/ --format parquet
    varshift lab report runs.db --study example --out report/

STUDY is a built-in name (``varshift lab list``) or a path to a study TOML file. Results go to
``./varshift-lab.db`` unless ``--db`` names another file; one file holds any number of studies.
``run`` exits 0 when every trial of the preset is done, 1 when some failed (or ``--fail-fast``
stopped it), 130 when interrupted; re-running it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["register"]

# varshift.lab.runner.DEFAULT_DB, repeated so that `varshift --help` need not import the lab.
_DEFAULT_DB = "varshift-lab.db"


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

    show = commands.add_parser("show", help="a study's presets, arms, axes and trial count")
    show.add_argument("study", metavar="STUDY", help="built-in name or path to a TOML file")
    show.add_argument("--preset", default=None, help="show only this preset (default: all)")
    show.set_defaults(handler=_show)

    run = commands.add_parser(
        "run",
        help="run a study's trials that are not done yet",
        description="Run every trial of a study preset that is not done yet, recording each as "
        "it finishes; re-running resumes. Exit status: 0 all done, 1 some failed, 130 "
        "interrupted.",
    )
    run.add_argument("study", metavar="STUDY", help="built-in name or path to a TOML file")
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
    _add_db(run, required=False)
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

    status = commands.add_parser("status", help="trials by status in a results database")
    _add_db(status, required=True)
    status.add_argument("--study", default=None, help="only this study")
    status.set_defaults(handler=_status)

    export = commands.add_parser("export", help="write a study's results as CSV or Parquet")
    _add_db(export, required=True)
    export.add_argument("--study", required=True, help="study name in the database")
    export.add_argument(
        "--out", required=True, help="folder, or file name ending in .csv/.parquet"
    )
    export.add_argument("--format", choices=("csv", "parquet"), default="csv")
    export.add_argument("--preset", default=None, help="only this preset's trials")
    export.set_defaults(handler=_export)

    report = commands.add_parser("report", help="statistics and figures of a study")
    _add_db(report, required=True)
    report.add_argument("--study", required=True, help="study name in the database")
    report.add_argument("--out", required=True, help="folder for the report")
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


def _add_db(parser: argparse.ArgumentParser, *, required: bool) -> None:
    if required:
        parser.add_argument("db", metavar="DB", help="results database file")
    else:
        parser.add_argument(
            "--db", default=_DEFAULT_DB, help=f"results database file (default ./{_DEFAULT_DB})"
        )


@contextmanager
def _one_line_config_errors() -> Iterator[None]:
    """A study file with one problem is a one-line error; with several, each is printed on
    stderr before a one-line summary (all of them are needed to fix the file at once)."""
    from varshift.cli import CommandError
    from varshift.lab.config import ConfigError

    try:
        yield
    except ConfigError as exc:
        if len(exc.problems) == 1:
            raise CommandError(f"invalid {exc.what}: {exc.problems[0]}") from None
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        count = len(exc.problems)
        raise CommandError(f"invalid {exc.what} ({count} problems, listed above)") from None


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

    lines = []
    with _one_line_config_errors():
        study = load_study(args.study)
        lines.append(f"{study.name}: {study.description}")
        if study.path is not None:
            lines.append(f"  file: {study.path}")
        for preset in study.presets if args.preset is None else [args.preset]:
            specs = study.expand(preset)
            arms = list(dict.fromkeys(spec.arm for spec in specs))
            seeds = sorted({spec.seed for spec in specs})
            lines.append(
                f"preset {preset}: {len(specs)} trials = {len(arms)} arms x {len(seeds)} seeds"
            )
            for axis, values in study.axes(preset).items():
                lines.append(f"  axis {axis}: {', '.join(map(str, values))}")
            reference = study.reference_arm(preset)
            lines.extend(
                f"  arm {arm}{'  (reference)' if arm == reference else ''}" for arm in arms
            )
    print("\n".join(lines))
    return 0


def _run(args: argparse.Namespace) -> int:
    from varshift.cli import CommandError
    from varshift.lab.backends import default_threads
    from varshift.lab.runner import run_study
    from varshift.lab.store import DriverLockError, StoreError
    from varshift.lab.study import load_study

    if args.backend != "ray" and (args.ray_address or args.gpus_per_trial):
        raise CommandError("--ray-address and --gpus-per-trial need --backend ray")
    workers = args.workers
    if workers is None:
        # default_threads(1) is the number of cores this process may use.
        workers = 1 if args.backend == "local" else default_threads(1)
    with _one_line_config_errors():
        study = load_study(args.study)
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


def _status(args: argparse.Namespace) -> int:
    from varshift.lab.store import ResultStore

    with ResultStore(args.db, create=False) as store:
        names = store.study_names() if args.study is None else [args.study]
        if not names:
            print(f"{args.db}: no studies yet")
        for name in names:
            for preset in store.presets(name):
                counts = store.summary(name, preset)
                total = sum(counts.values())
                text = ", ".join(f"{count} {status}" for status, count in counts.items())
                print(f"{name} [{preset}]: {counts['done']}/{total} done ({text})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from varshift.lab.store import ResultStore

    with ResultStore(args.db, create=False) as store:
        for path in store.export(args.study, args.out, fmt=args.format, preset=args.preset):
            print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from varshift.lab.report import write_report

    written = write_report(args.db, args.study, args.out, metric=args.metric,
                           reference=args.reference, preset=args.preset, target=args.target)
    for name in ("markdown", "html"):
        path = getattr(written, name, None)
        if path is not None:
            print(path)
    return 0
