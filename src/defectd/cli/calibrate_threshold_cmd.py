"""``defectd calibrate threshold``: the operating point for a target escape or false-reject rate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from defectd.cli.calibrate_cmd import calibrate_app, command_line, progress_bar
from defectd.cli.console import report_console
from defectd.cli.guard import refuse_section_overwrite
from defectd.cli.options import CalibrationOut, JsonTable, LabelledDataset
from defectd.errors import ConfigError
from defectd.extras import require_extra
from defectd.log import get_logger

if TYPE_CHECKING:
    from defectd.calibration.file import ThresholdSection
    from defectd.calibration.threshold import OperatingPoint, Sweep
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


def run_sweep(
    dataset: Dataset,
    split: str,
    model: OpenedModel,
    *,
    thresholds: tuple[float, ...] | None = None,
    min_areas: tuple[int, ...] | None = None,
    min_scores: tuple[float, ...] | None = None,
    batch_size: int = 8,
) -> Sweep:
    """Run ``model`` once over ``split`` and summarise it for the operating-point sweep."""
    from defectd.calibration.threshold import (
        DEFAULT_MIN_AREAS,
        DEFAULT_MIN_SCORES,
        DEFAULT_THRESHOLDS,
        SweepCollector,
    )
    from defectd.training.evaluate import predict

    samples = dataset.samples(split)
    collector = SweepCollector(
        thresholds=thresholds or DEFAULT_THRESHOLDS,
        min_areas=min_areas or DEFAULT_MIN_AREAS,
        min_scores=min_scores or DEFAULT_MIN_SCORES,
    )
    with progress_bar(f"threshold: inferring {split}", len(samples)) as progress:
        for n, pred in enumerate(
            predict(dataset, samples, model.predictor, model.card, batch_size=batch_size), 1
        ):
            collector.add(pred.prob, pred.mask, stem=pred.sample.stem)
            progress(n, len(samples))
    return collector.result()


def verdicts_at(
    dataset: Dataset, splits: tuple[str, ...], model: OpenedModel, point: ThresholdSection
) -> dict[str, bool]:
    """``stem -> rejected`` for every image of ``splits`` at the calibration file's operating
    point, by the sweep's own rule: what calibration promises the station does per image."""
    rejected: dict[str, bool] = {}
    for split in splits:
        sweep = run_sweep(
            dataset, split, model,
            thresholds=(point.pixel_threshold,), min_areas=(point.min_area_px,),
            min_scores=(point.min_score,),
        )  # fmt: skip
        flags = sweep.rejected_at(point.pixel_threshold, point.min_area_px, point.min_score)
        rejected.update(zip(sweep.stems, (bool(f) for f in flags), strict=True))
    return rejected


def _rate_text(r: dict[str, Any]) -> str:
    return (
        f"{r['rate'] * 100:.2f} %  ({r['k']}/{r['n']}; "
        f"95% CI {r['low'] * 100:.2f}-{r['high'] * 100:.2f} %)"
    )


def _print_report(
    chosen: OperatingPoint, sweep: Sweep, evaluated: OperatingPoint | None, rows: list[str]
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
        ("images", f"{sweep.n_defective} defective, {sweep.n_good} good"),
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
    batch_size: Annotated[int, typer.Option(help="Images per inference batch.")] = 8,
    as_json: JsonTable = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a threshold section --out already has.")
    ] = False,
) -> None:
    """Choose the decision threshold and minimum defect area from a labelled split.

    Runs the model once over the split, sweeps pixel threshold x min area (x min score),
    and measures each point's escape and false-reject rates with Wilson 95% intervals.
    Picks the point meeting the target escape rate with the fewest false rejects (or the
    target false-reject rate with the fewest escapes). Writes the threshold section of --out,
    which the daemon's post-processing reads, and keeps the file's other sections.

    --report needs matplotlib (pip install defectd[plots]).
    """
    if report is not None:
        require_extra("plots", "calibrate threshold --report")
    from defectd.calibration.file import (
        RateEstimate,
        ThresholdSection,
        ThresholdTarget,
        now_iso,
        update_calibration,
    )
    from defectd.calibration.threshold import check_split, choose
    from defectd.data.datasets import open_dataset
    from defectd.model.card import file_sha256
    from defectd.training.evaluate import open_model

    if target_escape is not None and target_false_reject is not None:
        raise ConfigError("--target-escape and --target-false-reject: give only one")
    if target_false_reject is not None:
        kind: Any = "false_reject"
        rate = target_false_reject
    else:
        kind, rate = "escape", 0.01 if target_escape is None else target_escape
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"target rate {rate}: must be within [0, 1)")
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
    try:
        sweep = run_sweep(
            dataset, split, opened, thresholds=grid_t, min_areas=grid_a, min_scores=grid_s,
            batch_size=batch_size,
        )  # fmt: skip
        check_split(sweep, kind, split)
        chosen = choose(sweep.points(), kind, rate, bound=upper_bound)
        evaluated = None
        if eval_split is not None:
            ev = run_sweep(
                dataset,
                eval_split,
                opened,
                thresholds=(chosen.pixel_threshold,),
                min_areas=(chosen.min_area_px,),
                min_scores=(chosen.min_score,),
                batch_size=batch_size,
            )
            evaluated = ev.point(chosen.pixel_threshold, chosen.min_area_px, chosen.min_score)
    finally:
        opened.close()

    def estimate(r: dict[str, Any]) -> RateEstimate:
        return RateEstimate(rate=r["rate"], low=r["low"], high=r["high"], n=r["n"])

    c = chosen.as_dict()
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
    )
    update_calibration(out, threshold=section)
    plots: list[Path] = []
    if report is not None:
        from defectd.calibration.report import write_plots

        plots = write_plots(sweep, chosen, kind, rate, report, title=f"({split})")
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
            "images": {"defective": sweep.n_defective, "good": sweep.n_good},
            "eval": None if evaluated is None else {"split": eval_split, **evaluated.as_dict()},
            "best_pixel_dice": best_dice,
            "at_grid_edge": at_edge,
            "plots": [str(p) for p in plots],
            "model_sha256": section.model_sha256,
            "precision": section.precision,
            "engine": opened.engine,
            "data_hash": section.data_hash,
        }
        typer.echo(json.dumps(payload))
        return
    rows = [f"best pixel Dice {best_dice['dice']:.3f} at threshold {best_dice['threshold']:g}"]
    if at_edge:
        rows.append("chosen at the lowest swept threshold: try lower ones with --thresholds")
    rows += [f"plot {p}" for p in plots]
    rows.append(
        f"calibrated at {section.precision} ({opened.engine}): the daemon runs this model at "
        f"{section.precision} unless model.precision says otherwise"
    )
    rows.append(f"written to {out}")
    _print_report(chosen, sweep, evaluated, rows)
