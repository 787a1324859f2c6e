"""The laboratory: run studies of the Dropout/BatchNorm variance shift, store every trial, report.

A study file (TOML) describes a base configuration, the axes to sweep and the seeds;
:func:`load_study` validates all of it up front and expands it into :class:`TrialSpec` cells;
:func:`run_trial` trains one cell and returns a :class:`TrialResult`.

Each line below re-exports one module's public names; add new modules as new lines.
"""

from varshift.lab.backends import BACKENDS, Backend, make_backend
from varshift.lab.config import ConfigError, TrialConfig
from varshift.lab.models import build_model
from varshift.lab.report import ReportPaths, build_report, write_report
from varshift.lab.results import EpochRecord, LayerShiftRecord, TrialResult, TrialStatus
from varshift.lab.runner import DEFAULT_DB, RunSummary, run_study
from varshift.lab.stats import Comparison, compare_arms, epochs_to_target
from varshift.lab.store import DriverLockError, ResultStore, StoreError, StudyChangedError
from varshift.lab.study import Study, TrialSpec, builtin_studies, load_study
from varshift.lab.trial import run_trial

__all__ = [
    "BACKENDS",
    "DEFAULT_DB",
    "Backend",
    "DriverLockError",
    "ResultStore",
    "RunSummary",
    "StoreError",
    "StudyChangedError",
    "make_backend",
    "run_study",
    "ConfigError",
    "EpochRecord",
    "LayerShiftRecord",
    "Study",
    "TrialConfig",
    "TrialResult",
    "TrialSpec",
    "TrialStatus",
    "build_model",
    "builtin_studies",
    "load_study",
    "run_trial",
    "ReportPaths",
    "build_report",
    "write_report",
    "Comparison",
    "compare_arms",
    "epochs_to_target",
]
