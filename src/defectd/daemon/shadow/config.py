"""``[shadow]``: the candidate model that runs beside the live one (``defectd.daemon.shadow``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from defectd.daemon.config_types import BackendName, CalibrationFile, ModelFile


class ShadowConfig(BaseModel):
    """``[shadow]``: which candidate model to run on the live frames, and how modestly.

    The candidate never decides a part: it inspects a frame only after the live verdict was
    given, on threads with a lower priority, one frame at a time. Frames that arrive while it
    is busy wait in a queue of ``queue`` frames; beyond it a frame is skipped (the oldest or the
    newest waiting one, ``drop``) and counted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    path: ModelFile = Field(description="the candidate model (.onnx with its card beside it)")
    backend: BackendName = Field(default="auto", description="auto, openvino, ort, torch, tensorrt")
    precision: Literal["fp32", "fp16", "bf16", "int8"] | None = Field(
        default=None, description="None: the candidate's card"
    )
    threads: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=1, description="inference threads of the candidate (the live model keeps the rest)"
    )
    calibration: CalibrationFile | None = Field(
        default=None,
        description="a calibration file whose threshold section was calibrated for the "
        "candidate (pixel threshold, min area); the cameras' geometry and flat-field still "
        "come from their own calibration files. None: the candidate's card",
    )
    queue: Annotated[int, Field(ge=1, le=1024)] = Field(
        default=4, description="frames waiting for the candidate; beyond it frames are skipped"
    )
    drop: Literal["oldest", "newest"] = Field(
        default="oldest", description="which frame a full queue skips"
    )
    nice: Annotated[int, Field(ge=0, le=19)] = Field(
        default=10, description="how much lower the candidate's threads are scheduled"
    )
    max_archived: Annotated[int, Field(ge=0)] = Field(
        default=500,
        description="disagreements archived with image and masks per run; later ones are "
        "recorded without files",
    )
    publish_interval_s: Annotated[float, Field(gt=0)] = Field(
        default=10.0, description="how often the shadow summary goes to the MQTT shadow topic"
    )


def shadow_dir(state_dir: Path) -> Path:
    """Where shadow mode keeps its record and its archived disagreements."""
    return state_dir / "shadow"


__all__ = ["ShadowConfig", "shadow_dir"]
