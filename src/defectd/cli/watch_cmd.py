"""``defectd watch``: print results and rejects as they arrive, de-duplicated by result_id."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from defectd.cli.app import app

_OPTION_OF_KEY = {
    "host": "--host",
    "port": "--port",
    "protocol": "--protocol",
    "topic_prefix": "--prefix",
    "tls": "--ca-file/--cert-file/--key-file",
    "username": "--username",
    "password_file": "--password-file",
    "password_env": "--password-env",
}


def _line(kind: str, p: dict[str, Any], color: bool) -> str:
    verdict = str(p.get("verdict", "?"))
    label = "REJECT" if kind == "reject" else verdict.upper()
    if color:
        fg = typer.colors.GREEN if verdict == "pass" else typer.colors.RED
        label = typer.style(f"{label:<6}", fg=fg, bold=kind == "reject")
    else:
        label = f"{label:<6}"
    t = (p.get("t_grab") or {}).get("iso", "?")
    parts = [t, label, f"{p.get('station')}/{p.get('camera')}", f"seq={p.get('seq')}"]
    if p.get("part_id"):
        parts.append(f"part={p['part_id']}")
    if kind == "result":
        defects = p.get("defects") or []
        parts.append(f"defects={len(defects)}")
        classes = Counter(str(d.get("class", "defect")) for d in defects)
        if set(classes) - {"defect"}:  # a multi-class model: how many of each class
            parts.append(",".join(f"{c}:{n}" for c, n in sorted(classes.items())))
    if p.get("rule"):
        parts.append(f"rule={p['rule']}")
    if p.get("reason"):
        parts.append(f"reason={p['reason']!r}")
    parts.append(f"id={p.get('result_id')}")
    return "  ".join(parts)


@app.command("watch")
def watch(
    *,
    host: Annotated[str, typer.Option("--host", help="Broker host name or address.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Broker port (8883 is usual with TLS).")
    ] = 1883,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Topic prefix (mqtt.topic_prefix of the station).")
    ] = "defectd",
    station: Annotated[
        str | None, typer.Option("--station", help="Only this station (default: all).")
    ] = None,
    camera: Annotated[
        str | None, typer.Option("--camera", help="Only this camera (default: all).")
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print each message as one JSON line (the payload as published) on stdout.",
        ),
    ] = False,
    rejects_only: Annotated[
        bool,
        typer.Option("--rejects-only", help="Only the compact reject messages (fail and error)."),
    ] = False,
    count: Annotated[
        int | None,
        typer.Option("--count", "-n", min=1, help="Exit after this many unique messages."),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0.0,
            help="Exit after this many seconds; with --count, exit 1 if fewer arrived.",
        ),
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option("--client-id", help="MQTT client id (needed with --persistent)."),
    ] = None,
    persistent: Annotated[
        bool,
        typer.Option(
            "--persistent",
            help="Keep a session on the broker (clean start off): messages published while "
            "this watcher is away are delivered on its next run with the same --client-id.",
        ),
    ] = False,
    protocol: Annotated[str, typer.Option("--protocol", help="MQTT version: 5 or 3.1.1.")] = "5",
    ca_file: Annotated[
        Path | None, typer.Option("--ca-file", help="Use TLS; CA certificate of the broker.")
    ] = None,
    cert_file: Annotated[
        Path | None, typer.Option("--cert-file", help="TLS client certificate (with --key-file).")
    ] = None,
    key_file: Annotated[Path | None, typer.Option("--key-file", help="TLS client key.")] = None,
    username: Annotated[str | None, typer.Option("--username", help="Broker user name.")] = None,
    password_file: Annotated[
        Path | None, typer.Option("--password-file", help="File holding the broker password.")
    ] = None,
    password_env: Annotated[
        str | None,
        typer.Option("--password-env", help="Environment variable holding the broker password."),
    ] = None,
) -> None:
    """Print results and rejects as they arrive: the reference consumer for PLC integrators.

    Subscribes with QoS 1 to <prefix>/<station>/<camera>/result and
    <prefix>/<station>/reject. Delivery is at least once, so every message is
    shown once per result_id (a result and its reject share one id) and
    duplicates are counted. The summary goes to stderr at the end (Ctrl-C,
    --count or --timeout). Payloads follow the JSON Schemas shipped in
    defectd/publish/schemas/.
    """
    from pydantic import ValidationError

    from defectd.errors import ConfigError
    from defectd.publish.config import MqttConfig
    from defectd.publish.watch import Received, Watcher

    settings: dict[str, Any] = {
        "host": host,
        "port": port,
        "protocol": protocol,
        "topic_prefix": prefix,
        "username": username,
        "password_file": password_file,
        "password_env": password_env,
    }
    if ca_file is not None:
        settings["tls"] = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    try:
        config = MqttConfig.model_validate(settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        raise ConfigError(f"{_OPTION_OF_KEY.get(key, key or 'options')}: {err['msg']}") from None

    color = not as_json and sys.stdout.isatty()

    def show(msg: Received) -> None:
        if as_json:
            typer.echo(json.dumps(msg.payload, separators=(",", ":")))
        else:
            typer.echo(_line(msg.kind, msg.payload, color))

    watcher = Watcher(
        config,
        show,
        station=station,
        camera=camera,
        rejects_only=rejects_only,
        persistent=persistent,
        client_id=client_id,
    )
    try:
        summary = watcher.run(count=count, timeout_s=timeout)
    except KeyboardInterrupt:
        summary = watcher.summary
    typer.echo(
        f"watch: {summary.unique} unique ({summary.by_kind.get('result', 0)} results, "
        f"{summary.by_kind.get('reject', 0)} rejects), {summary.duplicates} duplicates dropped",
        err=True,
    )
    if count is not None and summary.unique < count:
        typer.echo(f"watch: only {summary.unique} of {count} messages arrived", err=True)
        raise typer.Exit(1)
