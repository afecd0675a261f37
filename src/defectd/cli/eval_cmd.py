"""``defectd eval``: metrics of a checkpoint or an ONNX model on a dataset split."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from defectd.cli.app import app
from defectd.cli.console import counting_bar, report_console
from defectd.cli.options import DatasetIn, InferenceBatch, InferenceThreads, JsonTable
from defectd.errors import ConfigError


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _print_auroc_costs(console: Any, costs: dict[str, list[dict[str, Any]]], score: str) -> None:
    """The images that cost the AUROC most: where to look first when it is lower than hoped."""
    from rich.table import Table

    rows = [("defective, ranked low", r) for r in costs.get("defective", [])]
    rows += [("good, ranked high", r) for r in costs.get("good", [])]
    if not rows:
        return
    table = Table(title=f"images that cost the AUROC most (score: {score})")
    for col in ("image", "class", "kind", "score", "pairs", "auroc loss"):
        table.add_column(col, justify="left" if col in ("image", "class", "kind") else "right")
    for kind, r in rows:
        table.add_row(
            r["stem"], r["cls"], kind, _fmt(r["score"]), f"{r['pairs']:g}", _fmt(r["auroc_loss"])
        )
    console.print(table)


_WHY = {
    "unseen": "unseen (under {unseen_below:g} inside the defect)",
    "below_threshold": "seen, below the threshold",
    "under_min_area": "above the threshold, under the min area",
    "below_class_point": "seen, under each class's point",
}


def _print_escapes(console: Any, escapes: dict[str, Any], count: int = 10) -> None:
    """The defective images that passed, and why: a threshold question or a map question."""
    from rich.table import Table

    if not escapes.get("count"):
        return
    reasons = ", ".join(
        f"{escapes[key]} {text.format(**escapes)}" for key, text in _WHY.items() if escapes[key]
    )
    table = Table(title=f"defective images passed: {escapes['count']} ({reasons})")
    for col in ("image", "class", "peak in defect", "peak in image", "why"):
        table.add_column(col, justify="left" if col in ("image", "class", "why") else "right")
    for r in escapes["images"][:count]:
        table.add_row(
            r["stem"],
            r["cls"],
            _fmt(r["peak_in_defect"]),
            _fmt(r["peak"]),
            _WHY[r["why"]].format(**escapes),
        )
    console.print(table)
    if escapes["count"] > count:
        console.print(f"... and {escapes['count'] - count} more (all of them in --json)")


def _class_table(title: str, per_class: dict[str, Any], cols: tuple[str, ...]) -> Any:
    """A rich table with a row per class of ``per_class`` and the columns ``cols`` of it."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("class")
    for col in cols:
        table.add_column(col, justify="right")
    for cls, row in per_class.items():
        table.add_row(cls, *(_fmt(row[c]) for c in cols))
    return table


def _print_classes(console: Any, classes: dict[str, Any]) -> None:
    """The pixel metrics per class of a multi-class model and its pixel confusion matrix."""
    from rich.table import Table

    table = _class_table(
        "pixels per class (each at its own threshold / min area)",
        classes["per_class"],
        ("images", "dice", "iou", "precision", "recall", "threshold", "min_area_px"),
    )
    table.add_row("mean", "", _fmt(classes["mean_dice"]), _fmt(classes["mean_iou"]))
    console.print(table)
    confusion = classes["confusion"]
    matrix = Table(title="pixel confusion (rows: truth, columns: prediction)")
    matrix.add_column("")
    for label in confusion["labels"]:
        matrix.add_column(label, justify="right")
    for label, row in zip(confusion["labels"], confusion["matrix"], strict=True):
        matrix.add_row(label, *(str(v) for v in row))
    console.print(matrix)
    console.print(f"mean IoU with background: {_fmt(classes['mean_iou_with_background'])}")


@app.command("eval")
def eval_command(
    *,
    model: Annotated[
        Path, typer.Option("--model", "-m", help="A .pt checkpoint or an .onnx model (with card).")
    ],
    data: DatasetIn,
    split: Annotated[
        str,
        typer.Option(
            help="Split to evaluate: train, val or test (several joined by +: train+val)."
        ),
    ] = "test",
    threshold: Annotated[
        float | None,
        typer.Option(help="Probability threshold (default: the card's, chosen on val)."),
    ] = None,
    min_area: Annotated[
        int | None,
        typer.Option("--min-area", help="Drop predicted blobs under N px (default: the card's)."),
    ] = None,
    image_score: Annotated[
        str,
        typer.Option(
            "--image-score",
            help="AUROC score per image: max (probability), area (predicted px) or decision "
            "(the highest threshold at which a region of at least the min area survives: "
            "the station's own decision variable).",
        ),
    ] = "max",
    backend: Annotated[
        str, typer.Option(help="Engine: auto, ort, openvino, tensorrt; torch for a .pt.")
    ] = "auto",
    precision: Annotated[
        str | None,
        typer.Option(help="fp32, bf16, fp16 or int8 where the engine runs it (default: card)."),
    ] = None,
    batch_size: InferenceBatch = 8,
    threads: InferenceThreads = None,
    overlays: Annotated[
        Path | None,
        typer.Option(help="Write PNG overlays of the worst and best cases into this folder."),
    ] = None,
    overlay_count: Annotated[
        int, typer.Option("--overlay-count", help="Worst and best cases to draw, each.")
    ] = 8,
    masks: Annotated[
        Path | None,
        typer.Option(
            "--masks",
            help="Write every predicted mask (PNG, native size, 255 = defect) into this folder.",
        ),
    ] = None,
    tolerance: Annotated[
        int | None,
        typer.Option(
            "--tolerance",
            help="Also report precision, recall and F1 tolerant to PX pixels of boundary offset.",
        ),
    ] = None,
    as_json: JsonTable = False,
) -> None:
    """Evaluate a model on a dataset split at native image resolution.

    Pixel Dice, IoU, precision and recall sum defect pixels over the whole split.

    Image level: AUROC of the max probability, and accuracy (defective = any pixel left
    after the threshold and --min-area). Mean IoU over defective images; a per-class table.

    --tolerance PX: a predicted pixel within PX of a true one counts as correct, a true pixel
    within PX of a predicted one as found (thin structures: cracks, scratches).

    Metrics without meaning on the split (AUROC without good images) are null in --json, with
    the reason under "undefined".

    Escapes (defective images passed) list the highest probability inside their defect and
    why they passed: unseen (no threshold catches it: the model must improve), below the
    threshold or under the min area (an operating-point question).

    A multi-class model adds per-class pixel Dice/IoU, each class at its own operating point,
    and the pixel confusion matrix; --masks then writes class indices (1..K, 0 = good).

    Overlays: image | truth (yellow) | prediction (green found, red false alarm, blue missed).
    """
    from rich.console import Console
    from rich.table import Table

    from defectd.data.datasets import open_dataset
    from defectd.data.metrics import IMAGE_SCORES
    from defectd.training.evaluate import (
        Prediction,
        evaluate,
        open_model,
        predict,
        seen_warning,
        trained_on,
    )
    from defectd.training.overlays import (
        overlay,
        pick_cases,
        predicted_mask,
        write_mask,
        write_overlay,
    )

    if image_score not in IMAGE_SCORES:
        raise ConfigError(f"--image-score {image_score!r}: choose {', '.join(IMAGE_SCORES)}")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ConfigError(f"--threshold {threshold}: expected a value in (0, 1)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be positive")
    if tolerance is not None and not 0 <= tolerance <= 64:
        raise ConfigError(f"--tolerance {tolerance}: expected pixels in 0..64")
    dataset = open_dataset(data)
    samples = dataset.samples(split)
    opened = open_model(
        model, backend=backend, precision=precision, threads=threads, max_batch=batch_size
    )
    console = Console(stderr=True)
    seen = trained_on(dataset, split, opened.card)
    if seen:
        typer.echo(seen_warning(seen, split, opened.card), err=True)
    try:
        with counting_bar(f"eval {split}", console, quiet=as_json) as bar:
            task = bar.add_task("eval", total=len(samples))
            mask_files: list[str] = []

            def on_image(pred: Prediction, _stats: object) -> None:
                if masks is not None:
                    card = opened.card
                    points = [
                        (
                            card.point(c).threshold if threshold is None else threshold,
                            card.point(c).min_area_px if min_area is None else min_area,
                        )
                        for c in card.classes
                    ]
                    path = masks / f"{pred.sample.stem}.png"
                    write_mask(path, predicted_mask(pred, *points[0], points=points))
                    mask_files.append(str(path))
                bar.advance(task)

            result = evaluate(
                dataset,
                split,
                opened.predictor,
                opened.card,
                threshold=threshold,
                min_area_px=min_area,
                score=image_score,
                batch_size=batch_size,
                tolerance_px=tolerance,
                on_image=on_image,
            )
        written: list[str] = []
        if overlays is not None:
            worst, best = pick_cases(result.stats, overlay_count)
            by_stem = {s.stem: s for s in samples}
            chosen = [by_stem[s] for s in worst + best]
            rep = result.report
            for i, pred in enumerate(predict(dataset, chosen, opened.predictor, opened.card)):
                kind = "worst" if i < len(worst) else "best"
                rank = i if i < len(worst) else i - len(worst)
                path = overlays / f"{kind}_{rank:02d}_{pred.sample.stem}.png"
                write_overlay(path, overlay(pred, rep.threshold, rep.min_area_px))
                written.append(str(path))
    finally:
        opened.close()

    out = {
        **result.as_dict(),
        "model": str(model),
        "model_name": opened.card.name,
        "engine": opened.engine,
        "data": str(data),
        "overlays": written,
        "masks": str(masks) if masks is not None else None,
        "mask_files": len(mask_files),
        "trained_on": seen,  # images of the split the model was trained on (not held out)
    }
    if as_json:
        typer.echo(json.dumps(out, allow_nan=False))
        return
    rich_out = report_console()
    table = Table(title=f"{opened.card.name} on {data.name}/{split} ({opened.engine})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("images", "defective", "dice", "iou", "precision", "recall", "mean_image_iou"):
        table.add_row(key, _fmt(out[key]))
    table.add_row("auroc (image, " + image_score + ")", _fmt(out["auroc"]))
    others = {k: v for k, v in out.get("auroc_by_score", {}).items() if k != image_score}
    if others:
        table.add_row(
            "auroc by other scores", ", ".join(f"{k} {_fmt(v)}" for k, v in others.items())
        )
    table.add_row("accuracy (image)", _fmt(out["accuracy"]))
    table.add_row("threshold / min area px", f"{out['threshold']:.2f} / {out['min_area_px']}")
    table.add_row("best threshold on this split", f"{out['best_threshold']:.2f}")
    if tolerance is not None:
        for key in ("precision", "recall", "f1"):
            table.add_row(f"{key} (±{tolerance} px)", _fmt(out[f"tolerant_{key}"]))
    rich_out.print(table)
    for key, why in out.get("undefined", {}).items():
        rich_out.print(f"{key}: {why}")
    if len(out["per_class"]) > 1:
        cols = ("images", "dice", "iou", "recall", "precision", "mean_image_iou", "accuracy")
        rich_out.print(_class_table("per class", out["per_class"], cols))
    if "classes" in out:
        _print_classes(rich_out, out["classes"])
    _print_auroc_costs(rich_out, out.get("auroc_costs", {}), image_score)
    _print_escapes(rich_out, out.get("escapes", {}))
    if written:
        rich_out.print(f"{len(written)} overlays in {overlays}")
    if masks is not None:
        rich_out.print(f"{len(mask_files)} predicted masks in {masks}")
