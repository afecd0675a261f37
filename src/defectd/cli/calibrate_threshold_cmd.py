"""``defectd calibrate threshold``: the operating point for a target escape or false-reject rate."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from numpy.typing import NDArray
from rich.table import Table

from defectd.cli.calibrate_cmd import calibrate_app, command_line, progress_bar
from defectd.cli.console import report_console
from defectd.cli.guard import refuse_section_overwrite
from defectd.cli.options import CalibrationOut, InferenceBatch, JsonTable, LabelledDataset
from defectd.errors import ConfigError
from defectd.extras import require_extra
from defectd.log import get_logger

if TYPE_CHECKING:
    from defectd.calibration.file import ThresholdSection
    from defectd.calibration.threshold import OperatingPoint, Rate, Sweep, TilePlan
    from defectd.data.datasets import Dataset
    from defectd.training.evaluate import OpenedModel

log = get_logger(__name__)


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(sorted(float(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated numbers") from None


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(sorted(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated integers") from None


@dataclass
class SweepSet:
    """The sweeps of one split: ``sweeps["defect"]`` for a one-class model, one per class for
    a multi-class model (all over the same entries, in order); ``defective`` ``(N,)``: each
    entry holds any defect. ``negatives``: ``parts`` (good images) or ``tiles`` (defect-free
    tiles of defective images, ``tiles`` of them from ``tile_images`` images, see ``note``)."""

    sweeps: dict[str, Sweep]
    defective: NDArray[np.bool_]
    negatives: str = "parts"
    tiles: int = 0
    tile_images: int = 0
    note: str = ""

    def rejected_at(self, points: dict[str, tuple[float, int, float]]) -> NDArray[np.bool_]:
        """``(N,)``: each entry rejected when any class's sweep rejects it at that class's
        ``(threshold, min area, min score)`` -- the daemon's any-defect verdict."""
        out = np.zeros(self.defective.shape, bool)
        for name, (t, a, sc) in points.items():
            out |= self.sweeps[name].rejected_at(t, a, sc)
        return out

    def combined(self, points: dict[str, tuple[float, int, float]]) -> tuple[Rate, Rate]:
        """Escape and false-reject rates of the part (or tile) verdict at per-class points."""
        from defectd.calibration.threshold import Rate

        rej = self.rejected_at(points)
        bad, good = self.defective, ~self.defective
        return Rate(int((~rej[bad]).sum()), int(bad.sum())), Rate(
            int(rej[good].sum()), int(good.sum())
        )


def run_sweeps(
    dataset: Dataset,
    split: str,
    model: OpenedModel,
    *,
    thresholds: tuple[float, ...] | None = None,
    min_areas: tuple[int, ...] | None = None,
    min_scores: tuple[float, ...] | None = None,
    batch_size: int = 8,
    negatives: str = "auto",
    tiles: TilePlan | None = None,
) -> SweepSet:
    """Run ``model`` once over ``split`` and summarise it for the operating-point sweep(s).

    ``negatives``: ``parts`` (good images), ``tiles`` (defect-free tiles of defective images,
    cut by ``tiles``), or ``auto`` (tiles when the split has no good image). A multi-class
    model gets one sweep per class: the class's channel on the parts holding that class,
    against the negatives; parts holding only other classes are left out of its rates.
    """
    from defectd.calibration.threshold import (
        DEFAULT_MIN_AREAS,
        DEFAULT_MIN_SCORES,
        DEFAULT_THRESHOLDS,
        SweepCollector,
        TilePlan,
    )
    from defectd.training.evaluate import predict

    samples = dataset.samples(split)
    if negatives not in ("auto", "parts", "tiles"):
        raise ConfigError(f"--negatives {negatives!r}: choose auto, parts or tiles")
    use_tiles = negatives == "tiles" or (negatives == "auto" and all(s.has_defect for s in samples))
    plan = tiles or TilePlan()
    names = model.card.classes
    collectors = {
        name: SweepCollector(
            thresholds=thresholds or DEFAULT_THRESHOLDS,
            min_areas=min_areas or DEFAULT_MIN_AREAS,
            min_scores=min_scores or DEFAULT_MIN_SCORES,
        )
        for name in names
    }
    defective: list[bool] = []
    n_tiles = tile_images = 0
    with progress_bar(f"threshold: inferring {split}", len(samples)) as progress:
        for n, pred in enumerate(
            predict(dataset, samples, model.predictor, model.card, batch_size=batch_size), 1
        ):
            stem, any_defect = pred.sample.stem, bool(pred.mask.any())
            if use_tiles and not any_defect:
                progress(n, len(samples))
                continue  # tiles stand for the good parts: one kind of negative at a time
            defective.append(any_defect)
            for k, collector in enumerate(collectors.values()):
                if pred.probs is None:
                    collector.add(pred.prob, pred.mask, stem=stem)
                    continue
                assert pred.masks is not None
                holds = bool(pred.masks[k].any())
                collector.add(
                    pred.probs[k], pred.masks[k], stem=stem, ignore=any_defect and not holds
                )
            if use_tiles:
                found = plan.tiles(pred.mask)
                tile_images += bool(found)
                for y, x, size in found:
                    n_tiles += 1
                    defective.append(False)
                    empty = np.zeros((size, size), np.uint8)
                    for k, collector in enumerate(collectors.values()):
                        prob = pred.prob if pred.probs is None else pred.probs[k]
                        crop = np.ascontiguousarray(prob[y : y + size, x : x + size])
                        collector.add(crop, empty, stem=f"{stem}@{y},{x}")
            progress(n, len(samples))
    note = ""
    if use_tiles:
        note = (
            f"{plan.describe()}: {n_tiles} tiles from {tile_images} of "
            f"{sum(s.has_defect for s in samples)} defective images of split {split!r}"
            + ("" if negatives == "tiles" else " (the split has no good image)")
        )
        log.info("threshold_negatives_from_tiles", tiles=n_tiles, images=tile_images, note=note)
    return SweepSet(
        {name: c.result() for name, c in collectors.items()},
        np.asarray(defective, bool),
        "tiles" if use_tiles else "parts",
        n_tiles,
        tile_images,
        note,
    )


def verdicts_at(
    dataset: Dataset, splits: tuple[str, ...], model: OpenedModel, point: ThresholdSection
) -> dict[str, bool]:
    """``stem -> rejected`` for every image of ``splits`` at the calibration file's operating
    point (per class for a multi-class model: rejected when any class's channel holds a region
    at its point), by the sweep's own rule: what calibration promises the station does."""
    rejected: dict[str, bool] = {}
    points = _points_of(point, model.card.classes)
    for split in splits:
        found = run_sweeps(
            dataset, split, model,
            thresholds=tuple(sorted({p[0] for p in points.values()})),
            min_areas=tuple(sorted({p[1] for p in points.values()})),
            min_scores=tuple(sorted({p[2] for p in points.values()})),
            negatives="parts",
        )  # fmt: skip
        stems = found.sweeps[model.card.classes[0]].stems
        flags = found.rejected_at(points)
        rejected.update(zip(stems, (bool(f) for f in flags), strict=True))
    return rejected


def _points_of(
    section: ThresholdSection, classes: tuple[str, ...]
) -> dict[str, tuple[float, int, float]]:
    """``class -> (threshold, min area, min score)`` of a calibration's threshold section."""
    if section.classes:
        return {
            c: (p.pixel_threshold, p.min_area_px, section.min_score)
            for c, p in section.classes.items()
        }
    return {classes[0]: (section.pixel_threshold, section.min_area_px, section.min_score)}


def _rate_text(r: dict[str, Any]) -> str:
    return (
        f"{r['rate'] * 100:.2f} %  ({r['k']}/{r['n']}; "
        f"95% CI {r['low'] * 100:.2f}-{r['high'] * 100:.2f} %)"
    )


def _print_report(
    chosen: OperatingPoint, negatives: str, evaluated: OperatingPoint | None, rows: list[str]
) -> None:
    table = Table(title="threshold calibration", show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    c = chosen.as_dict()
    for key, value in [
        ("pixel threshold", f"{chosen.pixel_threshold:g}"),
        ("min area", f"{chosen.min_area_px} px"),
        ("min score", f"{chosen.min_score:g}"),
        ("escape rate", _rate_text(c["escape"])),
        ("false-reject rate", _rate_text(c["false_reject"])),
        (
            "images",
            f"{chosen.escape.n} defective, {chosen.false_reject.n} "
            + ("defect-free tiles" if negatives == "tiles" else "good"),
        ),
    ]:
        table.add_row(key, value)
    if evaluated is not None:
        e = evaluated.as_dict()
        table.add_row("escape rate (eval split)", _rate_text(e["escape"]))
        table.add_row("false-reject rate (eval split)", _rate_text(e["false_reject"]))
    for line in rows:
        table.add_row("", line)
    report_console().print(table)


@calibrate_app.command("threshold")
def threshold(
    *,
    model: Annotated[
        Path, typer.Option("--model", "-m", help="ONNX model (with its card) or .pt checkpoint.")
    ],
    data: LabelledDataset,
    out: CalibrationOut,
    split: Annotated[str, typer.Option(help="Split the operating point is chosen on.")] = "val",
    target_escape: Annotated[
        float | None,
        typer.Option(
            "--target-escape",
            help="Highest escape rate (defective parts passed / defective parts) to accept; "
            "the point with the fewest false rejects is chosen. Default 0.01.",
        ),
    ] = None,
    target_false_reject: Annotated[
        float | None,
        typer.Option(
            "--target-false-reject",
            help="Highest false-reject rate (good parts rejected / good parts) to accept; "
            "the point with the fewest escapes is chosen.",
        ),
    ] = None,
    upper_bound: Annotated[
        bool,
        typer.Option(
            "--upper-bound",
            help="Hold the target on the upper end of the 95% interval, not the measured rate.",
        ),
    ] = False,
    eval_split: Annotated[
        str | None,
        typer.Option(help="Also measure the chosen point's rates on this split (e.g. test)."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Folder for the PNG plots (precision-recall, ...); needs [plots]."),
    ] = None,
    thresholds: Annotated[
        str | None, typer.Option(help="Pixel thresholds to sweep, comma-separated.")
    ] = None,
    min_areas: Annotated[
        str | None, typer.Option(help="Minimum defect areas (px) to sweep, comma-separated.")
    ] = None,
    min_scores: Annotated[
        str | None,
        typer.Option(
            help="Minimum defect peak probabilities to sweep, comma-separated (default 0: "
            "the daemon's area rule does not use a score)."
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="Engine backend: auto, ort, openvino.")] = "auto",
    batch_size: InferenceBatch = 8,
    as_json: JsonTable = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a threshold section --out already has.")
    ] = False,
    negatives: Annotated[
        str,
        typer.Option(
            help="Good examples: parts (defect-free images), tiles (defect-free tiles of "
            "defective images), or auto: tiles when the split has no defect-free image."
        ),
    ] = "auto",
    negative_tile: Annotated[
        int,
        typer.Option(
            "--negative-tile", help="Tile side in px (0: a quarter of the image's shorter side)."
        ),
    ] = 0,
    negative_margin: Annotated[
        int,
        typer.Option(
            "--negative-margin", help="Least distance in px of a tile from a labelled defect."
        ),
    ] = 16,
) -> None:
    """Choose the decision threshold and minimum defect area from a labelled split.

    Runs the model once over the split, sweeps pixel threshold x min area (x min score),
    and measures each point's escape and false-reject rates with Wilson 95% intervals.
    Picks the point meeting the target escape rate with the fewest false rejects (or the
    target false-reject rate with the fewest escapes). Writes the threshold section of --out,
    which the daemon's post-processing reads, and keeps the file's other sections.

    A multi-class model gets one point per class, each chosen for the target on its own
    channel (parts holding the class against the negatives); the part is rejected when any
    class's channel holds a region, as the daemon decides.

    Without defect-free images (all-defective sets) the negatives are tiles of the defective
    images far from any labelled defect; the output and the file say so.

    --report needs matplotlib (pip install defectd[plots]).
    """
    if report is not None:
        require_extra("plots", "calibrate threshold --report")
    from defectd.calibration.file import (
        ClassThreshold,
        RateEstimate,
        ThresholdSection,
        ThresholdTarget,
        now_iso,
        update_calibration,
    )
    from defectd.calibration.threshold import OperatingPoint as OperatingPointCls
    from defectd.calibration.threshold import TilePlan, check_split, choose
    from defectd.data.datasets import open_dataset
    from defectd.data.metrics import unseen_cutoff
    from defectd.model.card import file_sha256
    from defectd.training.evaluate import open_model, seen_warning, trained_on

    if target_escape is not None and target_false_reject is not None:
        raise ConfigError("--target-escape and --target-false-reject: give only one")
    if target_false_reject is not None:
        kind: Any = "false_reject"
        rate = target_false_reject
    else:
        kind, rate = "escape", 0.01 if target_escape is None else target_escape
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"target rate {rate}: must be within [0, 1)")
    if negative_tile < 0 or negative_margin < 0:
        raise ConfigError("--negative-tile and --negative-margin: must not be negative")
    refuse_section_overwrite(out, ("threshold",), force=force)
    grid_t = _floats(thresholds, "--thresholds") if thresholds else None
    grid_a = _ints(min_areas, "--min-areas") if min_areas else None
    grid_s = _floats(min_scores, "--min-scores") if min_scores else None

    dataset = open_dataset(data)
    if len(dataset) == 0:
        raise ConfigError(f"{data}: the dataset has no images")
    if eval_split is not None:
        dataset.samples(eval_split)  # fail early on an unknown split
    opened = open_model(model, backend=backend)
    classes = opened.card.classes
    seen = {
        name: trained_on(dataset, name, opened.card)
        for name in (split, eval_split)
        if name is not None
    }
    for name, count in seen.items():
        if count:
            typer.echo(seen_warning(count, name, opened.card), err=True)
    try:
        found = run_sweeps(
            dataset, split, opened, thresholds=grid_t, min_areas=grid_a, min_scores=grid_s,
            batch_size=batch_size, negatives=negatives,
            tiles=TilePlan(negative_tile, negative_margin),
        )  # fmt: skip
        per_class: dict[str, OperatingPoint] = {}
        for name, class_sweep in found.sweeps.items():
            where = split if len(classes) == 1 else f"{split} (class {name})"
            check_split(class_sweep, kind, where)
            per_class[name] = choose(class_sweep.points(), kind, rate, bound=upper_bound)
        points = {n: (c.pixel_threshold, c.min_area_px, c.min_score) for n, c in per_class.items()}
        sweep = found.sweeps[classes[0]]
        if len(classes) == 1:
            chosen = per_class[classes[0]]
        else:
            escape, false_reject = found.combined(points)
            chosen = OperatingPointCls(
                min(p[0] for p in points.values()),
                min(p[1] for p in points.values()),
                0.0,
                escape,
                false_reject,
            )
        unseen = {n: w.unseen_escapes(*points[n]) for n, w in found.sweeps.items()}
        unseen_eval: dict[str, int] | None = None
        evaluated = None
        if eval_split is not None:
            ev = run_sweeps(
                dataset, eval_split, opened,
                thresholds=tuple(sorted({p[0] for p in points.values()})),
                min_areas=tuple(sorted({p[1] for p in points.values()})),
                min_scores=tuple(sorted({p[2] for p in points.values()})),
                batch_size=batch_size, negatives=negatives,
                tiles=TilePlan(negative_tile, negative_margin),
            )  # fmt: skip
            ev_escape, ev_false = ev.combined(points)
            unseen_eval = {n: w.unseen_escapes(*points[n]) for n, w in ev.sweeps.items()}
            evaluated = OperatingPointCls(
                chosen.pixel_threshold, chosen.min_area_px, chosen.min_score, ev_escape, ev_false
            )
    finally:
        opened.close()

    def estimate(r: dict[str, Any]) -> RateEstimate:
        return RateEstimate(rate=r["rate"], low=r["low"], high=r["high"], n=r["n"])

    c = chosen.as_dict()
    class_sections = {}
    if len(classes) > 1:
        for name, point in per_class.items():
            d = point.as_dict()
            class_sections[name] = ClassThreshold(
                pixel_threshold=point.pixel_threshold,
                min_area_px=point.min_area_px,
                escape=estimate(d["escape"]),
                false_reject=estimate(d["false_reject"]),
            )
    section = ThresholdSection(
        pixel_threshold=chosen.pixel_threshold,
        min_area_px=chosen.min_area_px,
        min_score=chosen.min_score,
        target=ThresholdTarget(**{f"{kind}_rate": rate}),
        model_sha256=(opened.card.sha256 if model.suffix == ".onnx" else "") or file_sha256(model),
        precision=opened.precision,
        backend=opened.engine.split("-")[0],
        data_hash=dataset.fingerprint(split),
        split=split,
        escape=estimate(c["escape"]),
        false_reject=estimate(c["false_reject"]),
        created=now_iso(),
        command=command_line(),
        classes=class_sections,
        negatives="tiles" if found.negatives == "tiles" else "parts",
        negatives_note=found.note,
    )
    update_calibration(out, threshold=section)
    plots: list[Path] = []
    if report is not None:
        from defectd.calibration.report import write_plots

        plots = write_plots(sweep, per_class[classes[0]], kind, rate, report, title=f"({split})")
    log.info(
        "threshold_calibrated",
        calibration=str(out),
        threshold=chosen.pixel_threshold,
        min_area_px=chosen.min_area_px,
        precision=section.precision,
        engine=opened.engine,
        escape=chosen.escape.rate,
        false_reject=chosen.false_reject.rate,
    )
    best_dice = max(sweep.pixel_metrics(), key=lambda r: r["dice"])
    best_by_class = {
        n: max(w.pixel_metrics(), key=lambda r: r["dice"]) for n, w in found.sweeps.items()
    }
    # A choice at the grid's lowest threshold may want a lower one: the sweep could not look.
    at_edge = chosen.pixel_threshold <= float(sweep.thresholds[0])
    if at_edge:
        log.warning("threshold_at_grid_edge", threshold=chosen.pixel_threshold)
    if as_json:
        payload = {
            "calibration": str(out),
            "split": split,
            "target": {"kind": kind, "rate": rate, "upper_bound": upper_bound},
            "chosen": c,
            "images": {"defective": chosen.escape.n, "good": chosen.false_reject.n},
            "eval": None if evaluated is None else {"split": eval_split, **evaluated.as_dict()},
            # One-class: {threshold, precision, recall, iou, dice}; multi-class: one per class.
            "best_pixel_dice": best_dice if len(classes) == 1 else best_by_class,
            "at_grid_edge": at_edge,
            "plots": [str(p) for p in plots],
            "model_sha256": section.model_sha256,
            "precision": section.precision,
            "engine": opened.engine,
            "data_hash": section.data_hash,
            "trained_on": seen,  # images of each split the model was trained on
            # Escapes at the chosen point(s) that the model did not see at all, per class.
            "escapes_unseen": {
                "unseen_below": {n: unseen_cutoff(p[0]) for n, p in points.items()},
                "split": unseen,
                "eval": unseen_eval,
            },
            "negatives": {
                "kind": found.negatives,
                "tiles": found.tiles,
                "tile_images": found.tile_images,
                "note": found.note,
            },
        }
        if len(classes) > 1:
            payload["classes"] = {n: p.as_dict() for n, p in per_class.items()}
        typer.echo(json.dumps(payload))
        return
    rows = [
        f"best pixel Dice{'' if len(classes) == 1 else f' ({name})'} {b['dice']:.3f} at "
        f"threshold {b['threshold']:g}"
        for name, b in best_by_class.items()
    ]
    if found.note:
        rows.append(f"negatives: {found.note}")
    if len(classes) > 1:
        for name, point in per_class.items():
            d = point.as_dict()
            rows.append(
                f"class {name}: threshold {point.pixel_threshold:g}, min area "
                f"{point.min_area_px} px, escape {_rate_text(d['escape'])}, false reject "
                f"{_rate_text(d['false_reject'])}"
            )
    for name, count in unseen.items():
        if not count:
            continue
        where = "" if len(classes) == 1 else f" of class {name}"
        rows.append(
            f"{count} of the {per_class[name].escape.k} escapes{where} are unseen (under "
            f"{unseen_cutoff(points[name][0]):g} everywhere inside the defect): no sensible "
            "operating point catches them"
        )
    if at_edge:
        rows.append("chosen at the lowest swept threshold: try lower ones with --thresholds")
    rows += [f"plot {p}" for p in plots]
    rows.append(
        f"calibrated at {section.precision} ({opened.engine}): the daemon runs this model at "
        f"{section.precision} unless model.precision says otherwise"
    )
    rows.append(f"written to {out}")
    _print_report(chosen, found.negatives, evaluated, rows)
