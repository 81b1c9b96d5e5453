"""One way to make a PNG here: headless matplotlib, saved and closed. Tooling only: serving code never
imports this module, and matplotlib comes with the `[bench]` and `[train]` extras."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def figures(path: Path, count: int, size: tuple[float, float], title: str = "") -> Iterator[Any]:
    """`count` axes side by side; yields them as a sequence, saves the PNG on exit."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, count, figsize=size)
    try:
        yield axes if count > 1 else [axes]
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
