"""``[cameras.line]``: part identity and gate deadline per camera, validated at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectd.daemon.config import load_station_config
from defectd.errors import ConfigError

STATION = """
station = "line1"
[model]
path = "model.onnx"
[[cameras]]
type = "synthetic"
camera = "cam0"
{trigger}
[cameras.line]
{line}
"""


def load(tmp_path: Path, trigger: str, line: str) -> object:
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    path = tmp_path / "station.toml"
    path.write_text(STATION.format(trigger=trigger, line=line))
    return load_station_config(path, env={})


def test_a_plc_triggered_camera_reads_its_line_section(tmp_path: Path) -> None:
    cfg = load(tmp_path, 'trigger = "request"', 'mode = "plc-trigger"\ngate_ms = 800\n')
    line = cfg.cameras[0].line  # type: ignore[attr-defined]
    assert (line.mode, line.gate_ms, line.frame_timeout_ms) == ("plc-trigger", 800.0, 500.0)


def test_a_camera_without_a_line_section_runs_free_without_a_gate(tmp_path: Path) -> None:
    cfg = load(tmp_path, "", "")
    line = cfg.cameras[0].line  # type: ignore[attr-defined]
    assert (line.mode, line.gate_ms) == ("free-run", None)


def test_plc_trigger_without_a_camera_on_request_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cameras\.0.*plc-trigger.*trigger = 'request'"):
        load(tmp_path, "", 'mode = "plc-trigger"')


def test_a_bad_line_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cameras\.0\.line\.gate_ms"):
        load(tmp_path, "", "gate_ms = -5")
