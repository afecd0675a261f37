"""Options that several ``defectd`` commands take with the same meaning, declared once.

A command uses one as its parameter's type, with its default: ``as_json: JsonTable = False``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonTable = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")
]
"""``--json`` of a command that otherwise prints a table (the calibrations, ``config check``,
``engines``, ``eval``, ``compare``)."""

JsonSummary = Annotated[
    bool, typer.Option("--json", help="Print one JSON summary object on stdout.")
]
"""``--json`` of a command that makes something and otherwise logs its progress."""

CalibrationOut = Annotated[
    Path, typer.Option("--out", "-o", help="Calibration file to create or update (JSON).")
]
"""``--out`` of ``defectd calibrate ...``: the file whose own section the command writes."""

DatasetIn = Annotated[
    Path, typer.Option("--data", "-d", help="Dataset folder (manifest or MVTec AD layout).")
]
"""``--data`` of training, evaluation and comparison."""

LabelledDataset = Annotated[Path, typer.Option("--data", "-d", help="Labelled dataset folder.")]
"""``--data`` of the calibrations that need masks."""

InferenceBatch = Annotated[int, typer.Option("--batch-size", help="Images per inference batch.")]
"""``--batch-size`` of the commands that run a model over a data set split."""

InferenceThreads = Annotated[
    int | None, typer.Option(help="Inference threads (default: all cores).")
]
"""``--threads`` of the commands that run a model over a data set split."""
