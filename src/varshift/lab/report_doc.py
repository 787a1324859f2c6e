"""The report as a list of blocks, rendered twice: to Markdown and to one self-contained HTML page.

:mod:`varshift.lab.report` decides *what* the report says once, as :class:`Heading`,
:class:`Text`, :class:`Bullets`, :class:`Table` and :class:`Image` blocks; this module only
decides how each block looks, so the two files cannot drift apart. Inline text may use
```code``` spans; everything else is escaped.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["Block", "Bullets", "Heading", "Image", "Table", "Text", "to_html", "to_markdown"]


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """One paragraph."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]
    #: "warning" lists are shown in a coloured box in HTML and marked in Markdown.
    kind: Literal["plain", "warning"] = "plain"


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells; ``highlight`` holds the indices of rows to stand out
    (the reference arm)."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    highlight: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise ValueError(f"table row {i} has {len(row)} cells for {len(self.header)} "
                                 "columns")

    def numeric(self) -> list[bool]:
        """Which columns hold numbers (right-aligned): every filled cell starts like one."""
        number = re.compile(r"^[-+−]?(\d|\.\d|inf|nan)", re.IGNORECASE)
        placeholders = {"", "—", "n/a", "reference"}
        return [
            all(number.match(row[i]) for row in self.rows if row[i] not in placeholders)
            and any(row[i] not in placeholders for row in self.rows)
            for i in range(len(self.header))
        ]


@dataclass(frozen=True)
class Image:
    """A PNG written next to the report; Markdown links it, HTML inlines it."""

    path: Path
    caption: str


Block = Heading | Text | Bullets | Table | Image


# -- Markdown ------------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    rule = ["---:" if numeric else "---" for numeric in table.numeric()]
    lines = ["| " + " | ".join(map(_md_cell, table.header)) + " |", "| " + " | ".join(rule) + " |"]
    for i, row in enumerate(table.rows):
        cells = [_md_cell(cell) for cell in row]
        if i in table.highlight:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def to_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown; images are linked by file name (they sit beside it)."""
    parts: list[list[str]] = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append([f"{'#' * block.level} {block.text}"])
        elif isinstance(block, Text):
            parts.append([block.text])
        elif isinstance(block, Bullets):
            prefix = "- **Warning:** " if block.kind == "warning" else "- "
            parts.append([f"{prefix}{item}" for item in block.items])
        elif isinstance(block, Table):
            parts.append(_md_table(block))
        else:
            parts.append([f"![{block.path.stem}]({block.path.name})", "", f"*{block.caption}*"])
    return "\n\n".join("\n".join(lines) for lines in parts) + "\n"


# -- HTML ----------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2433;
       background: #fff; max-width: 1150px; margin: 2em auto; padding: 0 1.2em; line-height: 1.45; }
h1 { border-bottom: 2px solid #3465a4; padding-bottom: .2em; }
h2 { margin-top: 1.8em; color: #204a87; }
table { border-collapse: collapse; margin: 1em 0; font-size: .86em; }
th, td { border: 1px solid #c8ccd4; padding: .25em .45em; vertical-align: top; }
th { background: #e8edf5; text-align: left; }
td.wide { min-width: 14em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #f6f7f9; }
tr.highlight td { background: #fff4c2; font-weight: 600; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #dde1e8; }
figcaption { color: #555c68; font-size: .92em; }
ul.warning { background: #fff1e6; border-left: 4px solid #e07b00; padding: .6em 1em .6em 2em; }
code { background: #eef0f3; padding: 0 .25em; border-radius: 3px; }
"""


def _inline(text: str) -> str:
    """Escape ``text`` and turn ```code``` spans into ``<code>``."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_table(table: Table) -> list[str]:
    numeric = table.numeric()
    # Long labels (arm names) get a minimum width, so the browser does not squeeze them into a
    # narrow column beside the numbers, which never wrap.
    classes = ["num" if numeric[j] else
               "wide" if max((len(row[j]) for row in table.rows), default=0) > 24 else ""
               for j in range(len(table.header))]
    lines = ["<table>", "<thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in table.header)
             + "</tr></thead>", "<tbody>"]
    for i, row in enumerate(table.rows):
        cells = "".join(f'<td class="{classes[j]}">{_inline(c)}</td>' if classes[j] else
                        f"<td>{_inline(c)}</td>" for j, c in enumerate(row))
        attrs = ' class="highlight"' if i in table.highlight else ""
        lines.append(f"<tr{attrs}>{cells}</tr>")
    lines += ["</tbody>", "</table>"]
    return lines


def _html_image(image: Image) -> list[str]:
    data = base64.b64encode(image.path.read_bytes()).decode("ascii")
    caption = _inline(image.caption)
    return ["<figure>", f'<img src="data:image/png;base64,{data}" alt="{caption}">',
            f"<figcaption>{caption}</figcaption>", "</figure>"]


def to_html(blocks: Sequence[Block], title: str) -> str:
    """One HTML page with its CSS inline and every image as a base64 data URI: no file or
    network access is needed to view it."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            attrs = ' class="warning"' if block.kind == "warning" else ""
            body.append(f"<ul{attrs}>" + "".join(f"<li>{_inline(item)}</li>"
                                                for item in block.items) + "</ul>")
        elif isinstance(block, Table):
            body.extend(_html_table(block))
        else:
            body.extend(_html_image(block))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        *body, "</body>", "</html>", ""])
