"""Every verdict names what decided it: the file the engine executed and a hash of every
setting and file that changes a decision."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectd.daemon.config import StationConfig, load_station_config
from defectd.daemon.station import build_generation
from defectd.model.card import card_path, file_sha256
from defectd.pipeline.frame import Frame
from defectd.pipeline.runner import PipelineResult


def station(
    tmp: Path, model: Path, *, camera: str = "", model_extra: str = "", rest: str = ""
) -> StationConfig:
    path = tmp / "station.toml"
    path.write_text(
        f"""station = "tr"
[model]
path = "{model}"
backend = "ort"
threads = 1
warmup = 0
{model_extra}
[[cameras]]
type = "synthetic"
camera = "cam0"
height = 64
width = 64
{camera}
[mqtt]
port = 1
[health]
enabled = false
[daemon]
state_dir = "{tmp / "state"}"
{rest}
"""
    )
    return load_station_config(path)


def one_verdict(config: StationConfig) -> PipelineResult:
    results: list[PipelineResult] = []
    done = threading.Event()

    def sink(result: PipelineResult) -> None:
        results.append(result)
        done.set()

    gen = build_generation(config, sink)
    gen.pipeline.start()
    try:
        gen.pipeline.submit(Frame("tr", "cam0", 0, np.zeros((64, 64), np.uint8), 0, 0.0))
        assert done.wait(20)
    finally:
        gen.pipeline.stop(5)
        gen.model.engine.close()
    return results[0]


@pytest.fixture
def models(tmp_path: Path, tiny_model: Path, tiny_int8_model: Path) -> Path:
    """A copy of the tiny model with its INT8 sibling (and their cards) in a folder of its own."""
    folder = tmp_path / "models"
    folder.mkdir()
    for src in (tiny_model, tiny_int8_model):
        shutil.copy(src, folder / src.name)
        shutil.copy(card_path(src), card_path(folder / src.name))
    return folder / "model.onnx"


def test_an_int8_station_stamps_the_int8_file_it_runs(tmp_path: Path, models: Path) -> None:
    config = station(tmp_path, models, model_extra='precision = "int8"')
    result = one_verdict(config)
    int8 = models.with_name("model.int8.onnx")
    assert result.inspection.model_sha256 == file_sha256(int8)
    assert result.inspection.model_sha256 != file_sha256(models)


def test_an_fp32_station_stamps_the_model_file_it_runs(tmp_path: Path, models: Path) -> None:
    result = one_verdict(station(tmp_path, models))
    assert result.inspection.model_sha256 == file_sha256(models)
    assert result.inspection.config_hash == station(tmp_path, models).hash()


def test_the_config_hash_follows_every_decision_setting_and_file(
    tmp_path: Path, models: Path
) -> None:
    calibration = tmp_path / "cam0.calibration.json"
    calibration.write_text(json.dumps({"schema_version": 1}))
    zone = tmp_path / "zone.png"
    cv2.imwrite(str(zone), np.zeros((64, 64), np.uint8))
    cam = f'calibration = "{calibration}"\nignore_zones = ["{zone}"]'
    base = station(tmp_path, models, camera=cam).hash()

    def hash_with(**kw: str) -> str:
        return station(tmp_path, models, **{"camera": cam, **kw}).hash()

    changed = {
        "roi": hash_with(camera=cam + "\nroi = { x = 0, y = 0, width = 32, height = 32 }"),
        "precision": hash_with(model_extra='precision = "int8"'),
        "fit": hash_with(rest='[pipeline]\nfit = "pad"'),
        "threshold": hash_with(rest="[postprocess]\nthreshold = 0.3"),
        "zone rectangle": hash_with(
            camera=cam.replace(
                f'"{zone}"]', f'"{zone}", {{ x = 0, y = 0, width = 8, height = 8 }}]'
            )
        ),
    }
    assert all(h != base for h in changed.values()), changed
    assert len(set(changed.values())) == len(changed)

    # The files' contents count, not only their names.
    calibration.write_text(json.dumps({"schema_version": 1, "station": "moved"}))
    after_calibration = hash_with()
    assert after_calibration != base
    cv2.imwrite(str(zone), np.full((64, 64), 255, np.uint8))
    assert hash_with() != after_calibration

    # Delivery settings do not decide verdicts.
    assert hash_with(rest="[outbox]\nmax_rows = 10") == hash_with()
