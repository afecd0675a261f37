"""The audit log: an append-only hash chain that the daemon writes at start and reload and
that ``defectd audit`` prints and verifies."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from defectd.cli import main
from defectd.daemon.audit import GENESIS, AuditLog, ModelState
from defectd.daemon.config import load_station_config
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from station_support import NO_BROKER_NO_HEALTH, copy_model, serving, synthetic_station

A = ModelState("tiny", "a" * 64, "1111111111111111")
B = ModelState("tiny-ft", "b" * 64, "2222222222222222")


def _log_with_three(tmp_path: Path) -> AuditLog:
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.append("start", station="st", reason="first start", new=A)
    evidence = tmp_path / "report.json"
    evidence.write_text('{"agreement": 1.0}')
    audit.append("promote", station="st", reason="better", old=A, new=B, evidence=evidence)
    audit.append("reload", station="st", reason="reload (SIGHUP)", old=A, new=B)
    return audit


def test_entries_chain_each_to_the_one_before(tmp_path: Path) -> None:
    audit = _log_with_three(tmp_path)
    entries = audit.entries()
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    assert entries[1]["prev"] == entries[0]["hash"] and entries[2]["prev"] == entries[1]["hash"]
    evidence = entries[1]["evidence"]
    assert evidence["sha256"] and (tmp_path / evidence["stored"]).is_file()
    check = audit.verify()
    assert check.ok and check.entries == 3 and check.head == entries[2]["hash"]
    assert audit.last_state("st") == B


def test_an_edited_entry_is_named_by_its_line(tmp_path: Path) -> None:
    audit = _log_with_three(tmp_path)
    lines = audit.path.read_text().splitlines()
    lines[1] = lines[1].replace('"better"', '"worse"')
    audit.path.write_text("\n".join(lines) + "\n")
    problems = audit.verify().problems
    assert problems == ["line 2: hash does not match the entry (it was changed)"]


def test_a_removed_entry_breaks_the_chain_after_it(tmp_path: Path) -> None:
    audit = _log_with_three(tmp_path)
    lines = audit.path.read_text().splitlines()
    audit.path.write_text("\n".join([lines[0], lines[2]]) + "\n")
    problems = audit.verify().problems
    assert problems[0].startswith("line 2: prev does not name the entry before it")


def test_a_changed_evidence_copy_is_found(tmp_path: Path) -> None:
    audit = _log_with_three(tmp_path)
    stored = tmp_path / audit.entries()[1]["evidence"]["stored"]
    stored.write_text('{"agreement": 0.5}')
    assert audit.verify().problems == [f"line 2: evidence copy {stored} was changed"]


def test_appends_from_many_threads_keep_one_chain(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")

    def writer(n: int) -> None:
        for i in range(10):
            AuditLog(audit.path).append("reload", station="st", reason=f"{n}-{i}", new=A)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check = audit.verify()
    assert check.ok and check.entries == 40


def test_a_torn_last_line_is_reported_and_later_entries_still_append(tmp_path: Path) -> None:
    audit = _log_with_three(tmp_path)
    with audit.path.open("ab") as fh:
        fh.write(b'{"seq": 4, "act')  # power cut in the middle of a write
    audit.append("reload", station="st", reason="after the cut", old=B, new=A)
    check = audit.verify()
    assert check.problems[0] == "line 4: not valid JSON (a torn or edited line)"
    assert audit.entries()[-1]["reason"] == "after the cut"


def test_audit_command_prints_and_verify_fails_on_a_broken_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = _log_with_three(tmp_path)
    assert main(["audit", "--log", str(audit.path), "--verify", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verify"]["ok"] and [e["action"] for e in doc["entries"]] == [
        "start",
        "promote",
        "reload",
    ]
    text = audit.path.read_text().replace('"first start"', '"second start"')
    audit.path.write_text(text)
    assert main(["audit", "--log", str(audit.path), "--verify"]) == 1
    assert "line 1: hash does not match" in capsys.readouterr().out


def _station(tmp_path: Path, model: Path, rules: str = "") -> Path:
    path = tmp_path / "station.toml"
    path.write_text(
        f"""{synthetic_station("st-audit", model)}
rate_hz = 30
height = 64
width = 64
{NO_BROKER_NO_HEALTH}
[archive]
enabled = false
[daemon]
state_dir = "{tmp_path / "state"}"
drain_timeout_s = 1
{rules}
"""
    )
    return path


def _wait(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_daemon_records_its_first_start_and_each_reload_that_changes_a_rule(
    tmp_path: Path, tiny_model: Path
) -> None:
    model = copy_model(tiny_model, tmp_path / "live")
    path = _station(tmp_path, model)
    service = Service(
        load_station_config(path), config_path=path, notifier=SdNotifier({}), install_signals=False
    )
    audit = AuditLog(tmp_path / "state" / "audit.jsonl")
    with serving(service, lambda: service.ready):
        rules = '[rules]\nrules = [{ kind = "count", max_defects = 2 }]\n'
        path.write_text(path.read_text() + rules)
        service.request_reload()
        _wait(lambda: len(audit.entries()) == 2)
    start, reload = audit.entries()
    assert start["action"] == "start" and start["old"] is None
    assert start["new"]["sha256"] == reload["old"]["sha256"] == reload["new"]["sha256"]
    assert reload["action"] == "reload" and reload["details"]["changed"] == ["rules"]
    assert reload["old"]["config_hash"] != reload["new"]["config_hash"]
    assert reload["user"] and reload["time"].endswith("Z")
    assert audit.verify().ok

    # A second start with the same model and settings adds nothing; changed ones do.
    again = Service(load_station_config(path), notifier=SdNotifier({}), install_signals=False)
    with serving(again, lambda: again.ready):
        pass
    assert len(audit.entries()) == 2
    path.write_text(path.read_text().replace("max_defects = 2", "max_defects = 3"))
    third = Service(load_station_config(path), notifier=SdNotifier({}), install_signals=False)
    with serving(third, lambda: third.ready):
        pass
    last = audit.entries()[-1]
    assert last["action"] == "start" and last["old"] == reload["new"]
    assert last["reason"] == "model or decision settings differ from the last audited state"
