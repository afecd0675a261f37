"""The result of inspecting one frame: a verdict with measured defects, traceable to its model."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    # The part could not be inspected (overload, engine error, bad buffer ...).
    # The station must treat it as a reject: fail-safe.
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Defect:
    """One connected defect region, in full-frame pixel coordinates."""

    area_px: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    centroid: tuple[float, float]  # x, y
    score_max: float  # highest defect probability inside the region
    score_mean: float
    area_mm2: float | None = None  # when the camera scale is calibrated
    # The model card's class whose channel found the region ("defect" for a one-class model);
    # the scores are that channel's probabilities.
    cls: str = "defect"


@dataclass(frozen=True, slots=True)
class Inspection:
    station: str
    camera: str
    seq: int
    verdict: Verdict
    defects: tuple[Defect, ...] = ()
    rule: str | None = None  # the decision rule that decided a fail (or "error:<reason>")
    reason: str | None = None  # why an error verdict was given
    part_id: str | None = None
    model_name: str = ""
    model_sha256: str = ""
    config_hash: str = ""
    t_grab_wall: float = 0.0  # time.time() at grab
    t_grab_ns: int = 0  # time.monotonic_ns() at grab
    latencies_ms: dict[str, float] = field(default_factory=dict)
    image_shape: tuple[int, ...] = ()
    result_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # The line contract (``defectd.pipeline.parts``): the part's gate deadline (epoch s; None:
    # no gate), the trigger's MQTT 5 correlation data (hex) and response topic, echoed back.
    gate_deadline: float | None = None
    correlation: str | None = None
    response_topic: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        return d
