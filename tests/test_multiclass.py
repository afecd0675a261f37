"""Multi-class segmentation: class labels from index masks or the class column, one output
channel per class, per-class operating points in the card, per-class metrics in eval."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from defectd.cli import main
from defectd.data.datasets import open_dataset, unpack_labels
from defectd.data.metrics import ClassAccumulator
from defectd.errors import DataError
from defectd.model.card import ClassPoint, ModelCard, load_card
from defectd.model.checkpoint import load_checkpoint
from defectd.training.losses import LossConfig, SegLoss, image_dice_loss, soft_dice_loss
from defectd.training.train import train
from training_support import tiny_training

SIZE = 48


def write_two_class_set(root: Path, count: int = 36, *, index_masks: bool = True) -> Path:
    """Grey parts with a bright square ('bright', value 1) and/or a dark bar ('dark', value 2).

    With ``index_masks`` every part names both its classes (``cls`` joined by ``+``) and has a
    class-index mask; without, each defective part has one class, named in ``cls``.
    """
    for sub in ("images", "masks", "masks_cls"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        image = rng.integers(90, 120, (SIZE, SIZE), dtype=np.uint8)
        index = np.zeros((SIZE, SIZE), np.uint8)
        kinds = ("bright", "dark", "both") if index_masks else ("bright", "dark", "none")
        kind = kinds[i % 3]
        if kind in ("bright", "both"):
            y, x = rng.integers(4, SIZE - 16, 2)
            index[y : y + 10, x : x + 10] = 1
        if kind in ("dark", "both"):
            y, x = rng.integers(4, SIZE - 8, 2)
            index[y : y + 4, max(0, x - 10) : x + 6] = 2
        image[index == 1] = 230
        image[index == 2] = 20
        names = sorted({("bright", "dark")[v - 1] for v in np.unique(index) if v})
        stem = f"p{i:03d}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), image)
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), (index > 0).astype(np.uint8) * 255)
        row = {
            "stem": stem,
            "cls": "+".join(names) or "free",
            "image": f"images/{stem}.png",
            "mask": f"masks/{stem}.png" if names else "",
            "split": ("train", "train", "val", "test")[i % 4],
            "has_defect": int(bool(names)),
        }
        if index_masks:
            cv2.imwrite(str(root / "masks_cls" / f"{stem}.png"), index)
            row["mask_classes"] = f"masks_cls/{stem}.png"
        rows.append(row)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def two_class_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A two-class set and a short multi-class training run on it."""
    root = tmp_path_factory.mktemp("mc")
    data = write_two_class_set(root / "data")
    torch.manual_seed(0)
    config = tiny_training(data, root / "run", SIZE, epochs=12, batch_size=6, classes=("auto",))
    train(config)
    return data, root / "run" / "best.pt"


def test_index_masks_give_each_pixel_its_class(tmp_path: Path) -> None:
    ds = open_dataset(write_two_class_set(tmp_path / "d"))
    assert ds.label_classes == ("bright", "dark")
    assert ds.defect_classes() == ("bright", "dark")
    both = next(s for s in ds.samples() if s.cls == "bright+dark")
    index = cv2.imread(str(both.mask_classes), cv2.IMREAD_GRAYSCALE)
    labels = ds.load_labels(both, (SIZE, SIZE), ("bright", "dark"))
    planes = unpack_labels(labels, 2)
    assert np.array_equal(planes[0] > 0, index == 1)
    assert np.array_equal(planes[1] > 0, index == 2)
    # The one-class model sees every defect pixel, whatever its class.
    assert np.array_equal(ds.load_labels(both, (SIZE, SIZE), ("defect",)), index > 0)
    # A model of one of the classes sees only that class's pixels.
    only_dark = ds.load_labels(both, (SIZE, SIZE), ("dark",))
    assert np.array_equal(only_dark > 0, index == 2)


def test_class_column_labels_a_binary_mask(tmp_path: Path) -> None:
    ds = open_dataset(write_two_class_set(tmp_path / "d", index_masks=False))
    assert ds.label_classes == ()
    assert ds.defect_classes() == ("bright", "dark")
    dark = next(s for s in ds.samples() if s.cls == "dark")
    planes = unpack_labels(ds.load_labels(dark, (SIZE, SIZE), ("bright", "dark")), 2)
    assert not planes[0].any() and planes[1].any()


def test_index_mask_that_contradicts_the_class_column_is_named(tmp_path: Path) -> None:
    root = write_two_class_set(tmp_path / "d")
    (root / "classes.txt").write_text("dark\nbright\n")  # the wrong order
    ds = open_dataset(root)
    sample = next(s for s in ds.samples() if s.cls == "bright")
    with pytest.raises(DataError, match=str(sample.mask_classes)):
        ds.load_labels(sample, (SIZE, SIZE), ("bright", "dark"))


def test_one_class_losses_are_unchanged_and_classes_weigh_alike() -> None:
    gen = torch.Generator().manual_seed(0)
    prob = torch.rand((2, 1, 8, 8), generator=gen)
    target = (torch.rand((2, 1, 8, 8), generator=gen) > 0.7).float()
    inter = (prob * target).sum()
    expected = 1.0 - (2.0 * inter + 1.0) / (prob.sum() + target.sum() + 1.0)
    assert torch.equal(soft_dice_loss(prob, target), expected)
    # Two classes: the mean of each class's own Dice loss.
    probs = torch.cat([prob, prob.flip(0)], dim=1)
    targets = torch.cat([target, target.flip(0)], dim=1)
    per = [soft_dice_loss(probs[:, k : k + 1], targets[:, k : k + 1]) for k in range(2)]
    assert soft_dice_loss(probs, targets) == pytest.approx(float(sum(per) / 2))
    assert image_dice_loss(probs, targets) >= 0
    loss = SegLoss(LossConfig(kind="bce_dice_img"))(
        torch.logit(probs.clamp(1e-4, 1 - 1e-4)), targets
    )
    assert torch.isfinite(loss)


def test_card_per_class_points_name_known_classes() -> None:
    card = ModelCard(
        name="m",
        classes=("bright", "dark"),
        threshold=0.3,
        per_class={"dark": ClassPoint(threshold=0.6, min_area_px=5)},
    )
    assert card.point("dark") == ClassPoint(threshold=0.6, min_area_px=5)
    assert card.point("bright") == ClassPoint(threshold=0.3, min_area_px=0)
    with pytest.raises(ValueError, match="scratch"):
        ModelCard(name="m", classes=("a",), per_class={"scratch": ClassPoint(threshold=0.5)})


def test_one_class_card_file_has_no_per_class_entry(tmp_path: Path) -> None:
    ModelCard(name="m").save(tmp_path / "model.card.json")
    assert "per_class" not in json.loads((tmp_path / "model.card.json").read_text())


def test_confusion_matrix_counts_pixels_by_true_and_predicted_class() -> None:
    acc = ClassAccumulator(("a", "b"), (0.5, 0.5), (0, 0))
    truth = np.zeros((2, 4, 4), np.uint8)
    truth[0, 0, :2] = 1  # two 'a' pixels
    truth[1, 1, :] = 1  # four 'b' pixels
    probs = np.zeros((2, 4, 4), np.float32)
    probs[0, 0, :2] = 0.9  # both 'a' found as 'a'
    probs[0, 1, :2] = 0.8  # two 'b' pixels taken for 'a' ...
    probs[1, 1, :] = 0.6  # ... though 'b' also fires: the more probable class wins
    acc.add(probs, truth)
    report = acc.report()
    assert report.confusion == [[10, 0, 0], [0, 2, 0], [0, 2, 2]]
    assert report.per_class["a"]["precision"] == pytest.approx(0.5)
    assert report.per_class["b"]["recall"] == 1.0


def test_multiclass_training_writes_a_card_with_a_point_per_class(
    two_class_run: tuple[Path, Path],
) -> None:
    _, best = two_class_run
    net, card = load_checkpoint(best)
    assert card.classes == ("bright", "dark")
    assert set(card.per_class) == {"bright", "dark"}
    assert net.head.out_channels == 2
    assert {"val_iou_bright", "val_iou_dark", "val_mean_iou"} <= card.metrics.keys()
    assert card.metrics["val_iou_bright"] > 0.5


def test_eval_reports_per_class_pixels_and_the_confusion_matrix_for_pt_and_onnx(
    two_class_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, best = two_class_run
    onnx = tmp_path / "m" / "model.onnx"
    assert main(["export", "--checkpoint", str(best), "--out", str(onnx)]) == 0
    assert load_card(onnx).per_class.keys() == {"bright", "dark"}
    capsys.readouterr()
    results = []
    for model in (best, onnx):
        masks = tmp_path / f"masks_{model.suffix[1:]}"
        args = ["--model", str(model), "--data", str(data), "--masks", str(masks), "--json"]
        assert main(["eval", *args]) == 0
        results.append(json.loads(capsys.readouterr().out))
    first, second = results
    classes = first["classes"]
    assert classes["confusion"]["labels"] == ["good", "bright", "dark"]
    assert len(classes["confusion"]["matrix"]) == 3
    assert classes["per_class"]["bright"]["iou"] > 0.5
    for name in ("bright", "dark"):
        assert second["classes"]["per_class"][name]["iou"] == pytest.approx(
            classes["per_class"][name]["iou"], abs=1e-3
        )
    written = cv2.imread(str(next((tmp_path / "masks_pt").glob("*.png"))), cv2.IMREAD_GRAYSCALE)
    assert written is not None and set(np.unique(written)) <= {0, 1, 2}
