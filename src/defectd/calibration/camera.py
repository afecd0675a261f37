"""Camera geometry: intrinsics, lens distortion and the mm-per-pixel scale at the inspection plane.

``calibrate_camera`` finds a checkerboard (or circle grid) in several views and runs OpenCV's
``calibrateCamera``. The scale is measured on the *plane image* -- by default the first view,
the one taken with the board lying on the inspection plane -- as the median, over adjacent
pattern points, of (distance in mm on the board) / (distance in pixels of the undistorted
image). :class:`Undistorter` produces exactly that undistorted image (it keeps the calibrated
camera matrix), so defect areas measured after it convert with ``mm_per_px ** 2``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.calibration.file import CameraSection, PatternInfo, PatternKind
from defectd.errors import CalibrationError, ConfigError
from defectd.log import get_logger

log = get_logger(__name__)

MIN_IMAGES = 3  # fewer views cannot pin down focal length, centre and distortion together

# Undistorting points is iterative; OpenCV's default 5 iterations leave ~0.1 px error
# in the corners of a strongly distorted lens, which would bias the measured scale.
_UNDISTORT_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-10)

ProgressFn = Callable[[int, int], None]  # (views done, views in total)


@dataclass(frozen=True, slots=True)
class CheckerboardPattern:
    """A checkerboard with ``cols`` x ``rows`` *inner* corners and squares of ``square_mm``."""

    cols: int
    rows: int
    square_mm: float
    kind: ClassVar[str] = "checkerboard"

    def __post_init__(self) -> None:
        _check_grid(self.cols, self.rows, self.square_mm, "square_mm")

    def object_points(self) -> NDArray[np.float32]:
        """``(rows * cols, 3)`` float32 corner positions in mm on the board (z = 0), row-major."""
        return _grid_points(self.cols, self.rows, self.square_mm, staggered=False)

    def find(self, gray: NDArray[np.uint8]) -> NDArray[np.float32] | None:
        """``(rows * cols, 2)`` float32 sub-pixel corners in ``gray`` ``(H, W) uint8``, or None."""
        size = (self.cols, self.rows)
        found, corners = cv2.findChessboardCornersSB(
            gray, size, flags=cv2.CALIB_CB_NORMALIZE_IMAGE | cv2.CALIB_CB_ACCURACY
        )
        if not found:
            # The classic detector copes with some boards the sector-based one misses.
            flags = cv2.CALIB_CB_ADAPTIVE_THRESH | cv2.CALIB_CB_NORMALIZE_IMAGE
            found, corners = cv2.findChessboardCorners(gray, size, flags=flags)
            if not found:
                return None
            spacing = _min_spacing(np.asarray(corners, np.float32), self.cols, self.rows)
            half = max(2, min(11, int(spacing / 3)))
            criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-3)
            corners = cv2.cornerSubPix(gray, corners, (half, half), (-1, -1), criteria)
        return np.ascontiguousarray(corners.reshape(-1, 2), dtype=np.float32)

    def info(self) -> PatternInfo:
        return PatternInfo(
            kind="checkerboard", cols=self.cols, rows=self.rows, spacing_mm=self.square_mm
        )


@dataclass(frozen=True, slots=True)
class CircleGridPattern:
    """A grid of ``cols`` x ``rows`` circles whose centres lie ``spacing_mm`` apart.

    ``asymmetric=True`` is OpenCV's staggered grid: odd rows are shifted by ``spacing_mm``
    and centres in one row lie ``2 * spacing_mm`` apart (OpenCV's own convention).
    """

    cols: int
    rows: int
    spacing_mm: float
    asymmetric: bool = False
    kind: ClassVar[str] = "circles"

    def __post_init__(self) -> None:
        _check_grid(self.cols, self.rows, self.spacing_mm, "spacing_mm")

    def object_points(self) -> NDArray[np.float32]:
        """``(rows * cols, 3)`` float32 circle centres in mm on the board (z = 0), row-major."""
        return _grid_points(self.cols, self.rows, self.spacing_mm, staggered=self.asymmetric)

    def find(self, gray: NDArray[np.uint8]) -> NDArray[np.float32] | None:
        """``(rows * cols, 2)`` float32 circle centres in ``gray`` ``(H, W) uint8``, or None."""
        flags = cv2.CALIB_CB_ASYMMETRIC_GRID if self.asymmetric else cv2.CALIB_CB_SYMMETRIC_GRID
        params = cv2.SimpleBlobDetector.Params()
        # Defaults cap blobs at 5000 px², too small for a grid filling a megapixel frame.
        params.maxArea = float(gray.shape[0] * gray.shape[1]) / max(4, self.cols * self.rows)
        detector = cv2.SimpleBlobDetector.create(params)
        found, centres = cv2.findCirclesGrid(
            gray, (self.cols, self.rows), flags=flags, blobDetector=detector
        )
        if not found:
            return None
        return np.ascontiguousarray(centres.reshape(-1, 2), dtype=np.float32)

    def info(self) -> PatternInfo:
        kind: PatternKind = "asymmetric_circles" if self.asymmetric else "circles"
        return PatternInfo(kind=kind, cols=self.cols, rows=self.rows, spacing_mm=self.spacing_mm)


Pattern = CheckerboardPattern | CircleGridPattern


def pattern_from_info(info: PatternInfo) -> Pattern:
    """The pattern a calibration file's ``camera.pattern`` describes."""
    if info.kind == "checkerboard":
        return CheckerboardPattern(info.cols, info.rows, info.spacing_mm)
    return CircleGridPattern(
        info.cols, info.rows, info.spacing_mm, asymmetric=info.kind == "asymmetric_circles"
    )


@dataclass(frozen=True, slots=True)
class CameraCalibration:
    """The result of :func:`calibrate_camera`.

    ``camera_matrix`` ``(3, 3)`` float64 and ``dist_coeffs`` ``(K,)`` float64 are OpenCV's,
    for frames of ``image_size`` = (width, height). ``reprojection_error_px`` is the RMS over
    every pattern point of every view; ``per_view_error_px`` the RMS per view, in the order of
    ``views``. ``mm_per_px`` is the scale at the inspection plane in the undistorted image.
    """

    image_size: tuple[int, int]
    camera_matrix: NDArray[np.float64]
    dist_coeffs: NDArray[np.float64]
    reprojection_error_px: float
    mm_per_px: float
    plane_tilt_deg: float
    pattern: Pattern
    plane_image: str = ""
    views: tuple[str, ...] = ()
    per_view_error_px: tuple[float, ...] = ()
    skipped: tuple[str, ...] = field(default=())

    @property
    def focal_px(self) -> tuple[float, float]:
        return float(self.camera_matrix[0, 0]), float(self.camera_matrix[1, 1])

    @property
    def principal_point_px(self) -> tuple[float, float]:
        return float(self.camera_matrix[0, 2]), float(self.camera_matrix[1, 2])

    def to_section(self, *, created: str = "", command: str = "") -> CameraSection:
        k = [[float(v) for v in row] for row in self.camera_matrix]
        return CameraSection(
            image_size=self.image_size,
            camera_matrix=((k[0][0], k[0][1], k[0][2]), (k[1][0], k[1][1], k[1][2]), (0, 0, 1)),
            dist_coeffs=tuple(float(v) for v in self.dist_coeffs),
            reprojection_error_px=self.reprojection_error_px,
            mm_per_px=self.mm_per_px,
            plane_tilt_deg=self.plane_tilt_deg,
            plane_image=self.plane_image,
            images=len(self.views),
            pattern=self.pattern.info(),
            created=created,
            command=command,
        )

    @classmethod
    def from_section(cls, section: CameraSection) -> CameraCalibration:
        return cls(
            image_size=(section.image_size[0], section.image_size[1]),
            camera_matrix=np.array(section.camera_matrix, dtype=np.float64),
            dist_coeffs=np.array(section.dist_coeffs, dtype=np.float64),
            reprojection_error_px=section.reprojection_error_px,
            mm_per_px=section.mm_per_px,
            plane_tilt_deg=section.plane_tilt_deg,
            pattern=pattern_from_info(section.pattern),
            plane_image=section.plane_image,
        )


def calibrate_camera(
    images: Sequence[NDArray[np.uint8]],
    pattern: Pattern,
    *,
    names: Sequence[str] | None = None,
    plane_index: int = 0,
    skip_unfound: bool = False,
    progress: ProgressFn | None = None,
) -> CameraCalibration:
    """Calibrate from views of ``pattern``: ``(H, W)`` or ``(H, W, 3)`` RGB uint8, one size.

    ``images[plane_index]`` must show the board lying on the inspection plane; the scale is
    measured there. ``names`` label the views in errors and results (file names, usually).
    A view without the pattern is a ``CalibrationError`` naming it, unless ``skip_unfound``
    (then it is logged and listed in ``skipped``; the plane view is never skipped). Fewer
    than ``MIN_IMAGES`` usable views is a ``CalibrationError``. ``progress(done, total)`` is
    called after each view is searched.
    """
    labels = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} names for {len(images)} images")
    if len(images) < MIN_IMAGES:
        raise CalibrationError(
            f"need at least {MIN_IMAGES} views of the pattern, got {len(images)}"
        )
    if not 0 <= plane_index < len(images):
        raise ValueError(f"plane_index {plane_index} outside 0..{len(images) - 1}")
    height, width = images[0].shape[:2]
    what = _describe(pattern)

    object_points = pattern.object_points()
    found_points: list[NDArray[np.float32]] = []
    used: list[str] = []
    skipped: list[str] = []
    plane_pos = -1
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        if image.shape[:2] != (height, width):
            raise CalibrationError(
                f"{label}: image is {image.shape[1]}x{image.shape[0]}, the first view is "
                f"{width}x{height}; all views must come from the same camera mode"
            )
        points = pattern.find(_gray(image, label))
        if points is None:
            if not skip_unfound or i == plane_index:
                raise CalibrationError(
                    f"{label}: no {what} found (check the pattern size, focus and lighting)"
                )
            log.warning("calibration_view_skipped", view=label, reason="pattern not found")
            skipped.append(label)
        else:
            if i == plane_index:
                plane_pos = len(found_points)
            found_points.append(points)
            used.append(label)
        if progress is not None:
            progress(i + 1, len(images))
    if len(found_points) < MIN_IMAGES:
        raise CalibrationError(
            f"{what} found in only {len(found_points)} of {len(images)} views; "
            f"need at least {MIN_IMAGES}"
        )

    rms, k, d, rvecs, _tvecs, _sdi, _sde, per_view = cv2.calibrateCameraExtended(
        [object_points] * len(found_points),
        found_points,
        (int(width), int(height)),
        np.eye(3),  # initial values, ignored without CALIB_USE_INTRINSIC_GUESS
        np.zeros(5),
    )
    camera_matrix = np.asarray(k, dtype=np.float64)
    dist_coeffs = np.asarray(d, dtype=np.float64).reshape(-1)
    mm_per_px = plane_scale(
        found_points[plane_pos], object_points, pattern, camera_matrix, dist_coeffs
    )
    rotation, _ = cv2.Rodrigues(rvecs[plane_pos])
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(rotation[2, 2]))))))
    result = CameraCalibration(
        image_size=(int(width), int(height)),
        camera_matrix=camera_matrix,
        dist_coeffs=dist_coeffs,
        reprojection_error_px=float(rms),
        mm_per_px=mm_per_px,
        plane_tilt_deg=tilt,
        pattern=pattern,
        plane_image=labels[plane_index],
        views=tuple(used),
        per_view_error_px=tuple(float(e) for e in np.asarray(per_view).reshape(-1)),
        skipped=tuple(skipped),
    )
    log.info(
        "camera_calibrated",
        views=len(used),
        skipped=len(skipped),
        reprojection_error_px=round(result.reprojection_error_px, 4),
        mm_per_px=round(mm_per_px, 6),
        plane_tilt_deg=round(tilt, 2),
    )
    return result


def plane_scale(
    image_points: NDArray[np.float32],
    object_points: NDArray[np.float32],
    pattern: Pattern,
    camera_matrix: NDArray[np.float64],
    dist_coeffs: NDArray[np.float64],
) -> float:
    """mm per undistorted pixel of one view: the median over adjacent pattern points.

    ``image_points`` ``(N, 2)`` are as detected (distorted); ``object_points`` ``(N, 3)`` mm.
    Neighbours are taken along rows and columns of the grid, so the staggered circle grid
    and the checkerboard are measured alike.
    """
    ideal = cv2.undistortPoints(
        image_points.reshape(-1, 1, 2).astype(np.float64),
        camera_matrix,
        dist_coeffs,
        P=camera_matrix,
        criteria=_UNDISTORT_CRITERIA,
    ).reshape(pattern.rows, pattern.cols, 2)
    board = object_points[:, :2].astype(np.float64).reshape(pattern.rows, pattern.cols, 2)
    ratios = [
        np.linalg.norm(np.diff(board, axis=axis), axis=-1).ravel()
        / np.linalg.norm(np.diff(ideal, axis=axis), axis=-1).ravel()
        for axis in (0, 1)
    ]
    return float(np.median(np.concatenate(ratios)))


class Undistorter:
    """Removes lens distortion from frames with maps computed once.

    The output keeps the calibrated camera matrix (no zoom or crop), so its scale is the
    calibration's ``mm_per_px``. ``image_size`` (width, height) may differ from the
    calibrated size by a uniform factor (binning, decimation): the matrix and the scale are
    rescaled; any other size is a ``ConfigError``. Pixels that map from outside the sensor
    repeat the border (``valid_mask()`` marks them, e.g. for ignore-zones).
    Safe to share between threads: ``apply`` only reads the maps.
    """

    def __init__(
        self,
        calibration: CameraSection | CameraCalibration,
        image_size: tuple[int, int] | None = None,
        *,
        interpolation: int = cv2.INTER_LINEAR,
    ) -> None:
        cal = (
            CameraCalibration.from_section(calibration)
            if isinstance(calibration, CameraSection)
            else calibration
        )
        cal_w, cal_h = cal.image_size
        width, height = image_size if image_size is not None else cal.image_size
        sx, sy = width / cal_w, height / cal_h
        if abs(sx - sy) * max(cal_w, cal_h) > 1.0:
            raise ConfigError(
                f"camera calibration is for {cal_w}x{cal_h} frames, got {width}x{height}: "
                "only a uniform rescale of the calibrated size can be undistorted; recalibrate"
            )
        k = cal.camera_matrix.copy()
        k[0, 0] *= sx
        k[0, 1] *= sx
        k[1, 1] *= sy
        # Pixel centres scale about the image corner, not about pixel (0, 0)'s centre.
        k[0, 2] = (k[0, 2] + 0.5) * sx - 0.5
        k[1, 2] = (k[1, 2] + 0.5) * sy - 0.5
        self._size = (int(width), int(height))
        self._camera_matrix = k
        self._dist = cal.dist_coeffs.copy()
        self._mm_per_px = cal.mm_per_px / ((sx + sy) / 2.0)
        self._interpolation = interpolation
        # Fixed-point maps: ~2x faster remap than float maps, accurate to 1/32 px.
        self._map1, self._map2 = cv2.initUndistortRectifyMap(
            k, self._dist, None, k, self._size, cv2.CV_16SC2
        )

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the frames this undistorter takes and returns."""
        return self._size

    @property
    def mm_per_px(self) -> float:
        """Scale at the inspection plane in the undistorted output, mm per pixel."""
        return self._mm_per_px

    @property
    def camera_matrix(self) -> NDArray[np.float64]:
        """``(3, 3)`` matrix of both the input and the undistorted output at this size."""
        return self._camera_matrix.copy()

    def apply(self, image: NDArray[Any], out: NDArray[Any] | None = None) -> NDArray[Any]:
        """Undistort ``image`` ``(H, W)`` or ``(H, W, C)`` (any depth) into ``out``.

        ``out`` must have the image's shape and dtype; when given, nothing is allocated and
        ``out`` is returned. Raises ``ValueError`` on a size, shape or dtype mismatch.
        """
        width, height = self._size
        if image.shape[:2] != (height, width):
            raise ValueError(
                f"frame is {image.shape[1]}x{image.shape[0]}, undistorter built for "
                f"{width}x{height}"
            )
        if out is not None and (out.shape != image.shape or out.dtype != image.dtype):
            raise ValueError(
                f"out is {out.shape} {out.dtype}, expected {image.shape} {image.dtype}"
            )
        result: NDArray[Any] = cv2.remap(
            image,
            self._map1,
            self._map2,
            self._interpolation,
            dst=out,
            borderMode=cv2.BORDER_REPLICATE,
        )
        return result

    def valid_mask(self) -> NDArray[np.uint8]:
        """``(H, W)`` uint8, 1 where the output pixel comes from inside the sensor, else 0."""
        width, height = self._size
        ones = np.ones((height, width), np.uint8)
        mask = cv2.remap(
            ones,
            self._map1,
            self._map2,
            cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        return np.asarray(mask, dtype=np.uint8)


def _check_grid(cols: int, rows: int, spacing: float, name: str) -> None:
    if cols < 2 or rows < 2:
        raise ConfigError(f"pattern size {cols}x{rows}: need at least 2x2 points")
    if not spacing > 0:
        raise ConfigError(f"pattern {name} must be > 0, got {spacing}")


def _grid_points(cols: int, rows: int, spacing: float, *, staggered: bool) -> NDArray[np.float32]:
    r, c = np.mgrid[0:rows, 0:cols]
    x = (2 * c + r % 2) if staggered else c
    pts = np.zeros((rows * cols, 3), np.float32)
    pts[:, 0] = (x * spacing).ravel()
    pts[:, 1] = (r * spacing).ravel()
    return pts


def _min_spacing(points: NDArray[np.float32], cols: int, rows: int) -> float:
    grid = points.reshape(rows, cols, 2)
    dx = np.linalg.norm(np.diff(grid, axis=1), axis=-1)
    dy = np.linalg.norm(np.diff(grid, axis=0), axis=-1)
    return float(min(dx.min(), dy.min()))


def _gray(image: NDArray[np.uint8], label: str) -> NDArray[np.uint8]:
    if image.dtype != np.uint8:
        raise CalibrationError(f"{label}: expected 8-bit pixels, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return np.asarray(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), dtype=np.uint8)
    raise CalibrationError(f"{label}: expected (H, W) or (H, W, 3) pixels, got {image.shape}")


def _describe(pattern: Pattern) -> str:
    if isinstance(pattern, CheckerboardPattern):
        return f"{pattern.cols}x{pattern.rows} checkerboard (inner corners)"
    kind = "asymmetric circle grid" if pattern.asymmetric else "circle grid"
    return f"{pattern.cols}x{pattern.rows} {kind}"
