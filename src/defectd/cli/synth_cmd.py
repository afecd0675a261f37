"""``defectd synth``: write a seeded synthetic defect dataset in the manifest layout."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from defectd.cli.app import app
from defectd.cli.options import JsonSummary
from defectd.errors import ConfigError


def _parse_size(text: str) -> tuple[int, int]:
    """``256`` -> (256, 256); ``240x320`` -> (240, 320) as height x width."""
    parts = text.lower().split("x")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) not in (1, 2) or min(nums, default=0) < 8:
        raise ConfigError(f"--size: expected N or HxW with sides >= 8, got {text!r}")
    return (nums[0], nums[0]) if len(nums) == 1 else (nums[0], nums[1])


@app.command("synth")
def synth(
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (new or empty).")],
    count: Annotated[int, typer.Option(help="Number of parts to render.")] = 500,
    size: Annotated[
        str, typer.Option(help="Part size in px: N for square, or HxW (e.g. 240x320).")
    ] = "256",
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same files.")] = 0,
    defect_rate: Annotated[
        float, typer.Option("--defect-rate", help="Fraction of parts with defects (0..1).")
    ] = 0.3,
    surfaces: Annotated[
        str,
        typer.Option(help="Comma-separated surfaces: brushed, cast, woven, tiled (default all)."),
    ] = "",
    defect_kinds: Annotated[
        str,
        typer.Option(
            "--kinds",
            help="Comma-separated defect kinds: scratch, crack, pit, stain, chip (default all). "
            "A kind named twice is drawn twice as often (likewise --surfaces).",
        ),
    ] = "",
    colour: Annotated[
        bool, typer.Option("--colour", "--color", help="Write RGB images instead of grey.")
    ] = False,
    classes: Annotated[
        bool,
        typer.Option(
            "--classes",
            help="Also write class labels for a multi-class model: masks_cls/ (0 good, i = line "
            "i of classes.txt: scratch, crack, pit, stain, chip) and the manifest's mask_classes.",
        ),
    ] = False,
    textures: Annotated[
        int,
        typer.Option(
            help="Textures per surface. The default 16 is for training; 4 is the synthetic "
            "camera line's bank, so --textures 4 renders parts as the line (and `defectd demo`) "
            "shows them: a set to calibrate the line's operating point on.",
        ),
    ] = 16,
    faint: Annotated[
        float,
        typer.Option(
            help="Chance (0..1) that a scratch, crack, pit or stain is drawn from the faintest "
            "third of its kind's contrast range: a training set weighted to the faint defects a "
            "model misses. 0 (default) renders parts as the line does.",
        ),
    ] = 0.0,
    as_json: JsonSummary = False,
) -> None:
    """Render synthetic parts with exact defect masks, as a dataset for training.

    Surfaces: brushed, cast, woven, tiled. Defects: scratch, crack, pit, stain, chip.

    Writes images/, masks/ (0 good, 255 defect) and manifest.csv (70/15/15 train/val/test);
    with --classes also masks_cls/ and classes.txt, for `defectd train --classes auto`.
    """
    from defectd.data.datasets import open_dataset
    from defectd.data.synth import write_dataset

    height, width = _parse_size(size)
    names = [s.strip() for s in surfaces.split(",") if s.strip()] or None
    kind_names = [k.strip() for k in defect_kinds.split(",") if k.strip()] or None
    t0 = time.perf_counter()
    write_dataset(
        out,
        count,
        seed=seed,
        height=height,
        width=width,
        defect_rate=defect_rate,
        surfaces=names,
        channels=3 if colour else 1,
        progress=not as_json,
        class_masks=classes,
        textures=textures,
        kinds=kind_names,
        faint=faint,
    )
    seconds = time.perf_counter() - t0
    ds = open_dataset(out)
    counts = ds.counts()
    kinds: dict[str, int] = {}
    for s in ds.samples():
        if s.has_defect:
            kinds[s.cls] = kinds.get(s.cls, 0) + 1
    defective = sum(kinds.values())
    summary = {
        "out": str(out),
        "count": count,
        "defective": defective,
        "classes": dict(sorted(kinds.items())),
        "splits": {k: counts[k]["images"] for k in ("train", "val", "test") if k in counts},
        "height": height,
        "width": width,
        "channels": 3 if colour else 1,
        "seed": seed,
        "textures": textures,
        "faint": faint,
        "seconds": round(seconds, 3),
        "fingerprint": ds.fingerprint(),
    }
    if classes:
        summary["label_classes"] = list(ds.label_classes)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    split_txt = " / ".join(f"{k} {v}" for k, v in summary["splits"].items())  # type: ignore[attr-defined]
    kinds_txt = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "none"
    typer.echo(
        f"wrote {count} parts {width}x{height} to {out} in {seconds:.1f} s: "
        f"{defective} defective ({kinds_txt}); {split_txt}"
    )
