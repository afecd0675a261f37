"""``defectd compare``: two models on one dataset split, part by part."""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer

from defectd.cli.app import app
from defectd.cli.console import report_console
from defectd.cli.options import DatasetIn, InferenceBatch, InferenceThreads, JsonTable
from defectd.errors import ConfigError


def _precision(model: Path, chosen: str | None) -> str | None:
    """The precision to open ``model`` at: ``chosen``, ``None`` for ``auto`` (the engine
    decides, as on a station), else the one its card declares (a .pt checkpoint: fp32)."""
    if chosen == "auto":
        return None
    if chosen is not None or model.suffix == ".pt" or not model.is_file():
        return chosen  # a missing file: opening it says so
    from defectd.model.card import load_card

    return load_card(model).precision


def _calibrated(path: Path | None) -> tuple[tuple[float, int, str] | None, str]:
    """A calibration file's threshold, min area and model sha256, and where they come from;
    ``ConfigError`` naming the file when it has no threshold section."""
    if path is None:
        return None, "card"
    from defectd.calibration.file import load_calibration

    section = load_calibration(path).threshold
    if section is None:
        raise ConfigError(f"{path}: has no threshold section")
    return (section.pixel_threshold, section.min_area_px, section.model_sha256), str(path)


@app.command("compare")
def compare_command(
    model_a: Annotated[
        Path, typer.Argument(help="Model A: an .onnx model (card beside it) or .pt.")
    ],
    model_b: Annotated[Path, typer.Argument(help="Model B, compared with A.")],
    *,
    data: DatasetIn,
    split: Annotated[str, typer.Option(help="Split to compare on: train, val or test.")] = "test",
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Calibration file whose threshold section sets both models' threshold and min "
            "area (default: each model's card)."
        ),
    ] = None,
    calibration_a: Annotated[
        Path | None, typer.Option("--calibration-a", help="Calibration file for model A only.")
    ] = None,
    calibration_b: Annotated[
        Path | None, typer.Option("--calibration-b", help="Calibration file for model B only.")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(help="Engine of both models: auto, ort, openvino, tensorrt; torch for .pt."),
    ] = "auto",
    precision_a: Annotated[
        str | None,
        typer.Option(
            "--precision-a",
            help="Precision of model A: fp32, bf16, fp16, int8, or auto (the engine's fastest "
            "validated precision, as a station runs it by default). Default: the precision its "
            "card declares, so an fp32 file runs in fp32.",
        ),
    ] = None,
    precision_b: Annotated[
        str | None, typer.Option("--precision-b", help="Precision of model B (as --precision-a).")
    ] = None,
    batch_size: InferenceBatch = 8,
    threads: InferenceThreads = None,
    gallery: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the disagreement gallery: a PNG per differing part (image | A | B) "
            "and index.html."
        ),
    ] = None,
    as_json: JsonTable = False,
) -> None:
    """Compare two models on a split: verdict agreement, pixel IoU between their masks,
    each model against the truth where masks exist, and the parts they disagree on.

    Each model runs as eval and the station run it: its card's fit policy, its threshold and
    min area (card, or --calibration / --calibration-a / --calibration-b); a part fails when
    a region of at least min area pixels is above the threshold (the station's default rule).
    Each runs at the precision its card declares unless --precision-a/-b say otherwise.
    """
    from defectd.data.datasets import open_dataset
    from defectd.training.compare import (
        compare_models,
        disagreement_panel,
        operating_point,
        write_index,
        write_png,
    )
    from defectd.training.evaluate import OpenedModel, open_model

    if calibration is not None and (calibration_a is not None or calibration_b is not None):
        raise ConfigError("--calibration sets both models: give it or --calibration-a/-b")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: must be positive")
    dataset = open_dataset(data)
    samples = dataset.samples(split)
    if not samples:
        raise ConfigError(f"--split {split!r}: no images in {data}")
    with ExitStack() as stack:

        def opened(model: Path, chosen: str | None) -> OpenedModel:
            found = open_model(
                model,
                backend=backend,
                precision=_precision(model, chosen),
                threads=threads,
                max_batch=batch_size,
            )
            stack.callback(found.close)
            return found

        a = opened(model_a, precision_a)
        b = opened(model_b, precision_b)
        point_a = operating_point(a.card, *_calibrated(calibration_a or calibration))
        point_b = operating_point(b.card, *_calibrated(calibration_b or calibration))
        for name, point in (("A", point_a), ("B", point_b)):
            if point.warning:
                print(f"warning: model {name}: {point.warning}", file=sys.stderr)
        rows: list[tuple[Any, str]] = []
        done = [0]
        step = max(1, len(samples) // 10)

        def on_part(part: Any, arrays: dict[str, Any]) -> None:
            done[0] += 1
            if done[0] % step == 0 or done[0] == len(samples):
                print(f"compare {split}: {done[0]}/{len(samples)}", file=sys.stderr, flush=True)
            if gallery is not None and not part.agree:
                name = f"{len(rows):04d}_{part.sample.stem}.png"
                write_png(gallery / name, disagreement_panel(part, arrays))
                rows.append((part, name))

        result = compare_models(
            dataset,
            samples,
            a,
            b,
            point_a=point_a,
            point_b=point_b,
            split=split,
            batch_size=batch_size,
            on_part=on_part,
        )

    summary = result.as_dict()
    out: dict[str, Any] = {
        "model_a": {
            "path": str(model_a),
            "name": a.card.name,
            "engine": a.engine,
            "sha256": a.card.sha256,
            "precision": a.card.precision,
        },
        "model_b": {
            "path": str(model_b),
            "name": b.card.name,
            "engine": b.engine,
            "sha256": b.card.sha256,
            "precision": b.card.precision,
        },
        "data": str(data),
        **summary,
        "disagreements": [
            {
                "stem": p.sample.stem,
                "cls": p.sample.cls,
                "truth_defect": p.truth_defect,
                "a": "fail" if p.fail_a else "pass",
                "b": "fail" if p.fail_b else "pass",
                "pixels_a": p.pixels_a,
                "pixels_b": p.pixels_b,
                "iou_ab": None if p.iou_ab is None else round(p.iou_ab, 6),
            }
            for p in result.disagreements
        ],
        "gallery": None,
    }
    if gallery is not None:
        index = gallery / "index.html"
        write_index(index, f"{model_a} vs {model_b} on {data.name}/{split}", summary, rows)
        out["gallery"] = str(index)
    if as_json:
        typer.echo(json.dumps(out))
        return
    console = report_console()
    console.print(
        f"[bold]{a.card.name}[/] ({a.engine}, threshold {point_a.threshold:g}, min area "
        f"{point_a.min_area_px} px) vs [bold]{b.card.name}[/] ({b.engine}, threshold "
        f"{point_b.threshold:g}, min area {point_b.min_area_px} px) on {data.name}/{split}"
    )
    v = summary["verdicts"]
    console.print(
        f"verdicts agree on {summary['agree']} of {summary['images']} images "
        f"({100 * summary['verdict_agreement']:.1f} %): both fail {v['both_fail']}, both pass "
        f"{v['both_pass']}, A only {v['a_fail_b_pass']}, B only {v['a_pass_b_fail']}"
    )
    console.print(
        f"pixel IoU between the two: {summary['pixel_iou_ab']} (mean per image "
        f"{summary['mean_image_iou_ab']})"
    )
    truth = summary["truth"]
    if truth["images"]:
        for name in ("a", "b"):
            t = truth[name]
            console.print(
                f"{name.upper()} vs truth ({truth['images']} labelled): tp {t['tp']} fp {t['fp']} "
                f"fn {t['fn']} tn {t['tn']}, escapes {t['escape_rate']}, false rejects "
                f"{t['false_reject_rate']}, pixel IoU {t['pixel_iou']}"
            )
    for d in out["disagreements"]:
        console.print(f"  differ: {d['stem']} ({d['cls']}): A {d['a']}, B {d['b']}")
    if out["gallery"]:
        console.print(f"gallery: {out['gallery']}")
