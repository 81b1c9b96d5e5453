"""Plain-text tables for tooling output (benchmarks, load tests, evaluation)."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned text table; columns are (header, format spec), None prints as '-'."""
    cells = [["-" if v is None else format(v, spec) for v, (_, spec) in zip(row, columns, strict=True)]
             for row in rows]
    headers = [header for header, _ in columns]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])
