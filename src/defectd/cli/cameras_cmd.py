"""``defectd cameras``: list the GenICam devices the GenTL producers see, with key node values."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer

from defectd.cli.app import app
from defectd.cli.console import report_console


@app.command("cameras")
def cameras(
    *,
    producer: Annotated[
        list[Path] | None,
        typer.Option(
            "--producer",
            "-p",
            help="GenTL producer (.cti) to load; repeat for several. "
            "Default: GENICAM_GENTL64_PATH, else the simulated viky.cti bundled with genicam.",
        ),
    ] = None,
    nodes: Annotated[
        bool,
        typer.Option(
            "--nodes/--no-nodes",
            help="Open each free device briefly to read PixelFormat, Width, Height, "
            "AcquisitionFrameRate, ExposureTime, Gain, TriggerMode.",
        ),
    ] = True,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object on stdout: producers and devices."),
    ] = False,
) -> None:
    """List the cameras the GenTL producers see, with their key node values.

    Shows vendor, model, serial, user-defined name, access status and the
    current PixelFormat, size, frame rate, exposure, gain and trigger mode.
    Producers: --producer, else GENICAM_GENTL64_PATH (folders or .cti files),
    else the simulated viky.cti shipped with the genicam package (three
    virtual cameras), so the command works out of the box. A device another
    program holds open is listed without node values. Select a camera in the
    station config by serial or name: device = { serial = "..." }.
    """
    from rich.table import Table

    from defectd.pipeline.sources.gentl import GenTLHub, bundled_producer, resolve_producers

    producers = resolve_producers(producer or [], allow_bundled=True)
    hub = GenTLHub(producers)
    try:
        devices = hub.describe(read_nodes=nodes)
    finally:
        hub.close()
    simulated = producers == (bundled_producer(),)

    if as_json:
        out = {
            "producers": [str(p) for p in producers],
            "simulated": simulated,
            "devices": [d.to_dict() for d in devices],
        }
        typer.echo(json.dumps(out))
        return

    console = report_console()
    names = ", ".join(str(p) for p in producers)
    console.print(f"producers: {names}" + ("  (simulated cameras)" if simulated else ""))
    if not devices:
        console.print("no camera found")
        return
    rows = [
        {
            "#": str(d.index),
            "vendor": d.vendor or "",
            "model": d.model or "",
            "serial": d.serial or "",
            "name": d.user_defined_name or "",
            "access": d.access if not d.detail else f"{d.access} ({d.detail})",
            "format": str(d.nodes.get("PixelFormat", "")),
            "size": _size(d.nodes),
            "fps": _num(d.nodes.get("AcquisitionFrameRate")),
            "exposure": _num(d.nodes.get("ExposureTime")),
            "gain": _num(d.nodes.get("Gain")),
            "trigger": str(d.nodes.get("TriggerMode", "")),
        }
        for d in devices
    ]
    # Columns no device fills (viky has no exposure, gain or trigger) are left out.
    columns = [c for c in rows[0] if any(row[c] for row in rows)]
    table = Table()
    for column in columns:
        table.add_column(column, justify="right" if column in _NUMERIC else "left")
    for row in rows:
        table.add_row(*(row[c] for c in columns))
    console.print(table)


_NUMERIC = {"#", "fps", "exposure", "gain"}


def _size(nodes: Mapping[str, object]) -> str:
    if "Width" in nodes and "Height" in nodes:
        return f"{nodes['Width']}x{nodes['Height']}"
    return ""


def _num(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)
