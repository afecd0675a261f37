"""A station with a multi-class model: every defect carries its class, rules act per class,
and the daemon's verdict on each part of the synthetic line is the one the per-class operating
points of its calibration file (``defectd calibrate threshold``) give offline."""

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
from defectd.daemon.config import load_station_config
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.service import Service
from defectd.data.metrics import ClassAccumulator
from defectd.data.synth import DEFECTS, PartRenderer
from defectd.model.card import load_card
from defectd.publish.messages import schema_errors
from defectd.training.evaluate import open_model
from station_support import EVERY_FRAME, run_to_the_end, synthetic_station
from training_support import tiny_training

pytestmark = pytest.mark.slow

SIZE = 64
CLASSES = ("chip", "stain")
SEED, PARTS, DEFECT_RATE = 11, 40, 0.7


def write_line_parts(root: Path, count: int = 64) -> Path:
    """Parts of the synthetic line with chips and stains, their class-index masks
    (values = ``DEFECTS.index(kind) + 1``, named in ``classes.txt``) and a manifest."""
    for sub in ("images", "masks", "masks_cls"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(DEFECTS) + "\n")
    renderer = PartRenderer(SIZE, SIZE)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        part = renderer.render(rng, defect_prob=0.8, kinds=CLASSES)
        assert part.labels is not None
        stem = f"p{i:03d}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), part.image)
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), part.mask * 255)
        cv2.imwrite(str(root / "masks_cls" / f"{stem}.png"), part.labels)
        present = sorted({DEFECTS[v - 1] for v in np.unique(part.labels) if v})
        rows.append(
            [stem, "+".join(present) or "free", f"images/{stem}.png", f"masks/{stem}.png",
             f"masks_cls/{stem}.png", "val" if i % 4 == 0 else "train", int(bool(present))]
        )  # fmt: skip
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["stem", "cls", "image", "mask", "mask_classes", "split", "has_defect"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def chip_stain_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-class U-Net (chip, stain) trained briefly on the line's parts, exported; and its
    data set."""
    import torch

    from defectd.training.train import train

    root = tmp_path_factory.mktemp("chip_stain")
    data = write_line_parts(root / "data")
    torch.manual_seed(0)
    config = tiny_training(
        data,
        root / "run",
        SIZE,
        epochs=20,
        batch_size=8,
        loss="bce_dice_img",
        bf16=False,  # the same model on every machine
        classes=CLASSES,
    )
    train(config)
    onnx = root / "model" / "model.onnx"
    assert main(["export", "--checkpoint", str(root / "run" / "best.pt"), "--out", str(onnx)]) == 0
    return onnx, data


def station_toml(
    tmp: Path, model: Path, calibration: Path | None, port: int, extra: str = ""
) -> Path:
    path = tmp / "station.toml"
    camera_calibration = "" if calibration is None else f'calibration = "{calibration}"'
    path.write_text(
        f"""{synthetic_station("mc", model)}
{camera_calibration}
height = {SIZE}
width = {SIZE}
rate_hz = 50
seed = {SEED}
count = {PARTS}
defect_rate = {DEFECT_RATE}
{EVERY_FRAME}
[rules]
rules = [{{ kind = "area", class = "chip", min_area_px = 1 }}]
{run_to_the_end(port, tmp / "state")}
{extra}"""
    )
    return path


def offline_chip_verdicts(model: Path, calibration: Path) -> dict[str, bool]:
    """Per part id of the line: whether the model's chip channel, at the calibrated chip
    point, holds a region (the rule's verdict), computed without the daemon."""
    card = load_card(model)
    section = load_calibration(calibration).threshold
    assert section is not None
    points = [section.classes[c] for c in card.classes]
    decide = ClassAccumulator(
        card.classes,
        tuple(p.pixel_threshold for p in points),
        tuple(p.min_area_px for p in points),
    ).decide
    renderer = PartRenderer(SIZE, SIZE)
    rng = np.random.default_rng(SEED)
    opened = open_model(model, backend="ort")
    verdicts = {}
    try:
        for n in range(PARTS):
            part = renderer.render(rng, defect_prob=DEFECT_RATE)
            x = card.normalisation.apply(part.image[None, None])
            probs = opened.predictor.infer(x)[0]
            decided = decide(probs)
            verdicts[f"cam0-{n}"] = bool(decided[card.classes.index("chip")].any())
    finally:
        opened.close()
    return verdicts


def test_rules_by_class_decide_as_the_per_class_points_do_offline(
    tmp_path: Path,
    chip_stain_model: tuple[Path, Path],
    mosquitto: Any,
    mqtt_collector: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model, data = chip_stain_model
    card = load_card(model)
    assert card.classes == CLASSES and set(card.per_class) == set(CLASSES)
    calibration = tmp_path / "cam0.calibration.json"
    args = ["calibrate", "threshold", "-m", str(model), "-d", str(data), "-o", str(calibration)]
    assert main([*args, "--target-false-reject", "0.34", "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["classes"]
    section = load_calibration(calibration).threshold
    assert section is not None and set(section.classes) == set(CLASSES)
    assert section.classes["chip"].pixel_threshold == chosen["chip"]["pixel_threshold"]

    broker = mosquitto()
    collector = mqtt_collector(broker.host, broker.port, "defectd/mc/+/result")
    config = load_station_config(station_toml(tmp_path, model, calibration, broker.port))
    service = Service(config, notifier=SdNotifier({}), install_signals=False)
    assert service.serve() == 0
    assert collector.wait_for(
        lambda _: len({p["part_id"] for p in collector.payloads("/result")}) == PARTS, 20
    )
    online: dict[str, bool] = {}
    classes_seen: set[str] = set()
    passed_with_stains = 0
    for payload in collector.payloads("/result"):
        assert not schema_errors("result", payload)
        assert payload["verdict"] in ("pass", "fail")
        found = {d["class"] for d in payload["defects"]}
        assert found <= set(CLASSES)
        classes_seen |= found
        failed = payload["verdict"] == "fail"
        # The only rule looks at chips: a part fails exactly when a chip was found.
        assert failed == ("chip" in found), payload
        if failed:
            assert payload["rule"] == "chip:area>=1px"
        elif "stain" in found:
            passed_with_stains += 1
        online[payload["part_id"]] = failed

    offline = offline_chip_verdicts(model, calibration)
    mismatches = sorted(k for k in offline if online[k] != offline[k])
    assert not mismatches, f"daemon vs offline per-class decisions differ on {mismatches}"
    assert classes_seen == set(CLASSES)  # both classes were found: the check has teeth
    assert passed_with_stains > 0  # a stain alone does not fail a part under a chip rule
    assert set(online.values()) == {True, False}


def test_the_archive_keeps_class_labels_that_become_a_multiclass_training_set(
    tmp_path: Path,
    chip_stain_model: tuple[Path, Path],
    mosquitto: Any,
    mqtt_collector: Any,
) -> None:
    from defectd.data.datasets import open_dataset
    from defectd.data.from_archive import dataset_from_archive

    model, _ = chip_stain_model
    broker = mosquitto()
    collector = mqtt_collector(broker.host, broker.port, "defectd/mc/+/result")
    extra = "[archive]\npass_sample = 1.0\noverlays = false\n"
    config = load_station_config(station_toml(tmp_path, model, None, broker.port, extra))
    service = Service(config, notifier=SdNotifier({}), install_signals=False)
    assert service.serve() == 0
    assert collector.wait_for(lambda _: len(collector.payloads("/result")) >= PARTS, 20)
    archive = tmp_path / "state" / "archive"
    # The model's classes take the first values; a kind only the line's truth names follows.
    names = (archive / "classes.txt").read_text().split()
    assert tuple(names[:2]) == CLASSES and set(names) <= set(DEFECTS)

    renderer = PartRenderer(SIZE, SIZE)
    rng = np.random.default_rng(SEED)
    truth = [renderer.render(rng, defect_prob=DEFECT_RATE).labels for _ in range(PARTS)]
    with (archive / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == PARTS  # every part: fails, errors and (pass_sample 1) passes
    defective = 0
    for row in rows:
        result = json.loads((archive / "results" / f"{row['stem']}.json").read_text())
        labels = truth[int(result["part_id"].split("-")[1])]
        assert labels is not None and result["label_source"] == "truth"
        if not labels.any():
            assert row["mask_classes"] == "" and row["cls"] == "free"
            continue
        defective += 1
        index = cv2.imread(str(archive / row["mask_classes"]), cv2.IMREAD_UNCHANGED)
        kinds = [names[v - 1] for v in np.unique(index) if v]
        assert row["cls"] == "+".join(sorted(kinds))
        for value, kind in enumerate(DEFECTS, start=1):  # each true pixel keeps its kind
            if kind in names:
                assert np.array_equal(index == names.index(kind) + 1, labels == value), kind
    assert defective > 0

    report = dataset_from_archive(archive, out=tmp_path / "retrain")
    assert report.classes == names and report.included == PARTS
    ds = open_dataset(tmp_path / "retrain")
    for sample in ds.samples():  # every index mask agrees with its cls for the model's classes
        ds.load_labels(sample, (SIZE, SIZE), CLASSES)
