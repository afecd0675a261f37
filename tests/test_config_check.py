"""``defectd config check`` opens what ``defectd run`` opens, and both say the same.

Real components: the tiny ONNX model on ONNX Runtime, viky.cti for GenICam, real files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import defectd.engines
from defectd.cli import main
from defectd.cli.app import Injected
from defectd.daemon.config import load_station_config
from defectd.daemon.preflight import check_station
from defectd.engines.base import Engine
from defectd.errors import ConfigError
from defectd.model.card import card_path
from defectd.pipeline.sources.gentl import bundled_producer
from station_support import model_section

BASE = f"""
station = "chk"
{model_section("model.onnx")}
[[cameras]]
type = "synthetic"
camera = "cam0"
rate_hz = 20
height = 64
width = 64
[health]
address = "127.0.0.1:0"
[daemon]
state_dir = "state"
"""


@pytest.fixture
def station(tmp_path: Path, tiny_model: Path) -> Path:
    """A folder with the tiny model (+ card) and a valid ``station.toml`` using it."""
    shutil.copy(tiny_model, tmp_path / "model.onnx")
    shutil.copy(card_path(tiny_model), tmp_path / "model.card.json")
    path = tmp_path / "station.toml"
    path.write_text(BASE)
    return path


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def _check_and_run(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """The ``error:`` lines of ``config check`` and ``run`` (both must exit 2)."""
    assert main(["config", "check", str(path)]) == 2
    check_err = capsys.readouterr().err.strip().splitlines()[-1]
    assert main(["run", "--config", str(path)]) == 2
    run_err = capsys.readouterr().err.strip().splitlines()[-1]
    return check_err, run_err


def _refused_alike(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The ``error:`` line that ``config check`` and ``run`` both print for ``path``."""
    check_err, run_err = _check_and_run(path, capsys)
    assert check_err == run_err
    return check_err


def test_valid_config_passes_and_writes_nothing(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", "--json", str(station)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] is True
    assert summary["engine"] == "ort-fp32"
    assert summary["model_name"] == "tiny"
    assert not (station.parent / "state").exists()


def test_text_file_named_model_onnx_is_refused_by_check_and_run(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (station.parent / "model.onnx").write_text("this is not a model\n")
    check_err = _refused_alike(station, capsys)
    assert check_err.startswith(f"error: {station}: model.path: ")
    assert "not a readable ONNX model" in check_err


def test_model_without_card_is_refused_by_check(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (station.parent / "model.card.json").unlink()
    check_err = _refused_alike(station, capsys)
    assert "model.path: " in check_err and "model card not found" in check_err


def test_invalid_card_is_refused_by_check(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (station.parent / "model.card.json").write_text('{"name": 3}')
    check_err, _ = _check_and_run(station, capsys)
    assert "model.path: " in check_err and "invalid model card" in check_err


def test_missing_producer_is_refused(station: Path, capsys: pytest.CaptureFixture[str]) -> None:
    station.write_text(
        BASE.replace('type = "synthetic"', 'type = "genicam"\nproducers = ["gone.cti"]').replace(
            "rate_hz = 20\nheight = 64\nwidth = 64", "device = { serial = '0' }"
        )
    )
    check_err = _refused_alike(station, capsys)
    assert "cameras.0.producers: " in check_err and "gone.cti does not exist" in check_err


def test_missing_referenced_files_are_each_named(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE.replace('camera = "cam0"', 'camera = "cam0"\nignore_zones = ["zone.png"]') + (
        '[[cameras]]\ntype = "replay"\ncamera = "cam1"\npath = "old_frames"\n'
        '[mqtt]\nusername = "u"\npassword_file = "mqtt.password"\n'
    )
    station.write_text(text)
    check_err = _refused_alike(station, capsys)
    assert "mqtt.password_file: cannot read" in check_err
    assert "cameras.0.ignore_zones.0: " in check_err and "zone.png" in check_err
    assert "cameras.1.path: " in check_err and "old_frames does not exist" in check_err


def test_ignore_zone_and_password_files_that_exist_pass(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cv2.imwrite(str(station.parent / "zone.png"), np.zeros((64, 64), np.uint8))
    (station.parent / "mqtt.password").write_text("secret\n")
    station.write_text(
        BASE.replace('camera = "cam0"', 'camera = "cam0"\nignore_zones = ["zone.png"]')
        + '[mqtt]\nusername = "u"\npassword_file = "mqtt.password"\n'
    )
    assert main(["config", "check", str(station)]) == 0


def test_tls_file_that_is_not_a_certificate_is_refused(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (station.parent / "ca.pem").write_text("not a certificate\n")
    station.write_text(BASE + '[mqtt.tls]\nca_file = "ca.pem"\n')
    check_err = _refused_alike(station, capsys)
    assert "mqtt.tls.ca_file: " in check_err


@pytest.mark.parametrize(
    ("key", "line"),
    [
        ("model.path", 'path = "model.onnx"'),
        ("cameras.0.calibration", 'camera = "cam0"'),
        ("mqtt.tls.ca_file", None),
        ("daemon.state_dir", 'state_dir = "state"'),
    ],
)
def test_over_long_path_is_a_config_error_naming_the_key(
    station: Path, capsys: pytest.CaptureFixture[str], key: str, line: str | None
) -> None:
    long = "x" * 5000
    if key == "model.path":
        _edit(station, line or "", f'path = "{long}"')
    elif key == "cameras.0.calibration":
        _edit(station, line or "", f'camera = "cam0"\ncalibration = "{long}"')
    elif key == "mqtt.tls.ca_file":
        station.write_text(BASE + f'[mqtt.tls]\nca_file = "{long}"\n')
    else:
        _edit(station, line or "", f'state_dir = "/tmp/{long}"')
    check_err = _refused_alike(station, capsys)
    assert check_err.startswith(f"error: {station}: {key}: the path is too long")
    assert "Traceback" not in check_err


@pytest.mark.parametrize(
    ("key", "toml"),
    [
        ("daemon.state_dir", '[daemon]\nstate_dir = "st\\u0000ate"'),
        ("outbox.path", '[outbox]\npath = "out\\u0000box.sqlite"'),
        ("daemon.result_ledger", '[daemon]\nresult_ledger = "ids\\u0000.txt"'),
        ("model.cache_dir", '[model]\ncache_dir = "ca\\u0000che"'),
        ("archive.dir", '[archive]\ndir = "arch\\u0000ive"'),
        ("cameras.0.calibration", 'calibration = "cal\\u0000.json"'),
    ],
)
def test_nul_byte_in_a_path_is_a_config_error_naming_the_key(
    station: Path, capsys: pytest.CaptureFixture[str], key: str, toml: str
) -> None:
    _section, _, line = toml.partition("\n")
    if key.startswith("cameras."):
        _edit(station, 'camera = "cam0"', f'camera = "cam0"\n{toml}')
    elif key == "daemon.state_dir":
        _edit(station, 'state_dir = "state"', line)
    elif key == "daemon.result_ledger":
        _edit(station, 'state_dir = "state"', f'state_dir = "state"\n{line}')
    elif key == "model.cache_dir":
        _edit(station, 'path = "model.onnx"', f'path = "model.onnx"\n{line}')
    else:
        station.write_text(BASE + toml + "\n")
    check_err = _refused_alike(station, capsys)
    assert check_err == f"error: {station}: {key}: the path contains a NUL byte"


def test_state_dir_under_a_file_is_refused_without_creating_anything(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (station.parent / "blocker").write_text("a file, not a folder")
    _edit(station, 'state_dir = "state"', 'state_dir = "blocker/state"')
    check_err = _refused_alike(station, capsys)
    assert "daemon.state_dir: cannot create " in check_err and "is not a folder" in check_err


def test_tile_overlap_that_does_not_fit_the_model_is_refused_by_check(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    station.write_text(BASE + "[pipeline]\ntile_overlap_px = 64\n")
    check_err = _refused_alike(station, capsys)
    assert "pipeline.tile_overlap_px=64 must be smaller than the model input" in check_err


def test_unknown_synthetic_surface_is_refused_by_check(
    station: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit(station, "width = 64", 'width = 64\nsurfaces = ["velvet"]')
    check_err = _refused_alike(station, capsys)
    assert "cameras.0.surfaces: " in check_err and "unknown 'velvet'" in check_err


def test_cameras_are_opened_only_with_the_cameras_option(station: Path) -> None:
    genicam = BASE.replace('type = "synthetic"', 'type = "genicam"').replace(
        "rate_hz = 20\nheight = 64\nwidth = 64",
        f'producers = ["{bundled_producer()}"]\ndevice = {{ serial = "7" }}\n'
        "nodes = { Width = 128, Height = 128 }",
    )
    station.write_text(genicam)
    cfg = load_station_config(station, env={})
    assert check_station(cfg).cameras_opened == ()  # serial 7 does not exist; not opened
    with pytest.raises(ConfigError, match=r"cameras\.0: .*serial '7'"):
        check_station(cfg, open_cameras=True)
    station.write_text(genicam.replace('serial = "7"', 'serial = "0"'))
    result = check_station(load_station_config(station, env={}), open_cameras=True)
    assert result.cameras_opened == ("cam0",)


class CountingOpener:
    """An engine opener (``defectd.daemon.station.EngineOpener``) that opens the real engine and
    counts the engines it opened and how many of them were closed. Installed in place of
    ``defectd.engines.open_engine`` too, so an open that bypasses the injected one counts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = 0
        self.closed = 0
        self._open = defectd.engines.open_engine
        monkeypatch.setattr(defectd.engines, "open_engine", self)

    def __call__(self, model_path: Path, **options: Any) -> Engine:
        engine = self._open(model_path, **options)
        self.opened += 1
        close = engine.close

        def counted_close() -> None:
            self.closed += 1
            close()

        engine.close = counted_close  # type: ignore[method-assign]
        return engine


def _stop_when_ready(sock: socket.socket) -> None:
    """Send this process SIGTERM once ``READY=1`` arrives on the notify socket (or after 60 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if "READY=1" in sock.recv(4096).decode().splitlines():
                break
        except TimeoutError:
            continue
    os.kill(os.getpid(), signal.SIGTERM)


def test_run_opens_the_model_once_and_closes_it(
    station: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quiet = "[mqtt]\nport = 1\n[health]\nenabled = false"  # no broker, no port to pick
    _edit(station, '[health]\naddress = "127.0.0.1:0"', quiet)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    opener = CountingOpener(monkeypatch)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(0.2)
        stopper = threading.Thread(target=_stop_when_ready, args=(sock,), name="stop-when-ready")
        stopper.start()
        code = main(["run", "--config", str(station)], injected=Injected(engine_opener=opener))
        stopper.join()
    assert code == 0
    assert (opener.opened, opener.closed) == (1, 1)


def test_run_refused_after_the_model_opened_closes_it(
    station: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    station.write_text(BASE + "[pipeline]\ntile_overlap_px = 64\n")
    opener = CountingOpener(monkeypatch)
    assert main(["run", "--config", str(station)], injected=Injected(engine_opener=opener)) == 2
    assert "pipeline.tile_overlap_px=64" in capsys.readouterr().err
    assert (opener.opened, opener.closed) == (1, 1)
