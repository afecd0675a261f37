"""Settings of the inspection pipeline: batching and deadlines, post-processing, decision rules.

Each section is a frozen pydantic model (``extra="forbid"``) that the station config embeds:
``[pipeline]`` -> ``PipelineConfig``, ``[postprocess]`` -> ``PostprocessConfig``,
``[rules]`` -> ``RulesConfig``. ``config_hash`` fingerprints them for every verdict.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

Admission = Literal["reject", "block"]
StitchMode = Literal["blend", "max"]
FitMode = Literal["auto", "tile", "resize", "pad"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Rect(_Frozen):
    """An axis-aligned rectangle in full-frame pixel coordinates."""

    x: Annotated[int, Field(ge=0)]
    y: Annotated[int, Field(ge=0)]
    width: Annotated[int, Field(gt=0)]
    height: Annotated[int, Field(gt=0)]


PipelineMode = Literal["throughput", "latency"]


class PipelineConfig(_Frozen):
    """How frames flow: queues, dynamic batching, deadlines, tiling and worker threads."""

    # "throughput": the engine runs several requests in parallel (OpenVINO: one per CPU
    # stream), each a whole batch, with one inference thread per request: most frames per
    # second, each frame on one core. "latency": one request on every core: each frame done
    # soonest, fewer frames per second when the line is saturated. See docs/engines.md.
    mode: PipelineMode = "throughput"

    # Dynamic batching: a batch leaves when it holds ``max_batch`` tiles or when its first tile
    # has waited ``max_delay_ms``, whichever comes first. Capped by the engine's own max batch.
    max_batch: Annotated[int, Field(ge=1, le=256)] = 8
    max_delay_ms: Annotated[float, Field(ge=0.0, le=10_000.0)] = 5.0
    # Deadline per frame, measured from grab (``Frame.t_host_ns``). A frame that cannot be
    # inspected within it gets the verdict ``error``. ``0`` (in TOML; ``None`` from Python):
    # no deadline, for offline replays that must inspect every part however long it takes.
    max_latency_ms: Annotated[float, Field(ge=0.0)] | None = 1000.0

    @property
    def deadline_ms(self) -> float | None:
        """The per-frame deadline in ms, or ``None`` when there is none."""
        return self.max_latency_ms or None

    # Bounded queues between the stages, in frames.
    frame_queue: Annotated[int, Field(ge=1, le=4096)] = 16  # submitted, waiting to preprocess
    job_queue: Annotated[int, Field(ge=1, le=4096)] = 4  # preprocessed, waiting for the batcher
    result_queue: Annotated[int, Field(ge=1, le=4096)] = 16  # inferred, waiting to post-process
    # Frames larger than the model input are cut into tiles overlapping by this many pixels;
    # overlapping probabilities are blended (weights fall off towards tile edges) or maxed.
    tile_overlap_px: Annotated[int, Field(ge=0, le=1024)] = 32
    stitch: StitchMode = "blend"
    # How frames reach the model input: "auto" follows the model card's fit policy (resize,
    # pad, or tile for a model that works at native scale), the policy the model was trained,
    # evaluated and calibrated with; "tile"/"resize"/"pad" force one way.
    fit: FitMode = "auto"
    # A frame larger than the model input, under the "tile" policy, of a fully convolutional
    # model (the card's architecture says so; engines that can compile another input size):
    # inspected in as few large windows as cover it (the whole frame when it is at most
    # full_frame_max_px pixels), not in model-sized tiles that repeat up to a third of it in
    # their overlaps. The engine runs as many windows at once as it has requests (a stream
    # each in throughput mode, one on every core in latency mode): they share
    # full_frame_max_px, which so bounds the memory inferences hold. The budget counts
    # pixels at 16-bit activations (bf16, fp16, int8 engines): an engine computing in float32
    # holds twice the bytes per pixel and gets half the pixels. Off: model-sized tiles.
    full_frame: bool = True
    full_frame_max_px: Annotated[int, Field(ge=4096, le=1 << 28)] = 1 << 20
    preprocess_workers: Annotated[int, Field(ge=1, le=32)] = 1
    workers: Annotated[int, Field(ge=1, le=32)] = 2  # post-processing threads
    # "reject": a full frame queue gives the frame an ``error`` verdict at once (production
    # line, the camera never waits). "block": ``submit`` waits for room (offline replay, bench).
    admission: Admission = "reject"
    # At most this many frames between submit and verdict (None: only the queues bound it).
    # It bounds latency under load: with "block", a saturated line waits before grabbing
    # more instead of queueing; with "reject", the excess gets ``error:queue_full`` at once.
    max_in_flight: Annotated[int, Field(ge=1, le=100_000)] | None = None
    # Window over which ``stats().fps`` and the latency percentiles are computed.
    stats_window: Annotated[int, Field(ge=16, le=1_000_000)] = 4096


class PostprocessConfig(_Frozen):
    """Turning a probability map into measured defects."""

    # Pixel threshold on the defect probability. ``None``: the calibration file's
    # ``threshold.pixel_threshold`` for this camera when present, else the model card's.
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    # Radii in pixels of the elliptical structuring elements (0 = off); the kernel is 2r+1 wide.
    # Opening removes specks narrower than the kernel, closing joins fragments of one defect.
    open_px: Annotated[int, Field(ge=0, le=64)] = 0
    close_px: Annotated[int, Field(ge=0, le=64)] = 0
    # Regions smaller than this are not defects. ``None``: calibration file, else model card.
    min_area_px: Annotated[int, Field(ge=0)] | None = None
    # Regions never judged: rectangles in full-frame pixels, or mask image files (non-zero
    # pixels are ignored) of the camera's full frame size.
    ignore_zones: tuple[Rect | Path, ...] = ()
    # At most this many defects are measured and reported per frame (the largest first).
    max_defects: Annotated[int, Field(ge=1, le=10_000)] = 100


class _RuleConfig(_Frozen):
    """What every rule has: ``class`` limits it to the defects of one class of the model card
    (a multi-class model; checked against the card when the pipeline is built). Without it the
    rule looks at every defect."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    class_: Annotated[str, Field(min_length=1)] | None = Field(default=None, alias="class")

    @model_serializer(mode="wrap")
    def _without_unset_class(self, handler: SerializerFunctionWrapHandler) -> Any:
        # A rule without a class dumps as it did before rules had classes, so the config hash
        # stamped on every verdict stays the same for existing station configs.
        data = handler(self)
        if isinstance(data, dict) and self.class_ is None:
            data.pop("class_", None)
            data.pop("class", None)
        return data


class AreaRuleConfig(_RuleConfig):
    """Fail when any defect is at least this large (px and/or mm²) and this confident."""

    kind: Literal["area"] = "area"
    min_area_px: Annotated[int, Field(ge=0)] | None = None
    min_area_mm2: Annotated[float, Field(ge=0.0)] | None = None
    min_score: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0

    @model_validator(mode="after")
    def _has_area(self) -> AreaRuleConfig:
        if self.min_area_px is None and self.min_area_mm2 is None:
            raise ValueError("an area rule needs min_area_px or min_area_mm2")
        return self


class CountRuleConfig(_RuleConfig):
    """Fail when more than ``max_defects`` defects (with score >= ``min_score``) are found."""

    kind: Literal["count"] = "count"
    max_defects: Annotated[int, Field(ge=0)]
    min_score: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0


class ScoreRuleConfig(_RuleConfig):
    """Fail when any defect's peak probability reaches ``min_score``."""

    kind: Literal["score"] = "score"
    min_score: Annotated[float, Field(ge=0.0, le=1.0)]


class AnyDefectRuleConfig(_RuleConfig):
    """Fail on any defect that survived post-processing (threshold, morphology, min area)."""

    kind: Literal["any"] = "any"


RuleConfig = Annotated[
    AreaRuleConfig | CountRuleConfig | ScoreRuleConfig | AnyDefectRuleConfig,
    Field(discriminator="kind"),
]


class RulesConfig(_Frozen):
    """Decision rules, evaluated in order; the first that fires fails the part and names it."""

    rules: tuple[RuleConfig, ...] = (AnyDefectRuleConfig(),)


def config_hash(*sections: BaseModel) -> str:
    """First 16 hex digits of the sha256 over the sections' canonical JSON (stable key order)."""
    blob = json.dumps([s.model_dump(mode="json") for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
