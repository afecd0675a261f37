"""The unit of work that leaves a camera source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(slots=True)
class Frame:
    """One grabbed image.

    ``image`` is ``(H, W)`` for single-channel formats (uint8, or uint16 for Mono10/12/16) and
    ``(H, W, 3)`` uint8 in RGB order for colour. Sources convert camera pixel formats (Bayer,
    BGR, RGBa ...) before handing a frame on; ``pixel_format`` records what the camera sent.
    Times: ``t_host_ns`` is ``time.monotonic_ns()`` at grab (latencies are measured from it),
    ``t_wall`` is ``time.time()`` at grab (for humans and subscribers), ``t_camera_ns`` the
    device timestamp when the device provides one. ``deadline_ns`` (monotonic) is the part's
    own deadline, e.g. its reject gate (``defectd.pipeline.parts``): the pipeline gives up on
    the frame at the earlier of it and ``max_latency_ms`` after grab.
    """

    station: str
    camera: str
    seq: int
    image: NDArray[np.uint8] | NDArray[np.uint16]
    t_host_ns: int
    t_wall: float
    pixel_format: str = "Mono8"
    t_camera_ns: int | None = None
    part_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    deadline_ns: int | None = None
