"""The systemd unit and the GPU drop-in pass ``systemd-analyze verify``.

verify insists that ExecStart names an existing executable, so the test checks a copy whose
ExecStart points at the ``defectd`` of this environment; everything else is verified as shipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "defectd.service"
DROP_IN = ROOT / "systemd" / "gpu-station.conf.example"
INSTALLED = "/opt/defectd/.venv/bin/defectd"


def _local_defectd() -> str:
    candidate = Path(sys.executable).with_name("defectd")
    found = str(candidate) if candidate.exists() else shutil.which("defectd")
    if found is None:
        pytest.skip("no defectd executable in this environment (pip install -e .)")
    return found


def _unit_with_local_exec(tmp_path: Path) -> Path:
    text = UNIT.read_text()
    assert INSTALLED in text
    unit = tmp_path / "defectd.service"
    unit.write_text(text.replace(INSTALLED, _local_defectd()))
    return unit


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (.ci/run installs systemd in CI)")
    return subprocess.run(
        [analyze, "verify", unit.name],
        cwd=unit.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unit_file_verifies_without_warnings(tmp_path: Path) -> None:
    result = _verify(_unit_with_local_exec(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


def test_unit_with_gpu_drop_in_verifies_without_warnings(tmp_path: Path) -> None:
    unit = _unit_with_local_exec(tmp_path)
    drop_in_dir = tmp_path / "defectd.service.d"
    drop_in_dir.mkdir()
    shutil.copy(DROP_IN, drop_in_dir / "gpu.conf")
    result = _verify(unit)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == ""


def test_unit_is_a_notify_service_with_watchdog_and_state_directory() -> None:
    settings = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["Restart"] == "on-failure"
    assert settings["StateDirectory"] == "defectd"
    assert settings["WatchdogSec"].endswith("s")
    assert settings["ProtectSystem"] == "strict"
    assert settings["CapabilityBoundingSet"] == ""


def test_unit_stop_timeout_is_the_one_the_config_check_holds_the_drain_against() -> None:
    from defectd.daemon.config import SHUTDOWN_GRACE_S, UNIT_STOP_TIMEOUT_S, DaemonSection

    stop = next(
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith("TimeoutStopSec=")
    )
    assert float(stop.removesuffix("s")) == UNIT_STOP_TIMEOUT_S
    assert DaemonSection().drain_timeout_s + SHUTDOWN_GRACE_S <= UNIT_STOP_TIMEOUT_S
