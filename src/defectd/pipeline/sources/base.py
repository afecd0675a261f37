"""The source contract: what every camera source (GenICam, synthetic line, replay) offers.

A source owns one named thread. ``start(on_frame, on_event)`` opens the device (configuration
errors raise ``CameraError`` here, before acquisition) and starts that thread, which calls
``on_frame`` for every grabbed frame, in order. ``stop()`` stops the thread and releases the
device; it is idempotent. ``health()`` is cheap and may be called from any thread.

Frames a source could not grab are never handed on: a lost frame is counted (``lost``) and
reported as an event, never invented.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from defectd.pipeline.frame import Frame

if TYPE_CHECKING:
    pass


class SourceState(StrEnum):
    STARTING = "starting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"  # stopped on request, or a finite source reached its end
    FAILED = "failed"  # gave up; ``SourceHealth.detail`` says why


class EventKind(StrEnum):
    """The ``kind`` of a ``SourceEvent`` (plain strings on the wire, e.g. MQTT events)."""

    CAMERA_LOST = "camera_lost"  # the device went away or stopped delivering
    RECONNECTING = "reconnecting"  # one reconnect attempt is about to start
    CAMERA_BACK = "camera_back"  # streaming again after a loss
    FRAMES_LOST = "frames_lost"  # a gap in the device's frame ids
    END_OF_STREAM = "end_of_stream"  # a finite source (replay, counted synthetic) is done
    FAILED = "failed"  # the source gave up


@dataclass(frozen=True, slots=True)
class SourceHealth:
    """A snapshot of one source's counters.

    ``frames`` counts frames handed to ``on_frame``; ``lost`` counts frames the device produced
    but we never received (gaps in frame ids); ``timeouts`` counts fetch deadlines that passed
    without a frame; ``fps`` is the rate over the last few seconds; ``last_frame_age_s`` is
    ``None`` before the first frame.
    """

    camera: str
    state: SourceState
    frames: int
    lost: int
    timeouts: int
    reconnects: int
    errors: int
    fps: float
    last_frame_age_s: float | None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class SourceEvent:
    """Something an operator should know about a source; ``t_wall`` is ``time.time()``."""

    camera: str
    kind: str  # one of EventKind
    detail: str
    t_wall: float

    @classmethod
    def now(cls, camera: str, kind: EventKind, detail: str = "") -> SourceEvent:
        return cls(camera=camera, kind=str(kind), detail=detail, t_wall=time.time())


OnFrame = Callable[[Frame], None]
OnEvent = Callable[[SourceEvent], None]


@runtime_checkable
class Source(Protocol):
    """One camera (real or simulated) delivering ``Frame``s on its own thread."""

    camera: str

    def start(self, on_frame: OnFrame, on_event: OnEvent | None = None) -> None:
        """Open the device, apply its configuration and start the source thread.

        ``on_frame`` is called from the source thread for every frame, in order. Synthetic and
        replay sources without a rate let it block (back-pressure); a camera source expects it
        to return quickly. Raises ``CameraError`` for a device that cannot be found or
        configured; calling ``start`` twice raises ``CameraError`` too.
        """
        ...

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (waiting up to ``timeout`` s) and release the device; idempotent."""
        ...

    def health(self) -> SourceHealth: ...

    def number_from(self, seq: int) -> None:
        """Give the next frame the number ``seq`` (call before ``start``): a station continues
        each camera's ``seq`` across restarts instead of starting again at 0."""
        ...


@runtime_checkable
class TriggeredSource(Protocol):
    """A source whose frames are taken on request (line mode ``plc-trigger``).

    ``fire_trigger`` returns at once; the source thread fires the camera (GenICam
    ``TriggerSoftware``) and the frame arrives through ``on_frame`` like any other. ``world_key``
    is for simulated cameras only: the part the simulated line puts in front of the camera (a
    real camera sees the part itself); real cameras ignore it.
    """

    camera: str

    def fire_trigger(self, world_key: str | None = None) -> None: ...


# --- configuration ----------------------------------------------------------------------------

NodeValue = bool | int | float | str
Channels = Literal[1, 3]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeviceSelector(_Frozen):
    """Which device a GenICam source opens: exactly one of serial, user-defined name or index.

    In TOML: ``device = { serial = "22051234" }``, ``device = { user_defined_name = "top" }``
    or ``device = { index = 0 }``.
    """

    serial: str | None = None
    user_defined_name: str | None = None
    index: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> DeviceSelector:
        given = [v for v in (self.serial, self.user_defined_name, self.index) if v is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of serial, user_defined_name, index")
        return self

    def describe(self) -> str:
        if self.serial is not None:
            return f"serial {self.serial!r}"
        if self.user_defined_name is not None:
            return f"user-defined name {self.user_defined_name!r}"
        return f"index {self.index}"


class GenICamSourceConfig(_Frozen):
    """A GenICam camera through a GenTL producer (``.cti``) and harvesters."""

    type: Literal["genicam"] = "genicam"
    camera: str = Field(min_length=1, description="camera id used in topics and logs")
    producers: tuple[Path, ...] = Field(
        default=(), description="GenTL producer files; empty = GENICAM_GENTL64_PATH"
    )
    device: DeviceSelector
    nodes: dict[str, NodeValue] = Field(
        default_factory=dict,
        description="node settings applied in order, e.g. PixelFormat, Width, ExposureTime",
    )
    num_buffers: int = Field(default=8, ge=1, le=256)
    fetch_timeout_s: float = Field(
        default=1.0, gt=0, description="a fetch with no frame for this long counts a timeout"
    )
    max_consecutive_timeouts: int | None = Field(
        default=5,
        ge=1,
        description="consecutive timeouts after which the source reconnects; None = never "
        "(a hardware-triggered line that may idle)",
    )
    poll_interval_s: float = Field(
        default=0.001,
        gt=0,
        le=0.1,
        description="sleep between empty polls of the producer (its waits hold the GIL, "
        "so the source polls); bounds the latency a frame waits",
    )
    stall_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a grab loop silent this long (a fetch that never returns) is torn down",
    )
    reconnect_backoff_min_s: float = Field(default=0.5, gt=0)
    reconnect_backoff_max_s: float = Field(default=30.0, gt=0)
    trigger: Literal["free-run", "software", "request"] = Field(
        default="free-run",
        description="free-run: the camera decides (free running, or a hardware trigger set "
        "through nodes); software: the source fires TriggerSoftware at trigger_rate_hz; "
        "request: it fires TriggerSoftware once per fire_trigger() (line mode plc-trigger)",
    )
    request_substitute: bool = Field(
        default=False,
        description="trigger = 'request' on a device without TriggerSoftware (viky.cti): take "
        "the first frame that starts arriving after the request instead (queued buffers are "
        "flushed). For simulators only: a free-running camera does not image a part on demand",
    )
    trigger_rate_hz: float | None = Field(
        default=None, gt=0, description="software trigger rate; None = next trigger on arrival"
    )
    channels: Channels = Field(default=1, description="output channels: 1 gray, 3 RGB")

    @model_validator(mode="after")
    def _backoff_order(self) -> GenICamSourceConfig:
        if self.reconnect_backoff_max_s < self.reconnect_backoff_min_s:
            raise ValueError("reconnect_backoff_max_s must be >= reconnect_backoff_min_s")
        if self.request_substitute and self.trigger != "request":
            raise ValueError("request_substitute needs trigger = 'request'")
        return self


class SyntheticSourceConfig(_Frozen):
    """A simulated line of rendered parts, some defective, with ground truth in ``frame.meta``."""

    type: Literal["synthetic"] = "synthetic"
    camera: str = Field(min_length=1)
    rate_hz: float | None = Field(default=10.0, gt=0, description="None = as fast as possible")
    height: int = Field(default=512, ge=16, le=8192)
    width: int = Field(default=512, ge=16, le=8192)
    channels: Channels = 1
    defect_rate: float = Field(default=0.3, ge=0, le=1)
    surfaces: tuple[str, ...] = Field(default=(), description="empty = every surface")
    seed: int = 0
    count: int | None = Field(default=None, ge=1, description="stop after this many parts")
    trigger: Literal["free-run", "request"] = Field(
        default="free-run",
        description="free-run: parts at rate_hz; request: one part per fire_trigger() (line "
        "mode plc-trigger), rendered from the part id the simulated line names",
    )
    # A line that changes after a while (drift monitoring's test case): from part
    # ``drift_after`` on (counting from 0), over ``drift_ramp`` parts, the lighting dims by
    # ``drift_amount`` (gain 1 - amount) or the surface texture smooths (the part blended
    # with a blurred copy of itself, weight amount). Deterministic: a pure function of n.
    drift_after: int | None = Field(default=None, ge=0, description="None = a stable line")
    drift_kind: Literal["lighting", "texture"] = "lighting"
    drift_amount: float = Field(default=0.2, gt=0, le=1)
    drift_ramp: int = Field(default=0, ge=0, description="parts to reach drift_amount; 0 = step")


class ReplaySourceConfig(_Frozen):
    """Archived images played back: a folder of images, a manifest dataset or a video file."""

    type: Literal["replay"] = "replay"
    camera: str = Field(min_length=1)
    path: Path
    rate_hz: float | None = Field(default=None, gt=0, description="None = as fast as possible")
    loop: bool = False
    channels: Channels = 1


SourceConfig = Annotated[
    GenICamSourceConfig | SyntheticSourceConfig | ReplaySourceConfig,
    Field(discriminator="type"),
]
