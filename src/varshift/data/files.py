"""Finding and reading the files of on-disk datasets (never downloading them)."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

__all__ = ["data_folder", "find_file", "read_bytes"]


def data_folder(directory: str | os.PathLike[str], dataset: str) -> Path:
    """``directory`` as a Path, after checking that it is an existing folder."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{dataset}: data directory {str(folder)!r} does not exist or is not a folder"
        )
    return folder


def find_file(folders: Sequence[Path], names: Sequence[str], what: str) -> Path:
    """The first ``folder / name`` that is a file, trying folders in order and, within each,
    names in order; ``FileNotFoundError`` listing everything tried otherwise."""
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"{what} not found: looked for {' or '.join(names)} in "
        f"{', '.join(repr(str(f)) for f in folders)}"
    )


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when its name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise ValueError(f"{path}: not a valid gzip file ({err})") from err
