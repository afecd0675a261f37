"""The calibration file: one JSON file per station camera, loaded at start and on SIGHUP.

A calibration file holds independent, optional sections that different commands fill in:

- ``threshold`` -- decision threshold, minimum area and score, with the rates they achieved
  (``defectd calibrate threshold``);
- ``camera`` -- camera matrix, distortion and the mm-per-pixel scale at the inspection plane
  (``defectd calibrate camera``);
- ``flatfield`` -- a float32 gain image stored as ``.npy`` beside the file
  (``defectd calibrate flatfield``).

Each command replaces only its own section (:func:`update_calibration`), so running one
calibration never clobbers another. Writes are atomic (temporary file + ``os.replace``) and
serialised by an advisory lock, so a daemon reloading on SIGHUP never reads half a file.

To add a section: define a frozen model for it and add one optional field to
:class:`Calibration`; ``update_calibration(path, new_section=...)`` then works unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from defectd.errors import ConfigError

CALIBRATION_SCHEMA_VERSION = 1

# Distortion vector lengths OpenCV accepts: (k1, k2, p1, p2[, k3[, k4, k5, k6[, s1..s4[, tx, ty]]]])
_DIST_LENGTHS = (4, 5, 8, 12, 14)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
ImageSize = tuple[PositiveInt, PositiveInt]  # (width, height) in pixels, OpenCV order


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# ----------------------------------------------------------------------------- threshold


class RateEstimate(_Frozen):
    """A measured rate with its confidence interval: ``low <= rate <= high``, over ``n`` parts."""

    rate: Probability
    low: Probability
    high: Probability
    n: Annotated[int, Field(ge=0)]

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.low <= self.rate <= self.high:
            raise ValueError(
                f"expected low <= rate <= high, got {self.low}, {self.rate}, {self.high}"
            )
        return self


class ThresholdTarget(_Frozen):
    """What the operating point was chosen for: exactly one of the two rates."""

    escape_rate: Probability | None = None  # defective parts passed / defective parts
    false_reject_rate: Probability | None = None  # good parts rejected / good parts

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.escape_rate is None) == (self.false_reject_rate is None):
            raise ValueError("set exactly one of escape_rate and false_reject_rate")
        return self


class ClassThreshold(_Frozen):
    """The operating point of one class of a multi-class model, with its evidence: escape
    counts parts holding the class whose class channel found nothing, false reject the
    negatives (parts or defect-free tiles, see ``negatives``) where it found something."""

    pixel_threshold: Annotated[float, Field(gt=0.0, lt=1.0)]
    min_area_px: Annotated[int, Field(ge=0)] = 0
    escape: RateEstimate | None = None
    false_reject: RateEstimate | None = None


class ThresholdSection(_Frozen):
    """Decision parameters chosen from a labelled set, with the evidence behind them.

    ``classes``: a multi-class model's point per class (the daemon then uses these, one per
    channel; ``pixel_threshold``/``min_area_px`` are their minimum, for readers of one
    point). ``negatives``: where the good examples came from -- ``parts`` (defect-free images)
    or ``tiles`` (defect-free regions of defective images, for sets without good parts), with
    ``negatives_note`` saying how they were taken.
    """

    pixel_threshold: Annotated[float, Field(gt=0.0, lt=1.0)]
    min_area_px: Annotated[int, Field(ge=0)] = 0
    min_score: Probability = 0.0
    target: ThresholdTarget
    model_sha256: str = ""
    # The precision and backend family the model ran at while the threshold was chosen
    # (``""``: not recorded, a file from before they were; it ran at the card's precision).
    # The daemon runs the model at this precision unless ``model.precision`` says otherwise.
    precision: str = ""
    backend: str = ""
    data_hash: str = ""
    split: str = "val"
    escape: RateEstimate | None = None
    false_reject: RateEstimate | None = None
    created: str = ""
    command: str = ""
    classes: dict[str, ClassThreshold] = Field(default_factory=dict)
    negatives: Literal["parts", "tiles"] = "parts"
    negatives_note: str = ""

    @model_serializer(mode="wrap")
    def _without_defaults_of_newer_fields(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A one-class calibration from good parts writes (and fingerprints) as it did before
        # these fields existed.
        data = handler(self)
        if isinstance(data, dict):
            for key, default in (("classes", {}), ("negatives", "parts"), ("negatives_note", "")):
                if data.get(key) == default:
                    data.pop(key, None)
        return data

    def ran_at(self, card_precision: str) -> str:
        """The precision the threshold was chosen at: the recorded one, else (a file from
        before it was recorded) ``card_precision``, what such calibrations ran at."""
        return self.precision or card_precision


# ----------------------------------------------------------------------------- camera


PatternKind = Literal["checkerboard", "circles", "asymmetric_circles"]


class PatternInfo(_Frozen):
    """The calibration target: inner corners (checkerboard) or circles per row and column."""

    kind: PatternKind
    cols: Annotated[int, Field(ge=2)]
    rows: Annotated[int, Field(ge=2)]
    spacing_mm: Annotated[float, Field(gt=0.0)]  # square size, or circle centre spacing


Row3 = tuple[float, float, float]


class CameraSection(_Frozen):
    """Camera geometry from ``defectd calibrate camera``.

    ``camera_matrix`` is the 3x3 pinhole matrix (pixels) and ``dist_coeffs`` the OpenCV
    distortion vector, both for frames of ``image_size`` = (width, height). ``mm_per_px`` is
    the scale at the inspection plane in the *undistorted* image (the one
    :class:`defectd.calibration.camera.Undistorter` produces, which keeps ``camera_matrix``),
    so a defect of ``a`` pixels there measures ``a * mm_per_px**2`` mm².
    """

    image_size: ImageSize
    camera_matrix: tuple[Row3, Row3, Row3]
    dist_coeffs: tuple[float, ...]
    reprojection_error_px: Annotated[float, Field(ge=0.0)]  # RMS over all corners
    mm_per_px: Annotated[float, Field(gt=0.0)]
    # How the plane image's board was tilted against the optical axis; a few degrees
    # make mm_per_px vary across the field, so it is kept as evidence.
    plane_tilt_deg: Annotated[float, Field(ge=0.0, le=90.0)] = 0.0
    plane_image: str = ""
    images: Annotated[int, Field(ge=0)] = 0
    pattern: PatternInfo
    created: str = ""
    command: str = ""

    @model_validator(mode="after")
    def _check_shapes(self) -> Self:
        if len(self.dist_coeffs) not in _DIST_LENGTHS:
            raise ValueError(
                f"dist_coeffs has {len(self.dist_coeffs)} values, expected one of "
                f"{', '.join(map(str, _DIST_LENGTHS))}"
            )
        k = self.camera_matrix
        if k[0][0] <= 0 or k[1][1] <= 0 or k[2] != (0.0, 0.0, 1.0):
            raise ValueError("camera_matrix must have positive fx, fy and last row [0, 0, 1]")
        return self

    @property
    def mm2_per_px(self) -> float:
        """Area of one undistorted pixel at the inspection plane, in mm²."""
        return self.mm_per_px * self.mm_per_px


# ----------------------------------------------------------------------------- flat-field


class FlatFieldSection(_Frozen):
    """A flat-field gain image from ``defectd calibrate flatfield``.

    ``gain_file`` is a ``.npy`` of float32 gains, ``(H, W)`` or ``(H, W, C)``, relative to the
    calibration file's folder. ``corrected = clip(raw * gain)``. The statistics describe the
    blank reference it was made from; the uniformities are ``(max - min) / mean`` of the
    smoothed reference before and after correction.
    """

    gain_file: str
    image_size: ImageSize
    channels: Literal[1, 3] = 1
    frames: Annotated[int, Field(gt=0)]
    reference_mean: Annotated[float, Field(gt=0.0)]
    gain_min: Annotated[float, Field(gt=0.0)]
    gain_max: Annotated[float, Field(gt=0.0)]
    uniformity_before: Annotated[float, Field(ge=0.0)]
    uniformity_after: Annotated[float, Field(ge=0.0)]
    method: str = "polynomial"
    created: str = ""
    command: str = ""

    def gain_path(self, calibration_path: Path) -> Path:
        """Where the gain image lies for a calibration file at ``calibration_path``."""
        return calibration_path.parent / self.gain_file


# ----------------------------------------------------------------------------- the file


class Calibration(_Frozen):
    """The whole calibration file; every section is optional."""

    schema_version: int = CALIBRATION_SCHEMA_VERSION
    station: str = ""
    camera_id: str = ""
    threshold: ThresholdSection | None = None
    camera: CameraSection | None = None
    flatfield: FlatFieldSection | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.schema_version > CALIBRATION_SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is newer than this defectd reads "
                f"({CALIBRATION_SCHEMA_VERSION}); upgrade defectd"
            )
        if (
            self.camera is not None
            and self.flatfield is not None
            and self.camera.image_size != self.flatfield.image_size
        ):
            raise ValueError(
                f"flatfield.image_size {list(self.flatfield.image_size)} differs from "
                f"camera.image_size {list(self.camera.image_size)}; recalibrate one of them"
            )
        return self

    def with_sections(self, **sections: BaseModel | None) -> Calibration:
        """A copy with the named sections replaced (``None`` removes one), re-validated."""
        unknown = sorted(set(sections) - set(type(self).model_fields))
        if unknown:
            raise ConfigError(f"unknown calibration section(s): {', '.join(unknown)}")
        data = self.model_dump(mode="json")
        for name, section in sections.items():
            data[name] = None if section is None else section.model_dump(mode="json")
        return _validate(data, "<calibration>")

    def to_json(self) -> str:
        """The file's text: indented JSON, sections absent when unset."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"

    def digest(self) -> str:
        """Hex sha256 of the canonical content, to trace verdicts to the calibration used."""
        canon = json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()

    def save(self, path: Path) -> None:
        """Write atomically: readers see the old file or the new one, never a mix."""
        atomic_write_bytes(path, self.to_json().encode())


def _validate(data: Any, where: str) -> Calibration:
    try:
        return Calibration.model_validate(data)
    except ValidationError as exc:
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{where}: invalid calibration: {detail}") from exc


def load_calibration(path: Path) -> Calibration:
    """Read and validate a calibration file.

    Raises ``ConfigError`` naming the file and, for invalid content, every bad key
    (e.g. ``camera.mm_per_px: Input should be greater than 0``).
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: calibration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read calibration file: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: invalid calibration: expected a JSON object at the top")
    return _validate(data, str(path))


def update_calibration(path: Path, **sections: BaseModel | None) -> Calibration:
    """Replace the named sections of the file at ``path`` (created if missing), keep the rest.

    The read-modify-write holds an exclusive lock on the file's folder so two calibration
    commands writing the same file do not lose each other's section. Returns what was written.
    """
    with _locked(path):
        current = load_calibration(path) if path.exists() else Calibration()
        try:
            updated = current.with_sections(**sections)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {str(exc).removeprefix('<calibration>: ')}") from exc
        updated.save(path)
    return updated


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Lock the folder rather than a lock file beside the calibration, so nothing is left over.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def now_iso() -> str:
    """UTC time for the ``created`` fields, e.g. ``2026-07-01T09:06:11Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
