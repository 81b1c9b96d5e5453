"""One way to make a PNG here: headless matplotlib, saved and closed. Tooling only: serving code never
imports this module, and matplotlib comes with the `[bench]` and `[train]` extras."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def figures(path: Path, count: int, size: tuple[float, float], title: str = "") -> Iterator[Any]:
    """`count` axes side by side; yields them as a sequence, saves the PNG on exit."""
    with _saved(path, 1, count, size, title) as axes:
        yield axes


@contextmanager
def figure_grid(path: Path, rows: int, columns: int, title: str = "") -> Iterator[Any]:
    """rows x columns axes (5.5 x 3.2 inches each), yielded as one flat sequence; the PNG saved on exit."""
    with _saved(path, rows, columns, (5.5 * columns, 3.2 * rows), title) as axes:
        yield axes


@contextmanager
def _saved(path: Path, rows: int, columns: int, size: tuple[float, float], title: str) -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=size, squeeze=False)
    try:
        yield list(axes.flat)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


@contextmanager
def figure(path: Path, size: tuple[float, float] = (7, 4)) -> Iterator[Any]:
    """One axes, saved to `path` on exit."""
    with figures(path, 1, size) as axes:
        yield axes[0]


def range_whiskers(samples: Sequence[Sequence[float]], centres: Sequence[float]) -> list[list[float]]:
    """matplotlib's `yerr` for bars at `centres` whose whiskers span each bar's samples, lowest to highest."""
    return [[c - min(s) for s, c in zip(samples, centres, strict=True)],
            [max(s) - c for s, c in zip(samples, centres, strict=True)]]
