"""``defectd promote``: a candidate becomes live only through its gates, and every attempt is in
the audit log with the shadow report as evidence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from defectd.cli import main
from defectd.daemon.audit import AuditLog
from defectd.daemon.promote import PromotionConfig, evaluate_gates
from defectd.model.card import card_path, file_sha256, load_card
from station_support import NO_BROKER_NO_HEALTH, copy_model, synthetic_station

LIVE = "a" * 64
CAND = "c" * 64


def _report(parts: int = 2000, agreement: float = 0.995, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema_version": 1,
        "kind": "shadow_report",
        "station": "st",
        "live": {"sha256": LIVE, "name": "live"},
        "candidate": {"sha256": CAND, "name": "cand", "path": "/nowhere/cand.onnx"},
        "parts": parts,
        "skipped": 0,
        "agreement": agreement,
        "confusion": {"pass/pass": parts - 10, "pass/fail": 5, "fail/pass": 5, "fail/fail": 0},
        "disagreements": [],
        "since": None,
        "until": None,
    }
    doc.update(kw)
    return doc


def _escape(seq: int, truth: str | None, archive: str | None = None) -> dict[str, Any]:
    return {
        "seq": seq,
        "part_id": f"P{seq}",
        "camera": "cam0",
        "live": "fail",
        "shadow": "pass",
        "iou": 0.0,
        "truth": truth,
        "archive": archive,
    }


def _gates(doc: dict[str, Any], labels: Path | None = None) -> Any:
    return evaluate_gates(
        doc, PromotionConfig(), candidate_sha256s={CAND}, live_sha256s={LIVE}, labels=labels
    )


def test_a_report_that_meets_every_gate_passes() -> None:
    result = _gates(_report(disagreements=[_escape(1, "pass")]))
    assert result.ok and result.failed == [] and result.labelled == 1


def test_each_failed_gate_is_named_with_its_value() -> None:
    result = _gates(_report(parts=10, agreement=0.9, disagreements=[_escape(7, "fail")]))
    assert result.failed == ["min_parts", "min_agreement", "no_new_escapes"]
    details = {g.name: g.detail for g in result.gates}
    assert details["min_parts"] == "10 parts compared, 1000 needed"
    assert details["min_agreement"] == "agreement 0.9000, at least 0.9900 needed"
    assert details["no_new_escapes"].startswith("1 new escape(s) among 1 labelled disagreements")
    assert result.escapes[0]["seq"] == 7


def test_a_report_about_other_models_fails_the_same_models_gate() -> None:
    doc = _report()
    doc["live"]["sha256"] = "b" * 64
    assert _gates(doc).failed == ["same_models"]


def test_unlabelled_disagreements_are_counted_but_not_escapes() -> None:
    result = _gates(_report(disagreements=[_escape(1, None), _escape(2, None)]))
    assert result.ok and result.unlabelled == 2 and result.labelled == 0


def test_reviewed_masks_and_archived_truth_label_disagreements(tmp_path: Path) -> None:
    folder = tmp_path / "disagreements" / "20261202T100000.000Z-cam0-00000003"
    folder.mkdir(parents=True)
    defect = np.zeros((8, 8), np.uint8)
    defect[2:4, 2:4] = 255
    cv2.imwrite(str(folder / "truth_mask.png"), defect)
    labels = tmp_path / "labels"
    labels.mkdir()
    cv2.imwrite(str(labels / "P4.png"), np.zeros((8, 8), np.uint8))  # reviewed: good
    cv2.imwrite(str(labels / "P5.png"), defect)  # reviewed: defective
    doc = _report(
        disagreements=[_escape(3, None, str(folder)), _escape(4, "fail"), _escape(5, None)]
    )
    result = _gates(doc, labels)
    assert [e["seq"] for e in result.escapes] == [3, 5]
    assert {e["truth_from"] for e in result.escapes} == {"archive", "reviewed:P5.png"}


# --- the command, on a real station config (no daemon running: --no-reload) ----------------


@pytest.fixture(scope="module")
def candidate(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another real model: the tiny model with its output bias moved, exported with a card."""
    from defectd.model.checkpoint import load_checkpoint
    from defectd.model.export import export_onnx

    net, card = load_checkpoint(tiny_model.with_suffix(".pt"))
    with torch.no_grad():
        net.head.bias += 0.5
    out = tmp_path_factory.mktemp("candidate") / "cand.onnx"
    export_onnx(net, card.model_copy(update={"name": "tiny-ft"}), out)
    return out


def _setup(tmp_path: Path, tiny_model: Path, candidate: Path, report: dict[str, Any]) -> Path:
    live = copy_model(tiny_model, tmp_path / "live")
    station = tmp_path / "station.toml"
    station.write_text(
        f"""{synthetic_station("st", live)}
{NO_BROKER_NO_HEALTH}
[daemon]
state_dir = "{tmp_path / "state"}"
[promotion]
min_parts = 100
min_agreement = 0.98
"""
    )
    report["live"]["sha256"] = file_sha256(live)
    report["candidate"].update(sha256=file_sha256(candidate), path=str(candidate))
    (tmp_path / "report.json").write_text(json.dumps(report))
    return station


def test_promote_refused_exits_2_naming_the_gate_and_records_the_attempt(
    tmp_path: Path, tiny_model: Path, candidate: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    station = _setup(tmp_path, tiny_model, candidate, _report(agreement=0.95))
    live_sha = file_sha256(tmp_path / "live" / "model.onnx")
    args = ["promote", "--config", str(station), "--report", str(tmp_path / "report.json")]
    assert main([*args, "--user", "alice", "--reason", "ticket 7"]) == 2
    err = capsys.readouterr().err
    assert "error: promotion refused: min_agreement: agreement 0.9500" in err
    assert file_sha256(tmp_path / "live" / "model.onnx") == live_sha  # nothing installed
    (entry,) = AuditLog(tmp_path / "state" / "audit.jsonl").entries()
    assert entry["action"] == "promote_refused" and entry["user"] == "alice"
    assert entry["reason"] == "ticket 7" and entry["details"]["failed"] == ["min_agreement"]
    assert entry["evidence"]["sha256"] == file_sha256(tmp_path / "report.json")
    assert entry["old"]["sha256"] == live_sha and entry["new"]["sha256"] == file_sha256(candidate)


def test_promote_installs_the_candidate_keeps_the_old_model_and_records_it(
    tmp_path: Path, tiny_model: Path, candidate: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    station = _setup(tmp_path, tiny_model, candidate, _report())
    live = tmp_path / "live" / "model.onnx"
    old_sha = file_sha256(live)
    args = ["promote", "--config", str(station), "--report", str(tmp_path / "report.json")]
    assert main([*args, "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] and file_sha256(live) == old_sha
    assert main([*args, "--no-reload", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["reload"] == "not signalled"
    assert file_sha256(live) == file_sha256(candidate)
    assert load_card(live).name == "tiny-ft"
    retired = Path(summary["retired"])
    assert file_sha256(retired) == old_sha and card_path(retired).is_file()
    (entry,) = AuditLog(tmp_path / "state" / "audit.jsonl").entries()
    assert entry["action"] == "promote" and entry["new"]["sha256"] == file_sha256(candidate)
    assert main(args) == 2  # the same candidate again: it is live already
    assert "is the live model already" in capsys.readouterr().err


def test_install_swaps_the_whole_model_family_and_restore_puts_it_back(tmp_path: Path) -> None:
    from defectd.daemon.promote import install, model_family, restore

    live_dir, cand_dir = tmp_path / "live", tmp_path / "cand"
    live_dir.mkdir()
    cand_dir.mkdir()
    files = {
        live_dir / "model.onnx": b"live",
        live_dir / "model.card.json": b"live card",
        live_dir / "model.int8.onnx": b"live int8",  # must not stay beside the new model
        live_dir / "model.int8.card.json": b"live int8 card",
        live_dir / "model.pt": b"not part of the family",
        cand_dir / "tile-v4.onnx": b"cand",
        cand_dir / "tile-v4.card.json": b"cand card",
        cand_dir / "tile-v4.fp16.onnx": b"cand fp16",
    }
    for path, data in files.items():
        path.write_bytes(data)
    live = live_dir / "model.onnx"
    assert [p.name for p in model_family(live)] == [
        "model.card.json",
        "model.int8.card.json",
        "model.int8.onnx",
        "model.onnx",
    ]
    done = install(cand_dir / "tile-v4.onnx", live, tmp_path / "state")
    now = {p.name: p.read_bytes() for p in live_dir.iterdir()}
    assert now == {
        "model.onnx": b"cand",
        "model.card.json": b"cand card",
        "model.fp16.onnx": b"cand fp16",
        "model.pt": b"not part of the family",
    }
    assert done.retired.read_bytes() == b"live"
    assert (done.retired.parent / "model.int8.onnx").read_bytes() == b"live int8"
    restore(done)
    assert {p.name: p.read_bytes() for p in live_dir.iterdir()} == {
        p.name: d for p, d in files.items() if p.parent == live_dir
    }
