"""Offline equals online: the station's verdict on an image is the one calibration computed.

A labelled set of parts larger than the model input is calibrated with ``defectd calibrate
threshold``; the same set is then replayed through the daemon (real ONNX Runtime, real
Mosquitto, default fit) and every published verdict is compared with the calibration's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from defectd.calibration.file import load_calibration
from defectd.cli import main
from defectd.cli.calibrate_threshold_cmd import verdicts_at
from defectd.daemon.config import load_station_config
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.data.datasets import open_dataset
from defectd.training.evaluate import open_model
from station_support import EVERY_FRAME, model_section, run_to_the_end

pytestmark = pytest.mark.slow

SIZES = ((192, 256), (256, 192), (160, 160))  # 2.5-4x the tiny model's 64x64 input


def write_parts(root: Path, count: int = 24) -> Path:
    """Noisy gray parts with bright discs (what ``tiny_model`` finds) on two of every three;
    splits alternate val/test. Parts are several times the model input, so a station that
    tiled them at native scale would see them otherwise than the card's ``resize`` does."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(7)
    rows = []
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        image = rng.normal(0.45 * 255, 20, (h, w))
        mask = np.zeros((h, w), np.uint8)
        defective = i % 3 != 0
        if defective:
            yy, xx = np.mgrid[0:h, 0:w]
            for _ in range(int(rng.integers(1, 3))):
                cy, cx = int(rng.integers(12, h - 12)), int(rng.integers(12, w - 12))
                r = float(rng.uniform(2.5, 14.0))  # small ones vanish when scaled down
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                mask[disc] = 1
                image[disc] += 0.35 * 255
        stem = f"part{i:02d}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), np.clip(image, 0, 255).astype(np.uint8))
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask * 255)
        split = "val" if i % 2 == 0 else "test"
        rows.append([stem, "disc" if defective else "free", f"images/{stem}.png",
                     f"masks/{stem}.png", split, int(defective)])  # fmt: skip
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "cls", "image", "mask", "split", "has_defect"])
        writer.writerows(rows)
    return root


def station_toml(tmp: Path, model: Path, data: Path, calibration: Path, port: int) -> Path:
    """Defaults everywhere except what an offline replay needs: every part inspected however
    long it waits (no deadline, blocking admission), and an exit when the replay ends."""
    path = tmp / "station.toml"
    path.write_text(
        f"""station = "oo"
{model_section(model)}
[[cameras]]
type = "replay"
camera = "cam0"
path = "{data}"
calibration = "{calibration}"
{EVERY_FRAME}
{run_to_the_end(port, tmp / "state")}
"""
    )
    return path


def test_daemon_verdicts_equal_the_calibrated_verdicts_image_by_image(
    tmp_path: Path,
    tiny_model: Path,
    mosquitto: Any,
    mqtt_collector: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = write_parts(tmp_path / "parts")
    calibration = tmp_path / "calibration.json"
    rc = main(
        ["calibrate", "threshold", "--model", str(tiny_model), "--data", str(data),
         "--out", str(calibration), "--target-escape", "0.2", "--json"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    point = load_calibration(calibration).threshold
    assert point is not None

    # Offline: the calibration's own computation at the chosen operating point, per image.
    dataset = open_dataset(data)
    opened = open_model(tiny_model, backend="ort")
    try:
        offline = verdicts_at(dataset, ("val", "test"), opened, point)
    finally:
        opened.close()
    assert set(offline.values()) == {True, False}  # both verdicts occur: the check has teeth

    # Online: the same images replayed through the station, verdicts read from the broker.
    broker = mosquitto()
    collector = mqtt_collector(broker.host, broker.port, "defectd/oo/+/result")
    config = load_station_config(station_toml(tmp_path, tiny_model, data, calibration, broker.port))
    service = Service(config, notifier=SdNotifier({}), install_signals=False)
    assert service.serve() == 0
    assert collector.wait_for(
        lambda _: len({p["part_id"] for p in collector.payloads("/result")}) == len(offline), 20
    )
    online: dict[str, bool] = {}
    for payload in collector.payloads("/result"):
        assert payload["verdict"] in ("pass", "fail"), json.dumps(payload)
        online[payload["part_id"]] = payload["verdict"] == "fail"

    mismatches = {stem for stem in offline if online[stem] != offline[stem]}
    assert not mismatches, f"daemon vs calibration differ on {sorted(mismatches)}"
