"""Durable small writes: a file replaced atomically, a directory entry made durable; JSON files, gzipped when
their name ends in .gz."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any:
    """A JSON file, gunzipped first when its name ends in .gz."""
    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())


def write_json(path: Path, value: Any) -> None:
    """`value` as one line of JSON, gzipped when the name ends in .gz; the folder is made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value) + "\n"
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)


def write_result(path: Path, result: Any, plot: Callable[[Any, Path], None]) -> None:
    """A command's `result` as indented JSON at `path` and its plot as a PNG beside it (the folder made if
    missing); says where both went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    png = path.with_suffix(".png")
    plot(result, png)
    print(f"wrote {path} and {png}")


def write_atomically(path: Path, content: str | bytes, durable: bool = True) -> None:
    """Readers see the old content or the new, never a torn file, and the new survives a crash (with
    `durable` False, a power cut may leave the old content: no fsync)."""
    tmp = temporary_for(path)
    with open(tmp, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
    if durable:
        install(tmp, path)
    else:
        os.replace(tmp, path)


def temporary_for(path: Path) -> Path:
    """Where a new version of `path` is written before `install` puts it in place."""
    return path.with_name(path.name + ".tmp")


def install(tmp: Path, path: Path) -> None:
    """Make the fully written `tmp` durable, then atomically the file at `path`."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
