"""A plain-text table formatter: the budget table, FiF-mini's and the converters' summaries and the sweep reports print
their rows through :func:`format_table`, so those tables look alike (``fomo-ray score`` and the cost estimate lay out
their own lines)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def format_cell(v: Any) -> str:
    """A table cell: '-' for missing, 4 significant digits for floats."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # NaN
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, *,
                 headers: Sequence[str] | None = None, markdown: bool = False, cell=format_cell) -> str:
    """``rows`` as a fixed-width table (or a Markdown table), one line per row.

    ``columns`` picks and orders the keys (default: the first row's); ``headers`` renames them for display;
    ``cell`` turns a value into its text (default :func:`format_cell`). No rows give just the header."""
    cols = list(columns if columns is not None else (rows[0] if rows else []))
    head = list(headers) if headers is not None else cols
    body = [[cell(r.get(c)) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [[h.ljust(w) for h, w in zip(head, widths)], ["-" * w for w in widths]]
    lines += [[v.ljust(w) for v, w in zip(b, widths)] for b in body]
    return "\n".join("  ".join(line).rstrip() for line in lines)
