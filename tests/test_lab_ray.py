"""The Ray backend on a real local Ray instance (2 CPUs): the same numbers as the local backend,
a trial that kills its Ray worker fails alone, and Ray is shut down afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tiny_lab import TinyStudy, assert_same_results, comparable, run_tiny
from varshift.lab.store import ResultStore

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def test_ray_backend_matches_the_local_backend(tmp_path: Path) -> None:
    from helpers import tiny_lab

    # Ray workers do not share the test's sys.path; send the trial function's code along.
    ray.cloudpickle.register_pickle_by_value(tiny_lab)
    arms = {"low": {"p": 0.1}, "high": {"p": 0.5}}
    local = run_tiny(TinyStudy(arms), tmp_path / "local.db")
    assert (local.done, local.failed) == (4, 0)
    remote = run_tiny(
        TinyStudy({**arms, "dies": {"crash": True}}), tmp_path / "ray.db", backend="ray", workers=2
    )
    assert not ray.is_initialized()  # the backend started Ray, so it shut it down
    assert (remote.done, remote.failed) == (4, 2)
    with ResultStore(tmp_path / "ray.db", create=False) as store:
        trials = store.frames("tiny")["trials"]
    failed = trials[trials.status == "failed"]
    assert set(failed.arm) == {"dies"}
    assert all(error.startswith("worker died") for error in failed.error)
    local_frames, ray_frames = comparable(tmp_path / "local.db"), comparable(tmp_path / "ray.db")
    trials = ray_frames["trials"]
    ray_frames["trials"] = trials[trials.arm != "dies"].reset_index(drop=True)
    assert_same_results(local_frames, ray_frames)
