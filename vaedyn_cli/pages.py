"""Pieces of vaedyn's self-contained HTML pages (the run report, the study report): inline style,
escaped cells, tables, the figure section. Pages open from disk: sibling PNGs, no scripts."""

from __future__ import annotations

import html
from typing import Any

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1150px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}figure{margin:1.2em 0}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:.3em}.lead{font-size:1.1em;margin:.8em 0}
.note{background:#fff8e0;border-left:4px solid #e0b000;padding:.5em 1em}
pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}nav a{margin-right:1em}
"""


def esc(v: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(v))


def table(header: list[str] | None, rows: list[list[Any]], left: int = 1) -> str:
    """An HTML table; the first `left` columns left-aligned, the rest right-aligned (numbers)."""
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{esc(v)}</{tag}>"

    head = "<thead><tr>" + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def fmt(v: Any) -> str:
    """A table cell: None as "-", floats to 3 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def figures_html(figures: dict[str, str | None], captions: dict[str, tuple[str, str]]) -> str:
    """Each figure (file -> None when drawn, else why not) with its title and caption, or the note."""
    parts = []
    for name, why in figures.items():
        head, caption = captions[name]
        if why is None:
            parts.append(f'<figure><h3>{esc(head)}</h3><img src="{esc(name)}" alt="{esc(head)}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
        else:
            parts.append(f'<h3>{esc(head)}</h3><p class="note">Not drawn: {esc(why)}.</p>')
    return "\n".join(parts)
