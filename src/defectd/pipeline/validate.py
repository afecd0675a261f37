"""Frames checked at intake, before they take a place in the pipeline.

``frame_problem`` says what is wrong with a frame (its fields, its buffer, and its size and
format against what the camera was configured to deliver: ``CameraSetup.frame_size`` and
``channels``); ``usable_frame`` gives a copy with every field the pipeline and the sinks read
replaced by a safe value, so that a malformed frame still gets its one verdict (``error``,
``corrupt_frame``) instead of an exception in ``submit``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from defectd.pipeline.cameras import CameraSetup
from defectd.pipeline.failures import FrameError
from defectd.pipeline.frame import Frame
from defectd.pipeline.preprocess import check_image

_EMPTY = np.zeros((0, 0), np.uint8)


def frame_problem(frame: Any, setup: CameraSetup) -> str | None:
    """One line naming what makes ``frame`` uninspectable, or None when it is usable."""
    if not isinstance(frame, Frame):
        return f"not a Frame but {type(frame).__name__}"
    for name, kinds in (("station", str), ("camera", str), ("seq", int), ("t_host_ns", int)):
        value = getattr(frame, name, None)
        if not isinstance(value, kinds) or isinstance(value, bool):
            return f"{name} is {value!r}, expected {kinds.__name__}"
    if not isinstance(frame.t_wall, int | float):
        return f"t_wall is {frame.t_wall!r}, expected a number"
    if frame.part_id is not None and not isinstance(frame.part_id, str):
        return f"part_id is {frame.part_id!r}, expected a string"
    if not isinstance(frame.meta, dict):
        return f"meta is {type(frame.meta).__name__}, expected a dict"
    try:
        check_image(frame.image)
    except FrameError as exc:
        return str(exc)
    image = frame.image
    if setup.frame_size is not None and tuple(image.shape[:2]) != setup.frame_size:
        h, w = setup.frame_size
        return (
            f"frame {image.shape[0]}x{image.shape[1]} (HxW), the camera is configured for {h}x{w}"
        )
    channels = 1 if image.ndim == 2 else int(image.shape[2])
    if setup.channels is not None and channels != setup.channels:
        return f"frame has {channels} channels, the camera is configured for {setup.channels}"
    return None


def usable_frame(frame: Any, station: str = "") -> Frame:
    """A copy of ``frame`` whose fields are safe to read: the ones of the wrong type are
    replaced (camera ``"unknown"``, seq -1, times now, image an empty ``(0, 0)`` uint8)."""

    def field(name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = getattr(frame, name, None)
        return value if isinstance(value, kind) and not isinstance(value, bool) else default

    image = field("image", np.ndarray, _EMPTY)
    return Frame(
        station=field("station", str, station),
        camera=field("camera", str, "unknown"),
        seq=field("seq", int, -1),
        image=image,
        t_host_ns=field("t_host_ns", int, time.monotonic_ns()),
        t_wall=float(field("t_wall", (int, float), time.time())),
        pixel_format=field("pixel_format", str, ""),
        t_camera_ns=field("t_camera_ns", int, None),
        part_id=field("part_id", str, None),
        meta=field("meta", dict, {}),
        deadline_ns=field("deadline_ns", int, None),
    )
