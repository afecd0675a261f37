"""A threshold is used at the precision it was calibrated at: ``calibrate threshold`` records
the precision its engine ran, and the station runs the model at it (``config check``, ``run``
and reload through the same choice). Real ONNX Runtime sessions, real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from defectd.calibration.file import (
    ThresholdSection,
    ThresholdTarget,
    load_calibration,
    update_calibration,
)
from defectd.cli import main
from defectd.daemon.config import load_station_config
from defectd.daemon.preflight import check_station
from defectd.daemon.shadow.runner import candidate_calibrations, candidate_config
from defectd.daemon.station import load_model
from defectd.errors import ConfigError
from defectd.model.card import card_path, load_card
from station_support import model_section
from test_calibration_threshold import threshold_cli, write_blob_set


@pytest.fixture
def fast_model(tiny_model: Path, tiny_int8_model: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model whose card records val Dice at int8 within 0.01 of fp32, so
    the engines' default runs it as int8 (its QDQ sibling beside it)."""
    where = tmp_path / "model"
    where.mkdir()
    for src in (tiny_model, tiny_int8_model):
        shutil.copy(src, where / src.name)
        shutil.copy(card_path(src), card_path(where / src.name))
    card = load_card(tiny_model)
    metrics = {**card.metrics, "val_dice": 0.80, "val_dice_int8": 0.797}
    card.model_copy(update={"metrics": metrics}).save(card_path(where / "model.onnx"))
    return where / "model.onnx"


def write_threshold(path: Path, model: Path, precision: str | None) -> Path:
    """A calibration file with a threshold for ``model`` calibrated at ``precision`` (None: a
    file written before the key existed)."""
    section = ThresholdSection(
        pixel_threshold=0.5,
        target=ThresholdTarget(escape_rate=0.01),
        model_sha256=load_card(model).sha256,
        precision=precision or "",
    )
    update_calibration(path, threshold=section)
    if precision is None:
        data = json.loads(path.read_text())
        del data["threshold"]["precision"]
        path.write_text(json.dumps(data))
    return path


def station(tmp_path: Path, model: Path, calibrations: dict[str, Path | None]) -> Path:
    """``station.toml`` with one synthetic camera per entry of ``calibrations``."""
    cameras = "".join(
        f'[[cameras]]\ntype = "synthetic"\ncamera = "{cam}"\nheight = 64\nwidth = 64\n'
        + (f'calibration = "{cal}"\n' if cal is not None else "")
        for cam, cal in calibrations.items()
    )
    path = tmp_path / "station.toml"
    path.write_text(
        f'station = "prec"\n{model_section(model)}\n{cameras}'
        f'[health]\nenabled = false\n[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
    )
    return path


def test_calibrate_threshold_records_the_precision_it_ran_at(
    fast_model: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_blob_set(tmp_path / "data", per_split=6)
    for model, want in ((fast_model, "int8"), (tiny_model, "fp32")):
        out = tmp_path / f"{want}.json"
        args = [*threshold_cli(model, data, out), "--backend", "ort"]
        assert main([*args, "--target-escape", "0.34", "--json"]) == 0
        payload = json.loads(capsys.readouterr().out)
        section = load_calibration(out).threshold
        assert section is not None
        assert section.precision == want and section.backend == "ort"
        assert payload["precision"] == want and payload["engine"] == f"ort-{want}"
    assert main([*threshold_cli(fast_model, data, tmp_path / "t.json"), "--backend", "ort"]) == 0
    assert "calibrated at int8 (ort-int8)" in capsys.readouterr().out


def test_the_station_runs_the_precision_its_calibration_names(
    fast_model: Path, tmp_path: Path
) -> None:
    no_file = load_station_config(station(tmp_path, fast_model, {"cam0": None}))
    assert check_station(no_file).engine == "ort-int8"  # no calibration: the fast default

    cal = write_threshold(tmp_path / "a.json", fast_model, "fp32")
    config = load_station_config(station(tmp_path, fast_model, {"cam0": cal}))
    result = check_station(config)
    assert result.engine == "ort-fp32" and result.warnings == ()
    with capture_logs() as logs:
        model = load_model(config)
    model.engine.close()
    assert model.engine.precision == "fp32"
    (event,) = [e for e in logs if e["event"] == "model_precision"]
    assert event["precision"] == "fp32"
    assert event["reason"] == f"calibrated at fp32: camera cam0 ({cal})"

    # A file calibrated for another model does not apply: the fast default again.
    other = tmp_path / "other.json"
    update_calibration(
        other,
        threshold=ThresholdSection(
            pixel_threshold=0.5, target=ThresholdTarget(escape_rate=0.01), model_sha256="ab" * 32,
            precision="fp32",
        ),
    )  # fmt: skip
    config = load_station_config(station(tmp_path, fast_model, {"cam0": other}))
    assert check_station(config).engine == "ort-int8"


def test_a_file_without_precision_keeps_loading_and_means_the_cards(
    fast_model: Path, tmp_path: Path
) -> None:
    cal = write_threshold(tmp_path / "old.json", fast_model, None)
    assert "precision" not in json.loads(cal.read_text())["threshold"]
    section = load_calibration(cal).threshold
    assert section is not None and section.precision == "" and section.pixel_threshold == 0.5
    config = load_station_config(station(tmp_path, fast_model, {"cam0": cal}))
    assert check_station(config).engine == "ort-fp32"  # what the old calibration ran at


def test_an_asked_for_precision_wins_with_a_warning(
    fast_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cal = write_threshold(tmp_path / "a.json", fast_model, "fp32")
    path = station(tmp_path, fast_model, {"cam0": cal})
    asked = path.read_text().replace('backend = "ort"', 'backend = "ort"\nprecision = "int8"')
    path.write_text(asked)
    config = load_station_config(path)
    result = check_station(config)
    assert result.engine == "ort-int8"
    (warning,) = result.warnings
    assert warning.startswith("model.precision: camera cam0: ")
    assert str(cal) in warning and "calibrated at fp32" in warning and "asks for int8" in warning
    assert main(["config", "check", str(path)]) == 0
    assert f"warning: {warning}" in " ".join(capsys.readouterr().out.split())
    with capture_logs() as logs:
        load_model(config).engine.close()
    (event,) = [e for e in logs if e["event"] == "calibration_precision_differs"]
    assert event["log_level"] == "warning"
    assert (event["camera"], event["file"]) == ("cam0", str(cal))
    assert (event["calibrated"], event["configured"]) == ("fp32", "int8")


def test_cameras_calibrated_at_different_precisions_are_refused(
    fast_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write_threshold(tmp_path / "a.json", fast_model, "fp32")
    b = write_threshold(tmp_path / "b.json", fast_model, "int8")
    path = station(tmp_path, fast_model, {"cam0": a, "cam1": b})
    config = load_station_config(path)
    with pytest.raises(ConfigError) as refused:
        check_station(config)
    message = str(refused.value)
    assert "model.precision: " in message
    assert f"fp32: camera cam0 ({a})" in message and f"int8: camera cam1 ({b})" in message
    with pytest.raises(ConfigError, match="different precisions"):
        load_model(config)  # what start and reload open
    assert main(["run", "--config", str(path)]) == 2
    assert "different precisions" in capsys.readouterr().err


def test_the_shadow_candidate_runs_the_precision_of_its_calibration(
    fast_model: Path, tiny_model: Path, tmp_path: Path
) -> None:
    cal = write_threshold(tmp_path / "cand.json", fast_model, "fp32")
    path = station(tmp_path, tiny_model, {"cam0": None})
    shadow = f'[shadow]\npath = "{fast_model}"\nbackend = "ort"\ncalibration = "{cal}"\n'
    path.write_text(path.read_text() + shadow)
    config = load_station_config(path)
    assert config.shadow is not None
    assert check_station(config).warnings == ()
    candidate = candidate_config(config, config.shadow)
    files = candidate_calibrations(config, config.shadow)
    model = load_model(candidate, calibrations=files)  # what the shadow runner opens
    model.engine.close()
    assert model.engine.precision == "fp32"

    path.write_text(
        path.read_text().replace('calibration = "', 'precision = "int8"\ncalibration = "')
    )
    (warning,) = check_station(load_station_config(path)).warnings
    assert warning.startswith(f"shadow.precision: [shadow] candidate: {cal} was calibrated at fp32")
