"""``defectd audit``: print and verify the audit log of model and setting changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from defectd.cli.app import app
from defectd.cli.console import report_console
from defectd.cli.options import JsonTable
from defectd.errors import ConfigError, DataError

EXIT_BROKEN = 1


def audit_log_path(config: Path | None, log_file: Path | None) -> Path:
    """The log named by ``--log``, else the station config's ``[audit] path``."""
    if log_file is not None:
        return log_file
    if config is None:
        raise ConfigError("give --config STATION.toml (its [audit] path) or --log AUDIT.jsonl")
    from defectd.daemon.config import load_station_config

    return load_station_config(config).audit.path


@app.command("audit")
def audit_command(
    *,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Station config: its [audit] path is read."),
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option("--log", help="The audit log file itself (audit.jsonl).")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Check the hash chain and the evidence copies; exit 1 when it is broken.",
        ),
    ] = False,
    last: Annotated[
        int | None, typer.Option("--last", help="Show only the last N entries.")
    ] = None,
    as_json: JsonTable = False,
) -> None:
    """Print the audit log: every model, threshold, rule or calibration change and every
    promotion attempt, with time, user, old/new model sha256 and config hash, reason and
    evidence.

    With --verify the hash chain is checked line by line (an edited, removed or reordered
    entry is named) and the head hash is printed: keep it elsewhere to detect entries cut off
    the end.
    """
    from rich.markup import escape

    from defectd.daemon.audit import AuditLog

    path = audit_log_path(config, log_file)
    audit = AuditLog(path)
    if not path.exists():
        raise DataError(f"{path}: audit log not found (nothing has been recorded yet)")
    entries = audit.entries()
    shown = entries[-last:] if last else entries
    check = audit.verify() if verify else None
    if as_json:
        doc: dict[str, object] = {"log": str(path), "entries": shown}
        if check is not None:
            doc["verify"] = check.as_dict()
        typer.echo(json.dumps(doc))
    else:
        con = report_console()
        table = Table(title=f"{path}: {len(entries)} entries", show_header=True)
        for col in ("#", "time (UTC)", "action", "user", "model sha256 old -> new", "config"):
            table.add_column(col)
        table.add_column("reason / evidence")
        for e in shown:
            old, new = e.get("old") or {}, e.get("new") or {}
            sha = f"{str(old.get('sha256', '-'))[:12]} -> {str(new.get('sha256', '-'))[:12]}"
            cfg = f"{old.get('config_hash', '-')} -> {new.get('config_hash', '-')}"
            note = str(e.get("reason", ""))
            evidence = e.get("evidence")
            if isinstance(evidence, dict):
                note += f" [{evidence.get('path')} sha256 {str(evidence.get('sha256'))[:12]}]"
            failed = (e.get("details") or {}).get("failed")
            if failed:
                note += f" (failed: {', '.join(map(str, failed))})"
            cells = (e.get("seq"), e.get("time"), e.get("action"), e.get("user"), sha, cfg, note)
            table.add_row(*(escape(str(c)) for c in cells))
        con.print(table)
        if check is not None:
            if check.ok:
                con.print(f"chain intact: {check.entries} entries, head {check.head}")
            else:
                con.print(f"[bold red]chain broken[/bold red]: {len(check.problems)} problem(s)")
                for line in check.problems:
                    con.print(f"  {line}", markup=False)
    if check is not None and not check.ok:
        raise typer.Exit(EXIT_BROKEN)
