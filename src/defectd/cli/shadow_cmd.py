"""``defectd shadow report``: how a candidate model in shadow mode compares with the live one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from defectd.cli.app import sub_app
from defectd.cli.console import report_console
from defectd.cli.options import JsonTable
from defectd.errors import ConfigError

shadow_app = sub_app(
    "shadow", "Shadow mode: a candidate model inspecting the live frames beside the live model."
)


@shadow_app.command("report")
def report(
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="The station's state directory (daemon.state_dir)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="The station config; its state directory is read."),
    ] = None,
    as_json: JsonTable = False,
    limit: Annotated[
        int, typer.Option("--limit", min=0, help="Disagreements listed in the table (not --json).")
    ] = 20,
) -> None:
    """Summarise the latest shadow candidate against the live model it ran beside: parts
    compared, skipped, agreement, the live/shadow confusion, per-class disagreement, and every
    disagreement with its archived evidence (--json: the object docs/lifecycle.md documents).
    Exit 2 when there is no shadow record."""
    from defectd.daemon.shadow.store import shadow_report

    if (state_dir is None) == (config is None):
        raise ConfigError("give one of --state-dir and --config")
    if config is not None:
        from defectd.daemon.config import load_station_config

        state_dir = load_station_config(config).state_dir
    assert state_dir is not None
    result = shadow_report(state_dir)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print(result, limit)


def _print(r: dict[str, Any], limit: int) -> None:
    console = report_console()
    cand, live = r["candidate"], r["live"]
    head = Table(
        title=f"shadow report: {r['station']} ({r['since']} .. {r['until']})", show_header=False
    )
    head.add_row(
        "candidate", f"{cand['name']} {cand['sha256'][:12]} ({cand['engine']}) {cand['path']}"
    )
    head.add_row("live", f"{live['name']} {live['sha256'][:12]}")
    head.add_row("parts compared", str(r["parts"]))
    head.add_row("skipped (load)", str(r["skipped"]))
    head.add_row(
        "not compared (error)", f"live {r['errors']['live']}, shadow {r['errors']['shadow']}"
    )
    agreement = r["agreement"]
    head.add_row("agreement", "-" if agreement is None else f"{agreement:.4f}")
    iou = r["iou"]
    head.add_row(
        "mask IoU", "-" if iou is None else f"mean {iou['mean']:.3f}, min {iou['min']:.3f}"
    )
    console.print(head)

    conf = Table(title="live (rows) vs shadow (columns)")
    conf.add_column("")
    conf.add_column("shadow pass", justify="right")
    conf.add_column("shadow fail", justify="right")
    for lv in ("pass", "fail"):
        c = r["confusion"]
        conf.add_row(f"live {lv}", str(c[f"{lv}/pass"]), str(c[f"{lv}/fail"]))
    console.print(conf)

    classes = Table(title="disagreement per class and camera")
    for col in ("", "parts", "disagreements"):
        classes.add_column(col, justify="right" if col else "left")
    for name, tally in (
        *r["per_class"].items(),
        *(("camera " + k, v) for k, v in r["per_camera"].items()),
    ):
        classes.add_row(name, str(tally["parts"]), str(tally["disagreements"]))
    console.print(classes)

    rows = r["disagreements"]
    if rows:
        dis = Table(title=f"disagreements ({len(rows)}; first {min(limit, len(rows))})")
        for col in ("time", "camera", "seq", "part", "live", "shadow", "truth", "iou", "archive"):
            dis.add_column(col)
        for d in rows[:limit]:
            dis.add_row(
                str(d["t"]),
                d["camera"],
                str(d["seq"]),
                str(d["part_id"] or "-"),
                d["live"],
                d["shadow"],
                str(d["truth"] or "-"),
                "-" if d["iou"] is None else f"{d['iou']:.3f}",
                str(d["archive"] or "(not archived)"),
            )
        console.print(dis)
