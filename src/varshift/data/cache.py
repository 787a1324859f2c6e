"""An on-disk cache of generated arrays (.npz), for datasets that are cheap to regenerate but
not free (MNIST-1D)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["cached_arrays", "default_cache_dir"]

Arrays = dict[str, NDArray[Any]]


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder for varshift's generated data: ``cache_dir`` if given, else the environment
    variable ``VARSHIFT_CACHE``, else ``~/.cache/varshift``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("VARSHIFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "varshift"


def cached_arrays(
    path: Path, make: Callable[[], Arrays], check: Callable[[Mapping[str, NDArray[Any]]], None]
) -> tuple[Arrays, str]:
    """Read the arrays stored at ``path``, or build them with ``make()`` and store them there.

    ``check`` raises ``ValueError``/``KeyError`` when the arrays are not what ``make`` would
    produce; a file that fails to load or fails ``check`` is treated as corrupt: a
    ``RuntimeWarning`` says so and the arrays are rebuilt and rewritten. Returns the arrays and
    ``"cache"`` or ``"generated"``. The file is read with ``allow_pickle=False``, so a tampered
    cache cannot run code.
    """
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files}
            check(arrays)
            return arrays, "cache"
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            warnings.warn(
                f"cache file {path} is unreadable or stale ({err}); regenerating it",
                RuntimeWarning,
                stacklevel=3,
            )
    arrays = make()
    _write_atomically(path, arrays)
    return arrays, "generated"


def _write_atomically(path: Path, arrays: Arrays) -> None:
    # Write to a temporary file in the same folder, then rename: parallel trials that generate
    # the same dataset never see (or leave behind) a half-written cache file.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        # A read-only home must not stop an experiment; the data is in memory already.
        warnings.warn(
            f"could not write cache file {path} ({err}); continuing without a cache",
            RuntimeWarning,
            stacklevel=3,
        )
