"""Why a frame got the verdict ``error``: one short code per cause, counted and logged.

A frame that cannot be inspected in time still gets a verdict. The code goes into the
``Inspection.rule`` as ``error:<code>`` and, with a one-line detail, into ``reason``; the
pipeline counts every code so the metrics endpoint can show them.
"""

from __future__ import annotations

from enum import StrEnum

from defectd.errors import DefectdError


class ErrorReason(StrEnum):
    QUEUE_FULL = "queue_full"  # admission: the frame queue was full (line faster than engine)
    DEADLINE = "deadline"  # the frame's max_latency_ms passed before its verdict was ready
    CORRUPT_FRAME = "corrupt_frame"  # empty buffer, wrong shape or dtype, ROI outside frame
    PREPROCESS = "preprocess_error"  # a correction (undistort, flat-field) failed
    ENGINE = "engine_error"  # the engine raised or returned a wrong shape/dtype
    BAD_OUTPUT = "bad_output"  # NaN, inf or values outside [0, 1] in the probabilities
    NOT_CALIBRATED = "not_calibrated"  # a rule needs mm² but the camera has no scale
    POSTPROCESS = "postprocess_error"  # post-processing failed (e.g. ignore mask size)
    STOPPED = "stopped"  # submitted while the pipeline was not running or shutting down


class FrameError(DefectdError):
    """A frame that cannot be inspected; ``code`` says why, the message gives the detail."""

    def __init__(self, code: ErrorReason, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
