"""What the pipeline knows about each camera: region of interest, scale and image corrections.

The daemon builds one ``CameraSetup`` per camera from the station config and the camera's
calibration file and hands the mapping to ``Pipeline``; frames of a camera without one are
inspected over the whole frame, in pixels only, with the model card's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from defectd.pipeline.config import Rect


class ImageCorrection(Protocol):
    """A per-frame image correction computed once at calibration (undistortion, flat-field).

    ``apply`` takes an ``(H, W)`` or ``(H, W, 3)`` uint8 image of the calibrated size and
    writes the corrected image into ``out`` (same shape and dtype) when given; returns it.
    """

    def apply(
        self, image: NDArray[np.uint8], out: NDArray[np.uint8] | None = None
    ) -> NDArray[np.uint8]: ...


@dataclass(frozen=True, slots=True)
class CameraSetup:
    """Per-camera settings; every field is optional.

    ``roi`` limits inspection to a rectangle of the frame (full-frame pixel coordinates);
    ``mm_per_px`` at the inspection plane turns areas into mm²; ``flatfield`` then
    ``undistort`` are applied to the full frame before the ROI is cut. ``threshold`` and
    ``min_area_px`` come from threshold calibration and are used only while the model's
    sha256 equals ``threshold_model_sha256`` (when that is set). ``ignore_zones`` add to the
    post-processing config's zones for this camera.
    """

    roi: Rect | None = None
    mm_per_px: float | None = None
    flatfield: ImageCorrection | None = None
    undistort: ImageCorrection | None = None
    threshold: float | None = None
    min_area_px: int | None = None
    threshold_model_sha256: str = ""
    ignore_zones: tuple[Rect | Path, ...] = ()

    def calibrated_for(self, model_sha256: str) -> bool:
        """Whether the calibrated threshold applies to the model with this sha256."""
        return not self.threshold_model_sha256 or self.threshold_model_sha256 == model_sha256


DEFAULT_SETUP = CameraSetup()
