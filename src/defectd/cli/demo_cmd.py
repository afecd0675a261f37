"""``defectd demo``: the demo station with a live view and a summary against the truth."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from defectd.cli.app import app
from defectd.log import LogFormat, configure_logging


@app.command("demo")
def demo(
    ctx: typer.Context,
    *,
    duration: Annotated[
        float, typer.Option("--duration", min=1.0, help="Seconds to run once ready.")
    ] = 30.0,
    parts: Annotated[
        int | None,
        typer.Option("--parts", min=1, help="Stop after this many parts (instead of --duration)."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model to run (default: models/demo/model.onnx)."),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="Outbox and image archive (default: ./var/demo)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="No live view; print the summary as one JSON object."),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Keep info logs (they interleave with the view).")
    ] = False,
) -> None:
    """Run the demo station: synthetic camera line, bundled model, MQTT, live view.

    The broker is the local one on 127.0.0.1:1883 when it answers, else an embedded one.

    Ends after --duration seconds, --parts parts or Ctrl-C.

    The summary compares the verdicts with the truth the synthetic line knows.

    The same station runs as a daemon with: defectd run --config configs/demo.toml
    """
    from rich.console import Console

    from defectd.demo import run_demo, summary_table

    if not verbose:
        fmt = (ctx.parent.params.get("log_format") if ctx.parent else None) or "auto"
        configure_logging("warning", cast_format(fmt))
    summary = run_demo(
        duration_s=duration,
        parts=parts,
        model=model,
        state_dir=state_dir,
        live=not as_json,
        console=Console(stderr=as_json),
    )
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
    else:
        out = Console()
        out.print()
        out.print(summary_table(summary))


def cast_format(value: str) -> LogFormat:
    if value == "json":
        return "json"
    if value == "console":
        return "console"
    return "auto"
