"""The consoles the commands print with: tables whole when piped, one console per stream.

Rich sizes a console that is not a terminal at 80 columns and cuts wider tables; piped output
(a log file, ``| less``, CI) gets a wide console instead, so tables keep every column. On a
terminal the terminal's width is used.
"""

from __future__ import annotations

import sys
from functools import cache

from rich.console import Console

PIPED_WIDTH = 200


@cache
def console(stderr: bool = False) -> Console:
    """The shared console for stdout (or stderr): progress bars and log lines on a terminal
    go through the same one, so a log line never lands on a progress bar's line."""
    stream = sys.stderr if stderr else sys.stdout
    is_tty = stream.isatty()
    return Console(stderr=stderr, width=None if is_tty else PIPED_WIDTH)
