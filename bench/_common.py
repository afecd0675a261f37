"""What several benches share: the CPU's name for the machine header of a report.

Benches run as scripts (``python bench/x.py``), so this folder is on ``sys.path`` and they
import it as ``_common``."""

from __future__ import annotations

from pathlib import Path


def cpu_model(unknown: str = "unknown CPU") -> str:
    """The ``model name`` line of /proc/cpuinfo, or ``unknown`` where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return unknown
