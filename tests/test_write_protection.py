"""Writers of shipped artefacts refuse to replace them without --force; an INT8 model that
misses its targets is not written and the command exits non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from defectd.cli import main
from defectd.model.card import card_path
from station_support import copy_model
from test_calibration_threshold import threshold_cli, write_blob_set


@pytest.fixture
def model(tiny_model: Path, tmp_path: Path) -> Path:
    return copy_model(tiny_model, tmp_path / "model")


def test_calibrate_int8_keeps_an_existing_model_without_force(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = model.with_name("model.int8.onnx")
    shipped.write_bytes(b"the shipped int8 model")
    code = main(["calibrate", "int8", "-m", str(model), "-d", str(tmp_path / "data")])
    assert code == 2
    assert "model.int8.onnx: exists; pass --force" in capsys.readouterr().err
    assert shipped.read_bytes() == b"the shipped int8 model"


def test_calibrate_int8_that_misses_its_targets_writes_nothing_and_fails(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=4)
    out = tmp_path / "q.int8.onnx"
    args = ["calibrate", "int8", "-m", str(model), "-d", str(data), "--samples", "4"]
    # Agreement above 100 % cannot be met: the best method misses the targets.
    code = main([*args, "-o", str(out), "--min-agreement", "1.0", "--max-iou-delta", "0", "--json"])
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    if payload["meets_targets"]:
        pytest.skip("int8 identical to fp32 on this data: nothing misses")
    assert code == 2 and payload["out"] is None and not out.exists()
    assert "misses its targets" in captured.err and "nothing written" in captured.err
    code = main([*args, "-o", str(out), "--min-agreement", "1.0", "--max-iou-delta", "0",
                 "--keep-failed"])  # fmt: skip
    assert code == 2 and out.is_file() and card_path(out).is_file()


def test_calibrate_threshold_keeps_an_existing_section_without_force(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=4)
    out = tmp_path / "cal.json"
    args = threshold_cli(model, data, out)
    assert main([*args, "--target-escape", "0.5", "--json"]) == 0
    before = out.read_text()
    capsys.readouterr()
    assert main([*args, "--target-escape", "0.4"]) == 2
    assert "already has a threshold section; pass --force" in capsys.readouterr().err
    assert out.read_text() == before
    assert main([*args, "--target-escape", "0.4", "--force", "--json"]) == 0


def test_export_keeps_an_existing_model_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"shipped")
    code = main(["export", "--checkpoint", str(tmp_path / "best.pt"), "--out", str(out)])
    assert code == 2 and "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"shipped"


def test_train_keeps_an_earlier_run_without_resume_or_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"an earlier run")
    code = main(["train", "--data", str(tmp_path / "data"), "--out", str(run)])
    assert code == 2 and "holds an earlier run (best.pt)" in capsys.readouterr().err
    assert (run / "best.pt").read_bytes() == b"an earlier run"
