"""Markdown tables and a small, dependency-free Markdown → HTML rendering with embedded images.

The HTML page embeds its images (base64), so it is one file that opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")  # a pipe not escaped by a backslash


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table; a ``|`` inside a cell is escaped (``\\|``)."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    lines = [line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)]
    return "\n".join(lines) + "\n"


def markdown_to_html(markdown: str, *, title: str, images: Mapping[str, Path]) -> str:
    """A small, dependency-free rendering of the report's Markdown (headings, tables, lists, images,
    paragraphs); ``images`` maps each image file name used in the Markdown to its path, embedded."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if table:
            head, *rest = table
            cells = "".join(f"<th>{c}</th>" for c in head)
            rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rest)
            body.append(f"<table><thead><tr>{cells}</tr></thead><tbody>{rows}</tbody></table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            raw = _CELL_SEPARATOR.split(line.strip().removeprefix("|").removesuffix("|"))
            cells = [_inline(c.strip().replace("\\|", "|")) for c in raw]
            if not all(set(c) <= {"-", ":"} for c in cells):
                table.append(cells)
            continue
        flush_table()
        image = re.fullmatch(r"!\[(.*?)\]\((.*?)\)", line.strip())
        if image:
            body.append(_embedded(image.group(1), images.get(image.group(2))))
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<ul><li>{_inline(line[2:])}</li></ul>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
        "line-height:1.45}table{border-collapse:collapse;margin:1rem 0}"
        "td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}"
        "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}ul{margin:.2rem 0}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _inline(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _embedded(alt: str, path: Path | None) -> str:
    if path is None or not path.is_file():
        return f"<p>[missing image: {html.escape(alt)}]</p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></figure>"
