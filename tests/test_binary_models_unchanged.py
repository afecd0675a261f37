"""One-class models made before multi-class segmentation existed keep their numbers: the
shipped magnetic-tile model evaluates and decides exactly as it did (values recorded with the
code before the change, on generated parts), through ``defectd eval`` and the pipeline at its
calibration file's operating point."""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from defectd.cli import main
from defectd.data.synth import PartRenderer
from defectd.engines import open_engine
from defectd.model.card import file_sha256, load_card
from defectd.pipeline.cameras import camera_setup_from_calibration
from defectd.pipeline.config import PipelineConfig
from defectd.pipeline.frame import Frame
from defectd.pipeline.runner import Pipeline, PipelineResult

MODEL = Path(__file__).resolve().parent / "data" / "magnetic_tile_v1" / "model.onnx"
# The model the numbers below were recorded with: another model has other numbers.
RECORDED_SHA256 = "2ad31e3077b0"
PARTS, SIZE = 12, (250, 370)


def _no_hit(
    *, images: int, defective: int, accuracy: float, mean_image_iou: float | None = 0.0
) -> dict[str, Any]:
    """A class's recorded ``per_class`` entry: no predicted pixel on a true defect pixel of it
    (Dice, IoU, precision and recall 0)."""
    return {
        "images": images,
        "defective": defective,
        "dice": 0.0,
        "iou": 0.0,
        "precision": 0.0,
        "recall": 0.0,
        "mean_image_iou": mean_image_iou,
        "accuracy": accuracy,
    }


# `defectd eval --json` on the parts, recorded before multi-class models existed.
EVAL_BEFORE: dict[str, Any] = {
    "dice": 0.0,
    "iou": 0.0,
    "precision": 0.0,
    "recall": 0.0,
    "mean_image_iou": 0.0,
    "accuracy": 0.25,
    "auroc": 0.638889,
    "best_threshold": 0.01,
    "best_dice": 0.022836,
    "per_class": {
        "chip": _no_hit(images=2, defective=2, accuracy=0.5),
        "crack": _no_hit(images=1, defective=1, accuracy=0.0),
        "free": _no_hit(images=6, defective=0, accuracy=0.333333, mean_image_iou=None),
        "pit": _no_hit(images=1, defective=1, accuracy=0.0),
        "stain": _no_hit(images=2, defective=2, accuracy=0.0),
    },
}
# Per part: verdict, rule and (area px, score max) of each defect, recorded likewise.
VERDICTS_BEFORE: list[tuple[str, str, list[tuple[int, float]]]] = [
    ("fail", "any-defect", [(38, 0.931), (31, 0.9761), (27, 0.9912), (23, 0.6741), (22, 0.9225)]),
    ("fail", "any-defect", [(24, 0.3063)]),
    ("fail", "any-defect", [(65, 0.9369)]),
    (
        "fail",
        "any-defect",
        [
            (2459, 0.9979),
            (907, 0.9949),
            (650, 0.962),
            (392, 0.983),
            (199, 0.9563),
            (153, 0.7504),
            (73, 0.991),
            (55, 0.3271),
            (53, 0.7383),
            (52, 0.6724),
            (44, 0.6538),
            (36, 0.9826),
            (30, 0.7287),
        ],
    ),
    ("pass", "none", []),
    ("pass", "none", []),
    ("fail", "any-defect", [(112, 0.9976), (39, 0.9889), (35, 0.8021), (34, 0.9125), (29, 0.8746)]),
    ("fail", "any-defect", [(44, 0.966), (41, 0.9416)]),
    (
        "fail",
        "any-defect",
        [
            (276, 0.9996),
            (197, 0.9995),
            (115, 0.9956),
            (95, 0.9997),
            (62, 0.9971),
            (60, 0.8414),
            (60, 0.9892),
            (54, 0.9971),
            (44, 0.9079),
            (41, 0.9964),
            (38, 0.944),
            (37, 0.9441),
            (31, 0.9674),
            (30, 0.8788),
            (29, 0.9981),
            (22, 0.9902),
            (22, 0.7056),
        ],
    ),
    ("fail", "any-defect", [(34, 0.9956), (32, 0.9916)]),
    ("pass", "none", []),
    ("fail", "any-defect", [(34, 0.9786), (33, 0.9067), (25, 0.8158)]),
]


def write_parts(root: Path) -> Path:
    """Synthetic parts of the tile's size, half of them defective, as a manifest data set."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    renderer = PartRenderer(*SIZE)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(PARTS):
        part = renderer.render(rng, defect_prob=0.5)
        stem = f"p{i:02d}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), part.image)
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), part.mask * 255)
        rows.append([stem, part.cls, f"images/{stem}.png", f"masks/{stem}.png", "test",
                     int(bool(part.defects))])  # fmt: skip
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "cls", "image", "mask", "split", "has_defect"])
        writer.writerows(rows)
    return root


def eval_numbers(data: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    args = ["eval", "--model", str(MODEL), "--data", str(data), "--backend", "ort"]
    args += ["--precision", "fp32", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    keys = ("dice", "iou", "precision", "recall", "mean_image_iou", "accuracy", "auroc")
    return {k: out[k] for k in (*keys, "best_threshold", "best_dice", "per_class")}


def pipeline_verdicts(data: Path) -> list[tuple[str, str, list[tuple[int, float]]]]:
    card = load_card(MODEL)
    setup = camera_setup_from_calibration(MODEL.with_name("calibration.json"))
    engine = open_engine(MODEL, backend="ort", precision="fp32", max_batch=4, threads=1)
    results: dict[int, PipelineResult] = {}
    lock = threading.Lock()

    def sink(result: PipelineResult) -> None:
        with lock:
            results[result.inspection.seq] = result

    pipe = Pipeline(
        engine,
        card,
        PipelineConfig(admission="block", max_latency_ms=None),
        on_result=sink,
        cameras={"cam0": setup},
        model_sha256=file_sha256(MODEL),
    )
    pipe.start()
    try:
        for i in range(PARTS):
            image = cv2.imread(str(data / "images" / f"p{i:02d}.png"), cv2.IMREAD_GRAYSCALE)
            now = time.monotonic_ns()
            pipe.submit(Frame("s", "cam0", i, image, now, time.time()))
        assert pipe.wait_idle(60)
    finally:
        pipe.stop(10)
        engine.close()
    out = []
    for i in range(PARTS):
        ins = results[i].inspection
        defects = [(d.area_px, d.score_max) for d in ins.defects]
        out.append((ins.verdict.value, str(ins.rule), defects))
    return out


def test_magnetic_tile_model_evaluates_and_decides_as_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert file_sha256(MODEL).startswith(RECORDED_SHA256), (
        "models/magnetic_tile changed since these numbers were recorded; record them again"
    )
    data = write_parts(tmp_path / "parts")
    assert eval_numbers(data, capsys) == EVAL_BEFORE
    assert pipeline_verdicts(data) == VERDICTS_BEFORE
