"""The runnable examples of ``docs/recipes.md``: fenced Python blocks whose first line starts
with ``# Runs as is``, so that the page cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def runnable_example(topic: str) -> str:
    """The source of the one runnable block whose first line mentions ``topic``."""
    blocks = [
        code
        for code in _BLOCK.findall(RECIPES.read_text(encoding="utf-8"))
        if code.startswith("# Runs as is") and topic in code.splitlines()[0]
    ]
    if len(blocks) != 1:
        raise LookupError(f"expected one runnable block about {topic!r}, found {len(blocks)}")
    return blocks[0]
