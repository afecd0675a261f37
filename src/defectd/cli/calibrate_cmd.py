"""``defectd calibrate ...``: fill the sections of a station camera's calibration file.

``calibrate_app`` is the sub-application; each calibration adds its own subcommand to it
(``@calibrate_app.command("name")``), in its own module registered in ``cli/__init__.py``.
The helpers below (image collection, progress, command line) serve all of them.
"""

from __future__ import annotations

import glob
import json
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from defectd.cli.app import sub_app
from defectd.cli.console import report_console
from defectd.cli.guard import refuse_section_overwrite
from defectd.cli.options import CalibrationOut, JsonTable
from defectd.errors import ConfigError, DataError

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from defectd.calibration.camera import CameraCalibration
    from defectd.calibration.file import FlatFieldSection

calibrate_app = sub_app(
    "calibrate", "Calibrate a station camera: geometry, flat-field, decision thresholds."
)

IMAGE_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".pgm", ".ppm")
GOOD_REPROJECTION_PX = 0.5  # above this, a calibration usually has a blurred or warped view


class PatternChoice(StrEnum):
    checkerboard = "checkerboard"
    circles = "circles"
    acircles = "acircles"


class FlatMethod(StrEnum):
    polynomial = "polynomial"
    gaussian = "gaussian"


# ----------------------------------------------------------------------------- helpers


def collect_images(spec: str) -> list[Path]:
    """Image files named by a folder (its images, not recursive) or a glob, sorted by name.

    Raises ``ConfigError`` naming the folder or pattern when nothing matches.
    """
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        where = f"folder {path}"
    elif path.is_file():
        found = [path]
        where = str(path)
    else:
        found = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
        where = f"pattern {spec!r}"
        if not found and not glob.has_magic(spec):
            raise ConfigError(f"{spec}: no such folder or file")
    if not found:
        raise ConfigError(f"no images in {where} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return sorted(found)


def read_image(path: Path, *, gray: bool = False) -> NDArray[Any]:
    """``(H, W)`` (uint8, or uint16 as stored) or ``(H, W, 3)`` RGB; ``gray`` gives 8-bit grey.

    Raises ``DataError`` naming the file when it cannot be decoded.
    """
    import cv2
    import numpy as np

    flags = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_UNCHANGED
    image = cv2.imread(str(path), flags)
    if image is None:
        raise DataError(f"{path}: cannot read as an image")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    elif image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.asarray(image)


def command_line() -> str:
    """The command as typed, for the ``command`` field of calibration sections."""
    return shlex.join(["defectd", *sys.argv[1:]])


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr; yields a ``progress(done, total)`` callback."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, of: int) -> None:
            bar.update(task, completed=done, total=of)

        yield update


def _gain_file_name(out: Path) -> str:
    return f"{out.stem}.flatfield.npy"


def estimate_and_save_flat(
    spec: str, out: Path, *, method: FlatMethod, degree: int, sigma_frac: float
) -> FlatFieldSection:
    """Estimate a flat-field from the images ``spec`` names and save its gain beside ``out``.

    Returns the section to write into ``out``; the gain is written first, so the
    calibration file never points at a gain image that is not there yet.
    """
    from defectd.calibration.file import now_iso
    from defectd.calibration.flatfield import estimate_flatfield

    paths = collect_images(spec)
    frames = [read_image(p) for p in paths]
    with progress_bar("flat-field: averaging reference frames", len(frames)) as progress:
        flat = estimate_flatfield(
            frames,
            method=method.value,
            degree=degree,
            sigma_frac=sigma_frac,
            names=[str(p) for p in paths],
            progress=progress,
        )
    section = flat.to_section(_gain_file_name(out), created=now_iso(), command=command_line())
    flat.save(section.gain_path(out))
    return section


def _flat_rows(section: FlatFieldSection) -> list[tuple[str, str]]:
    return [
        ("flat-field frames", str(section.frames)),
        ("reference mean", f"{section.reference_mean:.1f}"),
        ("uniformity before", f"{section.uniformity_before * 100:.2f} % (max-min)/mean"),
        ("uniformity after", f"{section.uniformity_after * 100:.2f} % (max-min)/mean"),
        ("gain range", f"{section.gain_min:.3f} .. {section.gain_max:.3f}"),
        ("gain file", section.gain_file),
    ]


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("quantity", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    report_console().print(table)


# ----------------------------------------------------------------------------- camera


@calibrate_app.command("camera")
def camera(
    *,
    images: Annotated[
        str,
        typer.Option(
            "--images", help="Folder of pattern views, or a glob (quote it), e.g. 'cal/*.png'."
        ),
    ],
    out: CalibrationOut,
    cols: Annotated[
        int, typer.Option(help="Inner corners (or circles) per row of the pattern.")
    ] = 9,
    rows: Annotated[
        int, typer.Option(help="Inner corners (or circles) per column of the pattern.")
    ] = 6,
    square_mm: Annotated[
        float,
        typer.Option(
            "--square-mm", "--spacing-mm", help="Square size, or circle centre spacing, in mm."
        ),
    ] = 5.0,
    pattern: Annotated[
        PatternChoice,
        typer.Option(help="checkerboard, circles, or acircles (OpenCV's asymmetric grid)."),
    ] = PatternChoice.checkerboard,
    plane: Annotated[
        str | None,
        typer.Option(
            help="File name of the view with the pattern lying on the inspection plane "
            "(mm per pixel is measured there); default: the first view by name."
        ),
    ] = None,
    skip_unfound: Annotated[
        bool,
        typer.Option(
            "--skip-unfound", help="Skip views where the pattern is not found instead of failing."
        ),
    ] = False,
    flat: Annotated[
        str | None,
        typer.Option(help="Also estimate a flat-field from blank reference frames here."),
    ] = None,
    as_json: JsonTable = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the sections --out already has.")
    ] = False,
) -> None:
    """Calibrate camera geometry from views of a checkerboard or circle grid.

    Finds the pattern in every view and solves the camera matrix and lens distortion.
    Measures mm per pixel on the plane view: the pattern lying where parts are inspected.
    Writes the camera section of --out and keeps the file's other sections.
    Take 10-20 views that tilt the board and reach the image corners, plus the plane view.
    """
    from defectd.calibration.camera import (
        CheckerboardPattern,
        CircleGridPattern,
        calibrate_camera,
    )
    from defectd.calibration.file import now_iso, update_calibration

    refuse_section_overwrite(
        out, ("camera", "flatfield") if flat is not None else ("camera",), force=force
    )
    chosen = (
        CheckerboardPattern(cols, rows, square_mm)
        if pattern is PatternChoice.checkerboard
        else CircleGridPattern(cols, rows, square_mm, asymmetric=pattern is PatternChoice.acircles)
    )
    paths = collect_images(images)
    plane_index = 0
    if plane is not None:
        matches = [i for i, p in enumerate(paths) if plane in (p.name, str(p))]
        if not matches:
            raise ConfigError(f"--plane {plane}: not among the {len(paths)} views in {images}")
        plane_index = matches[0]
    views = [read_image(p, gray=True) for p in paths]
    with progress_bar("camera: finding the pattern", len(views)) as progress:
        result = calibrate_camera(
            views,
            chosen,
            names=[str(p) for p in paths],
            plane_index=plane_index,
            skip_unfound=skip_unfound,
            progress=progress,
        )
    section = result.to_section(created=now_iso(), command=command_line())
    sections: dict[str, Any] = {"camera": section}
    flat_section = None
    if flat is not None:
        flat_section = estimate_and_save_flat(
            flat, out, method=FlatMethod.polynomial, degree=6, sigma_frac=0.1
        )
        sections["flatfield"] = flat_section
    update_calibration(out, **sections)

    if as_json:
        payload = {
            "calibration": str(out),
            "camera": section.model_dump(mode="json"),
            "per_view_error_px": dict(zip(result.views, result.per_view_error_px, strict=True)),
            "skipped": list(result.skipped),
            "flatfield": None if flat_section is None else flat_section.model_dump(mode="json"),
        }
        typer.echo(json.dumps(payload))
        return
    _print_table(f"camera calibration -> {out}", _camera_rows(result, flat_section))


def _camera_rows(
    result: CameraCalibration, flat_section: FlatFieldSection | None
) -> list[tuple[str, str]]:
    fx, fy = result.focal_px
    cx, cy = result.principal_point_px
    worst = max(zip(result.per_view_error_px, result.views, strict=True), default=(0.0, ""))
    dist = result.dist_coeffs
    names = ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6")
    quality = (
        "" if result.reprojection_error_px <= GOOD_REPROJECTION_PX else "  (high: check focus)"
    )
    rows = [
        ("views used", f"{len(result.views)} (skipped {len(result.skipped)})"),
        ("reprojection error", f"{result.reprojection_error_px:.3f} px RMS{quality}"),
        ("worst view", f"{worst[0]:.3f} px  {Path(worst[1]).name}"),
        ("mm per pixel", f"{result.mm_per_px:.5f} mm/px  ({1 / result.mm_per_px:.2f} px/mm)"),
        ("plane view", f"{Path(result.plane_image).name}, tilt {result.plane_tilt_deg:.1f} deg"),
        ("focal length", f"fx {fx:.1f}  fy {fy:.1f} px"),
        ("principal point", f"cx {cx:.1f}  cy {cy:.1f} px"),
        (
            "distortion",
            " ".join(f"{n} {v:+.4f}" for n, v in zip(names, dist, strict=False)),
        ),
        ("image size", f"{result.image_size[0]} x {result.image_size[1]}"),
    ]
    if flat_section is not None:
        rows += _flat_rows(flat_section)
    return rows


# ----------------------------------------------------------------------------- flat-field


@calibrate_app.command("flatfield")
def flatfield(
    *,
    images: Annotated[
        str, typer.Option("--images", help="Folder (or glob) of frames of a blank reference.")
    ],
    out: CalibrationOut,
    method: Annotated[
        FlatMethod,
        typer.Option(
            help="polynomial (smooth shading, e.g. vignetting) or gaussian (also follows "
            "uneven lighting on a scale of --sigma-frac)."
        ),
    ] = FlatMethod.polynomial,
    degree: Annotated[int, typer.Option(help="Degree of the 2-D shading polynomial.")] = 6,
    sigma_frac: Annotated[
        float,
        typer.Option(help="gaussian method: blur sigma as a fraction of the short image side."),
    ] = 0.1,
    as_json: JsonTable = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a flatfield section --out already has.")
    ] = False,
) -> None:
    """Estimate a flat-field gain from frames of a blank reference under the station light.

    Averages the frames and smooths them into a shading field; gain = mean / field.
    Stores the gain as float32 beside --out (NAME.flatfield.npy).
    Writes the flatfield section of --out and keeps the file's other sections.
    """
    from defectd.calibration.file import update_calibration

    refuse_section_overwrite(out, ("flatfield",), force=force)
    section = estimate_and_save_flat(
        images, out, method=method, degree=degree, sigma_frac=sigma_frac
    )
    update_calibration(out, flatfield=section)
    if as_json:
        typer.echo(
            json.dumps({"calibration": str(out), "flatfield": section.model_dump(mode="json")})
        )
        return
    _print_table(f"flat-field -> {out}", _flat_rows(section))
