"""The one table formatter: Markdown, padded into columns for a terminal or compact for files."""
from __future__ import annotations

from typing import Sequence

__all__ = ["format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "",
                 pad: bool = True) -> str:
    """A Markdown table. ``align`` holds one letter per column, ``l`` or ``r`` (default: the
    first column left, the others right, as for numbers); ``pad`` widens every cell to its
    column so the table also reads as plain text."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    if any(len(r) != len(headers) for r in cells):
        raise ValueError(f"rows: expected {len(headers)} cells per row")
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(3, *(len(r[i]) for r in cells)) if pad else 3 for i in range(len(headers))]

    def line(row) -> str:
        if not pad:
            return "| " + " | ".join(row) + " |"
        padded = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if a == "l" else ("-" * (w + 1) + ":")
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
