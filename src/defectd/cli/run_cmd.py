"""``defectd run``: the inspection daemon in the foreground (systemd runs it the same way)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, cast

import typer

from defectd.cli.app import Injected, app
from defectd.log import LEVELS, LogFormat, configure_logging


@app.command("run")
def run(
    ctx: typer.Context,
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help="Station config (TOML); see configs/station.example.toml and docs/daemon.md.",
        ),
    ],
    log_level: Annotated[
        str | None,
        typer.Option(
            "--log-level",
            help=f"One of {', '.join(LEVELS)}; overrides the global option. Passes log at "
            "debug, fails at info, errors at warning.",
        ),
    ] = None,
) -> None:
    r"""Run the inspection daemon for one station until SIGTERM or Ctrl-C.

    Validates the whole config first, as `defectd config check` does (the same checks, the
    same messages): every bad key is named, exit 2.

    Loads and warms up the model, connects to the broker, opens the cameras.

    Sends READY=1 to systemd once frames flow; WATCHDOG=1 only while they do.

    An unreachable broker is not fatal: results wait in the durable outbox.

    SIGTERM/SIGINT: drain frames in flight, publish `offline`, exit 0 (twice: exit now).

    SIGHUP: reload the model file, thresholds, rules and calibration; no frame is dropped.

    /healthz and /metrics are served on the \[health] address (default 127.0.0.1:9464).
    """
    from defectd.daemon.config import load_station_config
    from defectd.daemon.preflight import check_station
    from defectd.daemon.sdnotify import SdNotifier
    from defectd.daemon.service import Service
    from defectd.engines import open_engine

    if log_level is not None:
        fmt = (ctx.parent.params.get("log_format") if ctx.parent else None) or "auto"
        try:
            configure_logging(log_level, cast("LogFormat", fmt))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--log-level") from exc
    station = load_station_config(config)
    injected = ctx.find_object(Injected) or Injected()
    opener = injected.engine_opener or open_engine
    # The same checks as `defectd config check`, same messages; the model it opens (with the
    # service's opener, cache and warm-up) is the service's: a start compiles it once.
    checked = check_station(station, opener=opener)
    try:
        service = Service(
            station,
            config_path=config,
            notifier=SdNotifier(),
            engine_opener=opener,
            model=checked.loaded,
        )
    except BaseException:
        if checked.loaded is not None:
            checked.loaded.engine.close()
        raise
    raise typer.Exit(service.serve())  # the service closes the model's engine
