"""What the pipeline knows about each camera: region of interest, scale and image corrections.

The daemon builds one ``CameraSetup`` per camera from the station config and the camera's
calibration file and hands the mapping to ``Pipeline``; frames of a camera without one are
inspected over the whole frame, in pixels only, with the model card's threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from defectd.calibration.camera import Undistorter
from defectd.calibration.file import load_calibration
from defectd.calibration.flatfield import FlatField
from defectd.log import get_logger
from defectd.pipeline.config import Rect

log = get_logger(__name__)

# An ignore zone: a rectangle, a mask image file, or a full-frame (H, W) uint8 mask (1 = ignore).
Zone = Rect | Path | NDArray[np.uint8]


class ImageCorrection(Protocol):
    """A per-frame image correction computed once at calibration (undistortion, flat-field).

    ``apply`` takes an ``(H, W)`` or ``(H, W, 3)`` uint8 image of the calibrated size and
    writes the corrected image into ``out`` (same shape and dtype) when given; returns it.
    """

    def apply(
        self, image: NDArray[np.uint8], out: NDArray[np.uint8] | None = None
    ) -> NDArray[np.uint8]: ...


@dataclass(frozen=True, slots=True, eq=False)
class CameraSetup:
    """Per-camera settings; every field is optional.

    ``roi`` limits inspection to a rectangle of the frame (full-frame pixel coordinates);
    ``mm_per_px`` at the inspection plane turns areas into mm²; ``flatfield`` then
    ``undistort`` are applied to the full frame before the ROI is cut. ``threshold`` and
    ``min_area_px`` come from threshold calibration and are used only while the model's
    sha256 equals ``threshold_model_sha256`` (when that is set). ``ignore_zones`` add to the
    post-processing config's zones for this camera. ``frame_size`` ``(H, W)`` and ``channels``
    are what the camera is configured to deliver (None: not known); a frame that differs gets
    the verdict ``error`` (``corrupt_frame``).
    """

    roi: Rect | None = None
    mm_per_px: float | None = None
    flatfield: ImageCorrection | None = None
    undistort: ImageCorrection | None = None
    threshold: float | None = None
    min_area_px: int | None = None
    # A multi-class model's calibrated ``(threshold, min area px)`` per class (same sha256 rule).
    class_points: Mapping[str, tuple[float, int]] = field(default_factory=dict)
    threshold_model_sha256: str = ""
    ignore_zones: tuple[Zone, ...] = ()
    frame_size: tuple[int, int] | None = None
    channels: int | None = None

    def calibrated_for(self, model_sha256: str) -> bool:
        """Whether the calibrated threshold applies to the model with this sha256."""
        return not self.threshold_model_sha256 or self.threshold_model_sha256 == model_sha256


DEFAULT_SETUP = CameraSetup()


def camera_setup_from_calibration(
    path: Path,
    *,
    roi: Rect | None = None,
    ignore_zones: tuple[Zone, ...] = (),
    undistort: bool = True,
    flatfield: bool = True,
    image_size: tuple[int, int] | None = None,
) -> CameraSetup:
    """A camera's setup from its calibration file (``defectd.calibration.file``).

    ``threshold`` section -> pixel threshold and minimum area (used only with the model whose
    sha256 it names); ``camera`` section -> ``mm_per_px`` and, with ``undistort``, an
    ``Undistorter`` for frames of ``image_size`` (width, height; default the calibrated size)
    whose border pixels that map from outside the sensor become an ignore zone; ``flatfield``
    section -> the gain image. Raises ``ConfigError`` naming the file and the bad key.
    """
    cal = load_calibration(path)
    mm_per_px: float | None = None
    undistorter: Undistorter | None = None
    zones = tuple(ignore_zones)
    if cal.camera is not None:
        mm_per_px = cal.camera.mm_per_px
        if undistort:
            undistorter = Undistorter(cal.camera, image_size)
            mm_per_px = undistorter.mm_per_px
            outside = (undistorter.valid_mask() == 0).astype(np.uint8)
            if outside.any():
                zones = (*zones, outside)
    flat = FlatField.from_section(cal.flatfield, path) if flatfield and cal.flatfield else None
    th = cal.threshold
    setup = CameraSetup(
        roi=roi,
        mm_per_px=mm_per_px,
        flatfield=flat,
        undistort=undistorter,
        threshold=th.pixel_threshold if th is not None else None,
        min_area_px=th.min_area_px if th is not None else None,
        class_points=(
            {c: (p.pixel_threshold, p.min_area_px) for c, p in th.classes.items()}
            if th is not None
            else {}
        ),
        threshold_model_sha256=th.model_sha256 if th is not None else "",
        ignore_zones=zones,
    )
    log.info(
        "camera_calibration_loaded",
        file=str(path),
        camera=cal.camera_id,
        mm_per_px=mm_per_px,
        undistort=undistorter is not None,
        flatfield=flat is not None,
        threshold=setup.threshold,
    )
    return setup
