"""``defectd config``: check a station config before deploying it, or show it with defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from defectd.cli.app import sub_app
from defectd.cli.console import report_console
from defectd.cli.options import JsonTable

config_app = sub_app("config", "Check or show a station config (TOML).")

FileArg = Annotated[Path, typer.Argument(help="Station config file (TOML).", show_default=False)]


@config_app.command("check")
def check(
    file: FileArg,
    as_json: JsonTable = False,
    cameras: Annotated[
        bool,
        typer.Option(
            "--cameras",
            help="Also open each camera (GenICam: device found and configured) and close it "
            "again; not while the daemon holds them.",
        ),
    ] = False,
) -> None:
    """Validate FILE as `defectd run` would: every bad key is named; exit 2 when invalid.

    Runs the same checks as `defectd run` before it starts: the model opens on its engine
    with a valid card, and every referenced file (calibration, ignore zones, producers,
    replay paths, password and TLS files) is usable; state folders can be created. Does not
    connect to the broker; opens the cameras only with --cameras. Writes nothing.
    """
    from defectd.daemon.config import load_station_config
    from defectd.daemon.preflight import check_station

    cfg = load_station_config(file)
    result = check_station(cfg, open_cameras=cameras)
    summary = {
        "ok": True,
        "file": str(file),
        "station": cfg.station,
        "model": str(cfg.model.path),
        "model_name": result.model,
        "model_sha256": result.model_sha256,
        "backend": cfg.model.backend,
        "engine": result.engine,
        "cameras": {c.camera: c.source.type for c in cfg.cameras},
        "cameras_opened": list(result.cameras_opened) if cameras else None,
        "broker": f"{cfg.mqtt.host}:{cfg.mqtt.port}",
        "topic_prefix": cfg.mqtt.topic_prefix,
        "state_dir": str(cfg.state_dir),
        "outbox": str(cfg.outbox.path),
        "archive": str(cfg.archive.dir) if cfg.archive.enabled else None,
        "health": cfg.health.address if cfg.health.enabled else None,
        "config_hash": cfg.hash(),
        "warnings": list(result.warnings),
    }
    if as_json:
        typer.echo(json.dumps(summary))
        return
    table = Table(title=f"{file}: valid", show_header=False)
    for key, value in summary.items():
        if key not in ("ok", "file", "warnings"):
            table.add_row(key, str(value))
    console = report_console()
    console.print(table)
    for warning in result.warnings:
        console.print(f"warning: {warning}", markup=False)


@config_app.command("show")
def show(file: FileArg) -> None:
    """Print FILE's effective config as JSON: every default filled in, paths resolved."""
    from defectd.daemon.config import load_station_config

    cfg = load_station_config(file)
    data = cfg.model_dump(mode="json")
    data["state_dir"] = str(cfg.state_dir)
    typer.echo(json.dumps(data, indent=2))
