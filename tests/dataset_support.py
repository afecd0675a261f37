"""Data sets on disk as the tests shape them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def keep_manifest_rows(data: Path, keep: Callable[[str], bool]) -> None:
    """Rewrite ``data/manifest.csv`` with its header and only the rows (lines of text) for which
    ``keep`` holds, e.g. ``lambda row: row.endswith(",1")``: the defective parts."""
    manifest = data / "manifest.csv"
    header, *rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([header, *(r for r in rows if keep(r))]) + "\n")
