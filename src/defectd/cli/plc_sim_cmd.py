"""``defectd plc-sim``: a simulated PLC and conveyor that holds a station to the line contract."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from defectd.cli.app import app


@app.command("plc-sim")
def plc_sim(
    *,
    host: Annotated[str, typer.Option("--host", help="Broker host name or address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Broker port.")] = 1883,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Topic prefix (mqtt.topic_prefix of the station).")
    ] = "defectd",
    station: Annotated[str, typer.Option("--station", help="Station id.")] = "demo",
    camera: Annotated[
        str, typer.Option("--camera", help="Camera in line mode plc-trigger.")
    ] = "line1",
    rate: Annotated[float, typer.Option("--rate", min=0.1, help="Parts per second.")] = 20.0,
    parts: Annotated[
        int, typer.Option("--parts", min=1, help="Parts to send down the line.")
    ] = 1000,
    gate_ms: Annotated[
        float,
        typer.Option("--gate-ms", min=1.0, help="Trigger -> reject gate, milliseconds."),
    ] = 1000.0,
    seed: Annotated[
        int, typer.Option("--seed", help="The synthetic camera's seed (its truth per part).")
    ] = 0,
    defect_rate: Annotated[
        float,
        typer.Option("--defect-rate", min=0.0, max=1.0, help="The synthetic camera's defect_rate."),
    ] = 0.3,
    no_truth: Annotated[
        bool,
        typer.Option(
            "--no-truth",
            help="The camera is real (no simulated truth): every pass counts as correct.",
        ),
    ] = False,
    run_id: Annotated[
        str, typer.Option("--run-id", help="Part id prefix (default: the start time, hex).")
    ] = "",
    client_id: Annotated[
        str, typer.Option("--client-id", help="MQTT client id (a persistent session).")
    ] = "defectd-plc-sim",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON line before the table.")
    ] = False,
) -> None:
    """Run a simulated conveyor and reject gate against a station.

    Publishes one trigger per part on <prefix>/<station>/<camera>/trigger
    (part_id, gate_deadline = now + --gate-ms, MQTT 5 correlation data) and
    passes a part at the gate only on a pass verdict for that part received
    before its deadline; everything else is rejected. Prints the six outcomes
    (correct pass/reject, model escape/false reject, system reject/escape),
    the trigger -> verdict latency against the gate, and last the line
    `system_escapes=N unpaired=M parts=K`. Exits 1 when a system escape or an
    unpaired frame or verdict was seen.
    """
    from defectd.publish.plcsim import PlcSim, PlcSimConfig

    config = PlcSimConfig(
        host=host,
        port=port,
        prefix=prefix,
        station=station,
        camera=camera,
        rate_hz=rate,
        parts=parts,
        gate_ms=gate_ms,
        seed=seed,
        defect_rate=defect_rate,
        truth=not no_truth,
        run_id=run_id,
        client_id=client_id,
    )
    sim = PlcSim(config)
    try:
        report = sim.run()
    except KeyboardInterrupt:
        sim.stop()
        raise
    if as_json:
        typer.echo(json.dumps(report.as_dict(), separators=(",", ":")))
    typer.echo(report.table())
    typer.echo(report.last_line())
    if report.system_escapes or report.unpaired:
        raise typer.Exit(1)
