"""``defectd promote``: make a shadow-tested candidate the live model, only through its gates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from defectd.cli.app import app
from defectd.cli.console import report_console
from defectd.cli.options import JsonSummary


@app.command("promote")
def promote_command(
    *,
    config: Annotated[
        Path,
        typer.Option(
            "--config", "-c", help="Station config: [model] path, [promotion] gates, state dir."
        ),
    ],
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="The candidate's shadow report (defectd shadow report --json > FILE): the "
            "evidence, kept with the audit log. Default: the station's shadow record now, "
            "written to STATE/promotions/.",
        ),
    ] = None,
    candidate: Annotated[
        Path | None,
        typer.Option(
            "--candidate", help="The candidate model file (default: the report's candidate.path)."
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Reviewed truth masks of disagreement parts, named <archive folder>.png or "
            "<part_id>.png (defect pixels: the part is defective).",
        ),
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="Who promotes (default: the OS user).")
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why, for the audit log (a ticket, a change).")
    ] = "",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check the gates only: install and record nothing."),
    ] = False,
    no_reload: Annotated[
        bool,
        typer.Option(
            "--no-reload",
            help="Install without signalling the daemon (reload it yourself: systemctl reload "
            "defectd); the daemon's audit entry then follows at its reload.",
        ),
    ] = False,
    as_json: JsonSummary = False,
) -> None:
    """Promote the candidate of a shadow report to the live model when every gate holds.

    Gates ([promotion] in the station config): the report compares this candidate with the
    live model; at least min_parts parts compared; agreement >= min_agreement; no new escapes
    (a part the truth calls defective that the live model rejected and the candidate passed)
    among the labelled disagreements. A failed gate exits 2 naming it, and the refused attempt
    is recorded in the audit log. On success the candidate replaces the live model file (the
    old one is kept under STATE/models/), the daemon reloads, and both the promotion and the
    daemon's reload are in the audit log (defectd audit).
    """
    from defectd.daemon.audit import AuditLog, ModelState, current_user
    from defectd.daemon.config import load_station_config
    from defectd.daemon.promote import (
        PromotionRefusedError,
        evaluate_gates,
        family_sha256s,
        install,
        live_state,
        read_report,
        restore,
        signal_daemon,
        wait_for_reload,
    )
    from defectd.errors import ConfigError, DataError
    from defectd.model.card import file_sha256, load_card

    cfg = load_station_config(config)
    if report is None:
        report = _current_report(cfg.state_dir)
    doc = read_report(report)
    cand_info = doc.get("candidate") or {}
    cand_path = candidate or (Path(cand_info["path"]) if cand_info.get("path") else None)
    if cand_path is None:
        raise ConfigError("--candidate: the report names no candidate path; give the file")
    if not cand_path.is_file():
        raise DataError(f"{cand_path}: candidate model file not found")
    cand_card = load_card(cand_path)
    cand_sha = file_sha256(cand_path)
    cand_shas = family_sha256s(cand_path)
    audit = AuditLog(cfg.audit.path)
    live, live_shas = live_state(cfg.model.path, audit, cfg.station)
    result = evaluate_gates(
        doc, cfg.promotion, candidate_sha256s=cand_shas, live_sha256s=live_shas, labels=labels
    )
    new = ModelState(cand_card.name, cand_sha, live.config_hash)
    who = user or current_user()
    if cand_sha == live.sha256:
        raise ConfigError(f"--candidate {cand_path}: is the live model already")
    summary: dict[str, Any] = {
        "station": cfg.station,
        "candidate": {"path": str(cand_path), "sha256": cand_sha, "name": cand_card.name},
        "live": live.as_dict(),
        **result.as_dict(),
        "dry_run": dry_run,
    }
    why = reason or (
        f"shadow report: agreement {doc.get('agreement')} over {doc.get('parts')} parts"
    )
    details = {**result.as_dict(), "candidate_path": str(cand_path), "report": str(report)}

    def record(event: str) -> dict[str, Any]:
        """Append this decision (``promote`` or ``promote_refused``) to the audit log."""
        entry = audit.append(
            event,
            station=cfg.station,
            user=who,
            reason=why,
            old=live,
            new=new,
            evidence=report,
            details=details,
        )
        summary["audit_seq"] = entry["seq"]
        return entry

    if not result.ok:
        if not dry_run:
            record("promote_refused")
        _print(summary, as_json)
        failed = "; ".join(g.line() for g in result.gates if not g.ok)
        raise PromotionRefusedError(f"promotion refused: {failed}")
    if dry_run:
        _print(summary, as_json)
        return
    entry = record("promote")
    installed = install(cand_path, cfg.model.path, cfg.state_dir)
    summary["retired"] = str(installed.retired)
    pid = None if no_reload else signal_daemon(cfg.state_dir)
    summary["daemon_pid"] = pid
    if pid is None:
        summary["reload"] = "not signalled" if no_reload else "no daemon running"
        _print(summary, as_json)
        return
    confirmed = wait_for_reload(audit, cfg.station, entry["seq"], cfg.promotion.reload_timeout_s)
    if confirmed is None or (confirmed.get("new") or {}).get("sha256") not in cand_shas:
        restore(installed)
        audit.append(
            "promote_reverted",
            station=cfg.station,
            user=who,
            reason=f"daemon {pid} did not reload the candidate within "
            f"{cfg.promotion.reload_timeout_s:g} s; the replaced model was put back",
            old=new,
            new=live,
            details={"promote_seq": entry["seq"]},
        )
        summary["reload"] = "not confirmed: reverted"
        _print(summary, as_json)
        raise ConfigError(
            f"daemon {pid} did not confirm the reload within {cfg.promotion.reload_timeout_s:g} s "
            "(see its log: reload_failed); the replaced model was put back"
        )
    summary["reload"] = "confirmed"
    summary["reload_audit_seq"] = confirmed["seq"]
    summary["executed_sha256"] = (confirmed.get("new") or {}).get("sha256")
    _print(summary, as_json)


def _current_report(state_dir: Path) -> Path:
    """The station's shadow report now, written to ``STATE/promotions/<time>-shadow-report.json``
    (the evidence the audit entry names)."""
    from datetime import UTC, datetime

    from defectd.daemon.shadow.store import shadow_report

    doc = shadow_report(state_dir)
    folder = state_dir / "promotions"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-shadow-report.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def _print(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(summary))
        return
    con = report_console()
    for gate in summary["gates"]:
        mark = "ok  " if gate["ok"] else "FAIL"
        con.print(f"{mark} {gate['gate']}: {gate['detail']}", markup=False, highlight=False)
    cand = summary["candidate"]
    if summary["ok"] and not summary["dry_run"]:
        con.print(
            f"promoted {cand['name']} ({cand['sha256'][:12]}) on {summary['station']}: "
            f"reload {summary.get('reload')}; previous model kept at {summary.get('retired')}",
            markup=False,
        )
