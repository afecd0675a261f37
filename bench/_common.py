"""What several benches share: the CPU's name for the machine header of a report, the share
of CPU time the hypervisor took (steal) while a row ran, and the fixed-width table they print
their rows in.

Benches run as scripts (``python bench/x.py``), so this folder is on ``sys.path`` and they
import it as ``_common``."""

from __future__ import annotations

import re
import string
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO


def cpu_model(unknown: str = "unknown CPU") -> str:
    """The ``model name`` line of /proc/cpuinfo, or ``unknown`` where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return unknown


def cpu_ticks() -> tuple[int, int] | None:
    """``(steal, total)`` clock ticks of all CPUs so far (/proc/stat), or None where unknown.

    On a virtual machine *steal* is time a vCPU was ready to run but the host ran something
    else: the VM's form of load from other work, invisible in the load average."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    return ticks[7], sum(ticks[:8])


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Percent of all CPU time between two :func:`cpu_ticks` readings that was stolen."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round(100.0 * (after[0] - before[0]) / (after[1] - before[1]), 1)


def print_rows(
    headings: Sequence[str],
    row: str,
    rows: Iterable[Mapping[str, Any]],
    *,
    rule: bool = False,
    file: TextIO | None = None,
) -> None:
    """Print a heading line, then each of ``rows`` through the ``str.format`` template ``row``.

    ``row`` names each column's key and format (``"{name:<15}{fps:>9.2f}"``); ``headings`` (one
    a column) are set in the alignment and width of that format, with the template's text
    between columns kept. ``rule`` prints a line of dashes under the headings.
    """
    out = sys.stdout if file is None else file
    titles = iter(headings)
    head = ""
    for text, key, spec, _ in string.Formatter().parse(row):
        head += text
        if key is not None:
            m = re.match(r"[<>^]?\d*", spec or "")
            head += format(next(titles), m.group(0) if m else "")
    print(head, file=out)
    if rule:
        print("-" * len(head), file=out)
    for r in rows:
        print(row.format(**r), file=out)
