"""``defectd cameras`` lists the devices of the producers, for people and for scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from defectd.cli import main


def test_cameras_json_lists_the_three_viky_devices_out_of_the_box() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GENICAM_GENTL64_PATH"}
    done = subprocess.run(
        [sys.executable, "-m", "defectd", "cameras", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)  # stdout holds the JSON object and nothing else
    assert listing["simulated"] is True
    assert [Path(p).name for p in listing["producers"]] == ["viky.cti"]
    devices = listing["devices"]
    assert [d["serial"] for d in devices] == ["0", "1", "2"]
    assert {d["vendor"] for d in devices} == {"Machine Vision Games Ltd."}
    assert {d["model"] for d in devices} == {"Viky"}
    for d in devices:
        assert d["access"] == "available"
        assert {"PixelFormat", "Width", "Height", "AcquisitionFrameRate"} <= set(d["nodes"])


def test_cameras_names_a_producer_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "vendor.cti"
    assert main(["cameras", "--producer", str(missing), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"error: GenTL producer {missing} does not exist"


def test_cameras_reads_producers_from_the_genicam_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from defectd.pipeline.sources.gentl import bundled_producer

    monkeypatch.setenv("GENICAM_GENTL64_PATH", str(bundled_producer().parent))
    assert main(["cameras", "--json", "--no-nodes"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["producers"] == [str(bundled_producer())]
    assert len(listing["devices"]) == 3
    assert all(d["nodes"] == {} for d in listing["devices"])
