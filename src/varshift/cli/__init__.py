"""The ``varshift`` command line: a thin shell that parses, calls one public function, prints.

Every sub-command lives in its own module with a ``register(subparsers)`` function that adds its
parser and sets ``handler``. Heavy imports (torch, matplotlib, ray) happen inside the handlers so
that ``varshift --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from varshift import __version__
from varshift.cli import demo, diagnose, lab, theory

__all__ = ["CommandError", "main", "one_line"]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


# What the user can fix: printed as one line by `main`. MemoryError: numpy's "Unable to allocate
# 72.8 TiB for an array ..." names the size that was asked for.
_USER_ERRORS = (CommandError, ValueError, TypeError, OSError, ImportError, MemoryError)


class _OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="varshift",
        description="Diagnose, measure and fix the Dropout/BatchNorm variance shift.",
    )
    parser.add_argument("--version", action="version", version=f"varshift {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_OneLineParser
    )
    subparsers.required = True
    for module in (theory, diagnose, demo, lab):
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``varshift`` script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
    except KeyboardInterrupt:
        print("varshift: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as exc:
        # One line for anything the user can fix; a traceback would bury the message.
        print(f"varshift: error: {one_line(str(exc)) or type(exc).__name__}", file=sys.stderr)
        return 2
    return status


def one_line(message: str) -> str:
    """``message`` on one line, every line kept: ``"bad config (2 problems):\n - a\n - b"``
    becomes ``"bad config (2 problems): a; b"``. Blank lines and list bullets are dropped; a
    line after one that ends in a colon follows it after a space, any other after ``"; "``."""
    text = ""
    for raw in message.splitlines():
        line = raw.strip().removeprefix("- ").removeprefix("* ").strip()
        if not line:
            continue
        if text:
            text += " " if text.endswith(":") else "; "
        text += line
    return text
