"""The retraining loop closes on small data: a real daemon run archives parts -> the archive
becomes a dataset -> a fine-tune from the live checkpoint -> the candidate runs in shadow beside
the live model -> gated promotion (refused, then passed) swaps it in with a reload -> the audit
log holds every step and verifies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from defectd.cli import main
from defectd.daemon.audit import AuditLog
from defectd.daemon.config import load_station_config
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.data.datasets import open_dataset
from defectd.data.synth import write_dataset
from defectd.model.card import file_sha256, load_card
from station_support import NO_BROKER_NO_HEALTH, synthetic_station

SIZE = 64
# A tiny U-Net, one thread, no bf16: seconds per run, the same weights on every machine.
TINY = ["--size", "64", "--base", "4", "--depth", "2", "--batch-size", "8", "--threads", "1"]
TINY += ["--no-bf16", "--augment", "off", "--seed", "0", "--json"]


def _station(path: Path, live: Path, state: Path, *, line: str, extra: str) -> Path:
    path.write_text(
        f"""{synthetic_station("loop", live)}
height = {SIZE}
width = {SIZE}
seed = 4
{line}
[pipeline]
max_latency_ms = 0
[postprocess]
threshold = 0.5
{NO_BROKER_NO_HEALTH}
[archive]
pass_sample = 1.0
overlays = false
[daemon]
state_dir = "{state}"
drain_timeout_s = 2
{extra}
"""
    )
    return path


def _json_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, Any]:
    """Exit code and the JSON printed (or the error line when the command failed)."""
    code = main(argv)
    out, err = capsys.readouterr()
    if code != 0:
        return code, err.strip().splitlines()[-1:] if err.strip() else out
    return code, json.loads(out) if out.strip() else None


def _wait_for(predicate: Any, timeout: float, proc: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert proc.poll() is None, "the daemon ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def test_the_loop_closes_archive_dataset_finetune_shadow_gated_promotion_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0. The live model: trained on the original (synthetic) set, exported with its card.
    original = tmp_path / "original"
    write_dataset(original, 24, seed=1, height=SIZE, width=SIZE, defect_rate=0.6)
    first = ["train", "--data", str(original), "--out", str(tmp_path / "first"), *TINY]
    first += ["--epochs", "4", "--steps-per-epoch", "20", "--lr", "1e-2", "--loss", "bce_dice_img"]
    assert _json_of(capsys, first)[0] == 0
    live_pt = tmp_path / "first" / "best.pt"
    live = tmp_path / "live" / "model.onnx"
    assert main(["export", "--checkpoint", str(live_pt), "--out", str(live)]) == 0
    capsys.readouterr()
    live_sha = file_sha256(live)
    state = tmp_path / "state"
    station = tmp_path / "station.toml"

    # 1. A short real run of the daemon on the synthetic line archives its parts.
    line = "defect_rate = 0.5\ncount = 40"
    _station(station, live, state, line=line, extra="exit_when_sources_end = true")
    Service(load_station_config(station), notifier=SdNotifier({}), install_signals=False).serve()
    archive = state / "archive"
    assert len((archive / "manifest.csv").read_text().splitlines()) == 41

    # 2. The archive (true masks from the synthetic line) merged with the original set.
    data = tmp_path / "retrain"
    code, made = _json_of(
        capsys,
        [
            "dataset",
            "from-archive",
            str(archive),
            "--out",
            str(data),
            "--merge",
            str(original),
            "--json",
        ],
    )
    assert code == 0 and made["included"] == 40 and made["original"] == 24
    assert made["by_label"] == {"truth": 40}
    assert len(open_dataset(data)) == 64

    # 3. Fine-tune from the live checkpoint for a few steps; export the candidate.
    run = tmp_path / "run"
    train = ["train", "--data", str(data), "--out", str(run), "--init", str(live_pt), *TINY]
    code, _ = _json_of(capsys, [*train, "--epochs", "1", "--steps-per-epoch", "4", "--lr", "1e-4"])
    assert code == 0
    candidate = tmp_path / "candidate" / "model.onnx"
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(candidate)]) == 0
    capsys.readouterr()
    card = load_card(candidate)
    assert card.training.init is not None and card.training.init.sha256 == file_sha256(live_pt)
    cand_sha = file_sha256(candidate)
    assert cand_sha != live_sha

    # 4. The daemon (its own process: promote reloads it with SIGHUP) runs it in shadow.
    gates = "[promotion]\nmin_parts = 100000\nmin_agreement = 0.5\nreload_timeout_s = 60\n"
    shadow = f'[shadow]\npath = "{candidate}"\nbackend = "ort"\n'
    # A line of good parts: a few fine-tuning steps move borderline parts from run to run, and
    # a defective one the live model rejects and the candidate passes would (rightly) stop the
    # promotion; the escape gate itself is tested in test_promote.py.
    line = "defect_rate = 0.0\nrate_hz = 25"
    _station(station, live, state, line=line, extra=f"{shadow}{gates}")
    log = (tmp_path / "daemon.log").open("wb")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "defectd", "run", "--config", str(station)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:

        def shadow_report() -> dict[str, Any] | None:
            code, doc = _json_of(capsys, ["shadow", "report", "--config", str(station), "--json"])
            return doc if code == 0 and doc["parts"] >= 30 else None

        report = _wait_for(shadow_report, 90, proc)
        assert report["candidate"]["sha256"] == cand_sha and report["live"]["sha256"] == live_sha
        evidence = tmp_path / "shadow-report.json"
        evidence.write_text(json.dumps(report))
        _wait_for((state / "defectd.pid").is_file, 30, proc)

        # 5. Gated: too few parts for this station's gate -> refused, nothing installed (the
        # report taken from the station's shadow record now).
        promote = ["promote", "--config", str(station)]
        promote += ["--user", "qa", "--reason", "retrained on archived parts"]
        assert main(promote) == 2
        assert "promotion refused: min_parts" in capsys.readouterr().err
        assert file_sha256(live) == live_sha

        # The gates met -> promoted; the daemon reloads and records it.
        station.write_text(station.read_text().replace("min_parts = 100000", "min_parts = 30"))
        code, summary = _json_of(capsys, [*promote, "--report", str(evidence), "--json"])
        assert code == 0, summary
        assert summary["reload"] == "confirmed" and summary["executed_sha256"] == cand_sha
        assert file_sha256(live) == cand_sha
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]

    # 6. The audit log: every step, with user, shas, config hash and evidence; chain intact.
    code, doc = _json_of(capsys, ["audit", "--config", str(station), "--verify", "--json"])
    assert code == 0 and doc["verify"]["ok"]
    entries = doc["entries"]
    assert [e["action"] for e in entries] == ["start", "promote_refused", "promote", "reload"]
    refused, promoted, reload = entries[1:]
    assert refused["details"]["failed"] == ["min_parts"]
    assert (state / refused["evidence"]["stored"]).is_file()
    assert promoted["user"] == "qa" and promoted["reason"] == "retrained on archived parts"
    assert promoted["old"]["sha256"] == live_sha and promoted["new"]["sha256"] == cand_sha
    assert promoted["evidence"]["sha256"] == file_sha256(evidence)
    assert reload["old"]["sha256"] == live_sha and reload["new"]["sha256"] == cand_sha
    assert reload["new"]["config_hash"] == promoted["old"]["config_hash"]
    assert AuditLog(state / "audit.jsonl").verify().ok
