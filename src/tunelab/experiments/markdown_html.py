"""The one markdown -> HTML renderer of tunelab's reports (analysis section, tune report).

Reports are written as markdown first (what people read in a terminal or on GitHub) and rendered to a
self-contained HTML page from that same text, so the two never disagree. The subset is what the
reports use: ``#`` headings, ``- `` bullet lists, ``|`` tables (the ``---`` separator row dropped),
``**bold**`` / ``*italic*``, paragraphs, and ``![name](plots/name.png)`` images inlined as base64 PNGs
from ``pngs`` (an image whose bytes are missing is left out).
"""

from __future__ import annotations

import base64
import html
import re

PAGE_STYLE = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em}"
              "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}")


def inline(text: str) -> str:
    """Escape ``text`` and render its ``**bold**`` and ``*italic*`` spans."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", text)


def image(name: str, png: bytes) -> str:
    return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(lines: list[str]) -> str:
    rows = [r for r in lines if not set(r.replace("|", "").strip()) <= set("-: ")]
    cells = [[inline(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(markdown: str, pngs: dict[str, bytes | None] | None = None) -> str:
    """The markdown as an HTML fragment (no ``<html>`` wrapper); see the module docstring."""
    pngs = pngs or {}
    parts: list[str] = []
    block: list[str] = []  # the current run of list items or table lines
    kind = ""

    def flush() -> None:
        nonlocal kind
        if kind == "list":
            parts.append("<ul>" + "".join(f"<li>{inline(item[2:])}</li>" for item in block) + "</ul>")
        elif kind == "table":
            parts.append(_table(block))
        block.clear()
        kind = ""

    for line in markdown.splitlines():
        line_kind = "list" if line.startswith("- ") else "table" if line.startswith("|") else ""
        if line_kind != kind:
            flush()
        if line_kind:
            kind = line_kind
            block.append(line)
        elif line.startswith("![") and "(plots/" in line and ".png" in line:
            name = line[line.index("(plots/") + 7:line.index(".png")]
            if pngs.get(name) is not None:
                parts.append(image(name, pngs[name]))
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            parts.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            parts.append(f"<p>{inline(line)}</p>")
    flush()
    return "".join(parts)


def page(title: str, body: str) -> str:
    """A complete, self-contained HTML page around ``body``."""
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{PAGE_STYLE}</style></head><body>{body}</body></html>\n")
