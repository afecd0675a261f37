"""``defectd calibrate int8``: an INT8 QDQ model from a calibration subset, checked against fp32."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from defectd.cli.calibrate_cmd import calibrate_app, progress_bar
from defectd.cli.console import report_console
from defectd.cli.guard import refuse_overwrite
from defectd.cli.options import JsonTable, LabelledDataset
from defectd.errors import CalibrationError, ConfigError
from defectd.log import get_logger

if TYPE_CHECKING:
    from defectd.calibration.int8 import Agreement
    from defectd.data.datasets import Dataset
    from defectd.training.evaluate import OpenedModel, Prediction

log = get_logger(__name__)

IOU_TOLERANCE = 0.01  # |int8 IoU - fp32 IoU| accepted
AGREEMENT_TARGET = 0.99  # share of images with the same verdict


class MethodChoice(StrEnum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"
    all = "all"


def predict_split(
    dataset: Dataset, split: str, opened: OpenedModel, label: str, batch_size: int = 8
) -> list[Prediction]:
    """Every image of ``split`` at native size, in memory (O(pixels) of the split)."""
    from defectd.training.evaluate import predict

    samples = dataset.samples(split)
    out: list[Prediction] = []
    with progress_bar(f"int8: {label} on {split}", len(samples)) as progress:
        for pred in predict(dataset, samples, opened.predictor, opened.card, batch_size=batch_size):
            out.append(pred)
            progress(len(out), len(samples))
    return out


@dataclass(frozen=True, slots=True)
class Targets:
    """What an INT8 model must keep against fp32: IoU change and verdict agreement."""

    max_iou_delta: float = IOU_TOLERANCE
    min_agreement: float = AGREEMENT_TARGET

    def met_by(self, a: Agreement) -> bool:
        return abs(a.iou_delta) <= self.max_iou_delta and a.verdict_agreement >= self.min_agreement

    def describe(self) -> str:
        return f"|dIoU| <= {self.max_iou_delta:g}, agreement >= {self.min_agreement * 100:g} %"


def _print_table(rows: list[Agreement], chosen: str, out: Path | None, targets: Targets) -> None:
    first = rows[0]
    table = Table(
        title=(
            f"int8 vs fp32 on {first.split} ({first.images} images, threshold "
            f"{first.threshold:g}, min area {first.min_area_px} px)"
        )
    )
    for col in (
        "method",
        "fp32 IoU",
        "int8 IoU",
        "dIoU",
        "fp32 Dice",
        "int8 Dice",
        "verdicts agree",
        "max |dp|",
        "ok",
    ):
        table.add_column(col, justify="right")
    for a in rows:
        table.add_row(
            a.method + (" *" if a.method == chosen else ""),
            f"{a.fp32_iou:.4f}",
            f"{a.int8_iou:.4f}",
            f"{a.iou_delta:+.4f}",
            f"{a.fp32_dice:.4f}",
            f"{a.int8_dice:.4f}",
            f"{a.verdict_agreement * 100:.2f} %",
            f"{a.max_abs_diff:.3f}",
            "yes" if targets.met_by(a) else "NO",
        )
    console = report_console()
    console.print(table)
    where = f"written to {out}" if out is not None else "best method; nothing written"
    console.print(f"* {where} (targets: {targets.describe()})")


@calibrate_app.command("int8")
def int8(
    *,
    model: Annotated[Path, typer.Option("--model", "-m", help="fp32 ONNX model with its card.")],
    data: LabelledDataset,
    split: Annotated[
        str, typer.Option(help="Split the calibration images are drawn from.")
    ] = "train",
    samples: Annotated[
        int, typer.Option(help="Calibration images, spread evenly over --split.")
    ] = 128,
    method: Annotated[
        MethodChoice,
        typer.Option(
            help="Activation range calibration: minmax, entropy, percentile, or all (compare "
            "them and keep the one closest to fp32)."
        ),
    ] = MethodChoice.minmax,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="INT8 model to write (default: <model stem>.int8.onnx beside it)."
        ),
    ] = None,
    eval_split: Annotated[
        str, typer.Option(help="Split on which int8 is compared with fp32.")
    ] = "val",
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Calibration file whose threshold section sets the verdicts' threshold and "
            "min area (default: the model card's)."
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="Engine backend running both models: ort or openvino.")
    ] = "ort",
    symmetric: Annotated[
        bool,
        typer.Option(help="Symmetric int8 activations (TensorRT) instead of uint8 (CPUs)."),
    ] = False,
    keep_float: Annotated[
        str,
        typer.Option(
            help="Convolutions left in float, comma-separated: first, last or node names "
            "('' for none). The input layer is the one int8 hurts most.",
        ),
    ] = "first",
    as_json: JsonTable = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing --out model (and its card).")
    ] = False,
    max_iou_delta: Annotated[
        float, typer.Option("--max-iou-delta", help="Target: largest |IoU change| accepted.")
    ] = IOU_TOLERANCE,
    min_agreement: Annotated[
        float,
        typer.Option("--min-agreement", help="Target: smallest share of same verdicts (0..1)."),
    ] = AGREEMENT_TARGET,
    keep_failed: Annotated[
        bool,
        typer.Option(
            "--keep-failed",
            help="Write the best model even when it misses the targets (still exit 1).",
        ),
    ] = False,
) -> None:
    """Quantise a model to INT8 (QDQ ONNX, per-channel weights) and check it against fp32.

    Calibrates activation ranges on --samples images of --split, then runs fp32 and int8 on
    --eval-split and reports pooled pixel IoU and Dice of both and the share of images
    with the same pass/fail verdict (threshold and min area of the card or --calibration).
    With --method all, every method is built and compared; the one within the IoU
    tolerance with the highest agreement is written.
    The card is written beside the INT8 model.
    """
    from defectd.calibration.file import load_calibration
    from defectd.calibration.int8 import (
        METHODS,
        CalibrationMethod,
        calibration_batches,
        compare_predictions,
        quantize_qdq,
    )
    from defectd.data.datasets import open_dataset
    from defectd.model.card import card_path, load_card
    from defectd.training.evaluate import open_model

    card = load_card(model)
    out = out or model.with_name(f"{model.stem}.int8.onnx")
    if out.resolve() == model.resolve():
        raise ConfigError(f"--out {out}: would overwrite the fp32 model")
    refuse_overwrite(out, force=force)
    if not (max_iou_delta >= 0 and 0 <= min_agreement <= 1):
        raise ConfigError("--max-iou-delta >= 0 and --min-agreement within [0, 1]")
    targets = Targets(max_iou_delta, min_agreement)
    threshold, min_area = card.threshold, card.min_area_px
    if calibration is not None:
        section = load_calibration(calibration).threshold
        if section is None:
            raise ConfigError(f"{calibration}: has no threshold section")
        threshold, min_area = section.pixel_threshold, section.min_area_px
    dataset = open_dataset(data)
    if len(dataset) == 0:
        raise ConfigError(f"{data}: the dataset has no images")
    dataset.samples(eval_split)  # an unknown split fails before any work
    floats = tuple(v.strip() for v in keep_float.split(",") if v.strip())
    batches = calibration_batches(dataset, split, card, samples=samples)
    methods: tuple[CalibrationMethod, ...] = (
        METHODS if method is MethodChoice.all else (method.value,)  # type: ignore[assignment]
    )

    fp32 = open_model(model, backend=backend, precision="fp32")
    try:
        reference = predict_split(dataset, eval_split, fp32, "fp32")
    finally:
        fp32.close()
    rows: list[Agreement] = []
    with tempfile.TemporaryDirectory(prefix="defectd-int8-") as tmp:
        built: dict[str, Path] = {}
        for m in methods:
            path = Path(tmp) / f"{m}.onnx"
            # ONNX Runtime's histogram calibrators print; stdout is for --json alone.
            with contextlib.redirect_stdout(sys.stderr):
                quantize_qdq(
                    model,
                    path,
                    batches,
                    method=m,
                    symmetric_activations=symmetric,
                    keep_float=floats,
                )
            built[m] = path
            opened = open_model(path, backend=backend)
            try:
                candidate = predict_split(dataset, eval_split, opened, f"int8 {m}")
            finally:
                opened.close()
            rows.append(
                compare_predictions(
                    reference,
                    candidate,
                    method=m,
                    split=eval_split,
                    threshold=threshold,
                    min_area_px=min_area,
                )
            )
        # IoU within tolerance first: a method that moves IoU buys its agreement elsewhere.
        best = max(
            rows,
            key=lambda a: (
                abs(a.iou_delta) <= targets.max_iou_delta,
                a.verdict_agreement,
                -abs(a.iou_delta),
            ),
        )
        meets = targets.met_by(best)
        written = meets or keep_failed
        if written:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built[best.method], out)
            shutil.copyfile(card_path(built[best.method]), card_path(out))
    (log.info if meets else log.warning)(
        "int8_calibrated",
        model=str(model),
        out=str(out),
        method=best.method,
        iou_delta=best.iou_delta,
        verdict_agreement=best.verdict_agreement,
        meets_targets=meets,
        written=written,
    )
    if as_json:
        payload: dict[str, Any] = {
            "out": str(out) if written else None,
            "card": str(card_path(out)) if written else None,
            "size_mb": round(out.stat().st_size / 1e6, 3) if written else None,
            "method": best.method,
            "calibration_split": split,
            "calibration_images": sum(b.shape[0] for b in batches),
            "keep_float": list(floats),
            "meets_targets": meets,
            "chosen": best.as_dict(),
            "methods": [a.as_dict() for a in rows],
        }
        typer.echo(json.dumps(payload))
    else:
        _print_table(rows, best.method, out if written else None, targets)
    if not meets:
        raise CalibrationError(
            f"int8 model misses its targets (best: {best.method}, dIoU {best.iou_delta:+.4f}, "
            f"verdicts agree {best.verdict_agreement * 100:.2f} %; targets "
            f"{targets.describe()}); "
            + (f"written to {out} (--keep-failed)" if written else "nothing written")
        )
