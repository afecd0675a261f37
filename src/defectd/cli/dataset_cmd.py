"""``defectd dataset import``: labelled data from folder pairs or COCO JSON into the manifest
layout, with a validation report; ``defectd dataset from-archive``: archived parts and their
reviewed labels into a training set merged with the original one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from defectd.cli.app import sub_app
from defectd.cli.console import counting_bar, report_console
from defectd.errors import ConfigError

dataset_app = sub_app("dataset", "Bring labelled data into the layout train/eval/calibrate read.")


@dataset_app.command("import")
def import_(
    *,
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder with images/ and masks/ (paired by file stem), or a COCO "
            "segmentation .json (polygons or RLE).",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write a new dataset here (images copied, masks as 0/255 PNG). Required for "
            "COCO; without it, folder pairs get only a manifest.csv beside images/ and masks/.",
        ),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="COCO: the images folder (default: images/ beside the JSON, else its folder)."
        ),
    ] = None,
    splits: Annotated[
        str, typer.Option(help="train,val,test fractions (stratified by defective/good).")
    ] = "0.7,0.15,0.15",
    seed: Annotated[int, typer.Option(help="Seed of the split assignment.")] = 0,
    missing_mask: Annotated[
        str,
        typer.Option(
            "--missing-mask",
            help="An image without a mask: skip (default) or good (import it as defect-free).",
        ),
    ] = "skip",
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing manifest.csv / fill a used --out.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Import labelled images and write manifest.csv, then report what was found.

    The report lists missing masks, image/mask size mismatches (skipped), empty masks
    (imported as defect-free), non-binary mask values (and how they are read), unreadable
    files and the split assignment. Exit 2 when nothing could be imported.
    """
    from defectd.data.importer import import_dataset, parse_splits

    if missing_mask not in ("skip", "good"):
        raise ConfigError(f"--missing-mask: choose skip or good, not {missing_mask!r}")
    report = import_dataset(
        source,
        out=out,
        images=images,
        splits=parse_splits(splits),
        seed=seed,
        missing_mask="good" if missing_mask == "good" else "skip",
        force=force,
    )
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
        return
    con = report_console()
    table = Table(title=f"{report.manifest}: {report.imported} samples", show_header=True)
    table.add_column("split")
    table.add_column("good", justify="right")
    table.add_column("defective", justify="right")
    for split in ("train", "val", "test"):
        counts = report.splits.get(split, {"good": 0, "defective": 0})
        table.add_row(split, str(counts["good"]), str(counts["defective"]))
    con.print(table)
    con.print("classes: " + ", ".join(f"{k} {v}" for k, v in sorted(report.classes.items())))
    problems = report.as_dict()["problems"]
    notes = {
        "missing_masks": "no mask (skipped)"
        if missing_mask == "skip"
        else "no mask (imported as good)",
        "size_mismatch": "mask size differs from its image (skipped)",
        "empty_masks": "empty mask (imported as defect-free)",
        "non_binary": "mask values other than 0 and one level",
        "unreadable": "unreadable (skipped)",
        "other": "other",
    }
    for key, lines in problems.items():
        _print_some(con, notes[key], lines)
    if not any(problems.values()):
        con.print("no problems found")


@dataset_app.command("from-archive")
def from_archive(
    *,
    archive: Annotated[
        Path,
        typer.Argument(
            help="The daemon's archive folder ([archive] dir: manifest.csv, images/, masks/, "
            "results/).",
            show_default=False,
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The new dataset folder.")],
    merge: Annotated[
        Path | None,
        typer.Option(
            "--merge", help="The original training set to merge in (files copied, splits kept)."
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Reviewed labels: a folder of mask PNGs named <stem>.png, <stem>_mask.png or "
            "<part_id>.png, or a COCO segmentation .json whose file_name is the archived image.",
        ),
    ] = None,
    unlabelled: Annotated[
        str,
        typer.Option(
            "--unlabelled",
            help="A fail/error part without a reviewed or true label: skip (default) or review "
            "(kept in split 'review', cls 'unlabelled', which training never reads).",
        ),
    ] = "skip",
    trust_passes: Annotated[
        bool,
        typer.Option(
            "--trust-passes/--no-trust-passes",
            help="Take parts the model passed as good when nobody labelled them.",
        ),
    ] = True,
    archive_split: Annotated[
        str,
        typer.Option(
            "--archive-split",
            help="Split of the archived parts: keep (the archive's) or train, val, test.",
        ),
    ] = "keep",
    force: Annotated[bool, typer.Option("--force", help="Fill a used --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Turn archived parts (with labels from a labelling tool) into a training set, merged
    with the original one.

    Each part's label: a reviewed one from --labels, else the archive's true mask (synthetic
    line, replay), else 'good' for a part the model passed; fail/error parts with only the
    model's own prediction are left out (or kept for review) and listed. The manifest gets
    provenance columns: source, source_dir, part_id, seq, camera, result_id, verdict,
    label_source, model_sha256.

    Next: defectd train --data OUT --init LIVE.pt ...
    """

    from defectd.data.from_archive import dataset_from_archive

    if unlabelled not in ("skip", "review"):
        raise ConfigError(f"--unlabelled: choose skip or review, not {unlabelled!r}")
    if archive_split not in ("keep", "train", "val", "test"):
        raise ConfigError(
            f"--archive-split: choose keep, train, val or test, not {archive_split!r}"
        )
    err = report_console(stderr=True)
    with counting_bar("from-archive", err, quiet=as_json) as bar:
        task = bar.add_task("parts", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = dataset_from_archive(
            archive,
            out=out,
            merge=merge,
            labels=labels,
            unlabelled="review" if unlabelled == "review" else "skip",
            trust_passes=trust_passes,
            archive_split=archive_split,  # type: ignore[arg-type]
            force=force,
            on_progress=on_progress,
        )
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
        return
    con = report_console()
    table = Table(title=f"{report.manifest}: {report.included + report.original} samples")
    table.add_column("split")
    table.add_column("good", justify="right")
    table.add_column("defective", justify="right")
    for split, counts in sorted(report.splits.items()):
        table.add_row(split, str(counts["good"]), str(counts["defective"]))
    con.print(table)
    labels_line = ", ".join(f"{k} {v}" for k, v in sorted(report.by_label.items()))
    con.print(
        f"archived parts: {report.archived}, included {report.included} ({labels_line}); "
        f"original samples merged: {report.original}",
        markup=False,
    )
    for title, lines in (
        (
            "unlabelled parts "
            + ("(left out)" if unlabelled == "skip" else "(kept in split 'review')"),
            report.unlabelled,
        ),
        ("labels that match no archived part", report.unmatched_labels),
        ("problems (parts skipped)", report.problems),
    ):
        _print_some(con, title, lines)


def _print_some(con: Console, title: str, lines: Sequence[str]) -> None:
    """``N title`` and the first ten of ``lines`` (``--json`` lists all); nothing when empty."""
    if not lines:
        return
    con.print(f"[bold]{len(lines)} {title}[/bold]")
    for line in lines[:10]:
        con.print(f"  {line}", markup=False)
    if len(lines) > 10:
        con.print(f"  ... and {len(lines) - 10} more (--json lists all)")
