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

__all__ = ["CommandError", "main"]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


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
    except (CommandError, ValueError, TypeError, FileNotFoundError, ImportError, OSError) as exc:
        # One line for anything the user can fix; a traceback would bury the message.
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"varshift: error: {message}", file=sys.stderr)
        return 2
    return status
