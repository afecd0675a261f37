"""``defectd dataset import``: labelled data from folder pairs or COCO JSON into the manifest
layout, with a validation report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from defectd.cli.app import sub_app
from defectd.cli.console import report_console
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
        if lines:
            con.print(f"[bold]{len(lines)} {notes[key]}[/bold]")
            for line in lines[:10]:
                con.print(f"  {line}", markup=False)
            if len(lines) > 10:
                con.print(f"  ... and {len(lines) - 10} more (--json lists all)")
    if not any(problems.values()):
        con.print("no problems found")
