"""Helpers for the CLI tests: run ``varshift`` in-process and expect one error line."""

from __future__ import annotations

import pytest

from varshift.cli import main


def fails_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``argv``, expect exit status 2 and return the single line written to stderr."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = int(exit_.code or 0)
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]
