"""The console the commands print tables and reports with: whole tables when piped.

Rich sizes a console that is not a terminal at 80 columns and cuts wider tables; piped output
(a log file, ``| less``, CI) gets a wide console instead, so tables keep every column. On a
terminal the terminal's width is used. (Log lines and progress bars share the terminal
through the bar's own console: see ``defectd.log.configure_logging``.)
"""

from __future__ import annotations

import sys
from functools import cache
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

PIPED_WIDTH = 200


@cache
def report_console(stderr: bool = False) -> Console:
    """The console for stdout (or stderr), one per stream; wide when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    is_tty = stream.isatty()
    return Console(stderr=stderr, width=None if is_tty else PIPED_WIDTH)


def counting_bar(label: str, console: Console, *, quiet: bool) -> Progress:
    """A transient bar ``label ━━━ done/total`` on ``console`` (use it as a context manager),
    hidden when ``quiet`` (``--json``) or when ``console`` is not a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=True,
    )
