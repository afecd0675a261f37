"""The MQTT contract: topics and JSON payloads, each with a schema version and a JSON Schema.

Topics (``<prefix>`` is ``mqtt.topic_prefix``):

- ``<prefix>/<station>/<camera>/result``: every inspection (``result``), QoS ``result_qos``.
- ``<prefix>/<station>/reject``: a compact ``reject`` for fail and error verdicts only, meant
  for PLC logic. It shares ``result_id`` with its ``result``.
- ``<prefix>/<station>/status``: retained ``status``, ``online`` while connected, ``offline``
  as the last will and after a clean stop.
- ``<prefix>/<station>/events``: ``event`` messages (camera lost/back, model reloaded, overload,
  outbox near its bound ...).
- ``<prefix>/<station>/shadow``: ``shadow`` summaries of a candidate model running in shadow
  mode beside the live one (agreement, confusion, per-class disagreement; docs/lifecycle.md).

Delivery is at least once: subscribers de-duplicate by ``result_id`` (``event_id`` for events).
The schemas live in ``defectd/publish/schemas/<kind>.schema.json`` (draft 2020-12).
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator

from defectd.pipeline.inspection import Inspection, Verdict
from defectd.publish.config import check_topic_level

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/json"


class Kind(StrEnum):
    RESULT = "result"
    REJECT = "reject"
    STATUS = "status"
    EVENT = "event"
    TRIGGER = "trigger"  # received from the PLC, not published (``pipeline.parts``)
    SHADOW = "shadow"


# Events an operator or a PLC integrator can expect, with their default severity.
# ``publish_event`` accepts other names too (lower_snake_case).
EVENT_SEVERITY: dict[str, str] = {
    "camera_lost": "error",
    "camera_back": "info",
    "model_reloaded": "info",
    "overload": "warning",
    "outbox_near_bound": "warning",
    "outbox_dropped": "error",
    "broker_reconnected": "info",
    "broker_refused": "error",
    "publish_refused": "error",
    "outbox_store_failed": "error",
    "outbox_store_recovered": "info",
    "disk_space_low": "warning",
    "client_id_clash": "error",
    "drift_alarm": "warning",
    "drift_cleared": "info",
}


@dataclass(frozen=True, slots=True)
class Topics:
    """The topic names of one station under one prefix."""

    prefix: str
    station: str

    def __post_init__(self) -> None:
        check_topic_level(self.station, "station")

    def result(self, camera: str) -> str:
        return f"{self.prefix}/{self.station}/{camera}/result"

    def late(self, camera: str) -> str:
        """Verdicts that reached the broker after their part's gate: reconciliation only."""
        return f"{self.prefix}/{self.station}/{camera}/late"

    def trigger(self, camera: str) -> str:
        """Where the PLC announces parts to ``camera`` (subscribed, never published)."""
        return f"{self.prefix}/{self.station}/{camera}/trigger"

    @property
    def reject(self) -> str:
        return f"{self.prefix}/{self.station}/reject"

    @property
    def status(self) -> str:
        return f"{self.prefix}/{self.station}/status"

    @property
    def events(self) -> str:
        return f"{self.prefix}/{self.station}/events"

    @property
    def shadow(self) -> str:
        """Shadow mode's summaries (``defectd.daemon.shadow``)."""
        return f"{self.prefix}/{self.station}/shadow"


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """What the retained ``online`` status tells subscribers about the running station."""

    version: str
    model_name: str = ""
    model_sha256: str = ""
    config_hash: str = ""
    cameras: tuple[str, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


def timestamp(t: float) -> dict[str, Any]:
    """``{"iso": "2024-05-01T12:00:00.123456Z", "epoch": 1714564800.123456}`` (UTC)."""
    iso = datetime.fromtimestamp(t, UTC).isoformat(timespec="microseconds")
    return {"iso": iso.replace("+00:00", "Z"), "epoch": t}


def _defect(d: Any) -> dict[str, Any]:
    x, y, w, h = d.bbox
    cx, cy = d.centroid
    return {
        "area_px": int(d.area_px),
        "area_mm2": None if d.area_mm2 is None else float(d.area_mm2),
        "bbox": {"x": int(x), "y": int(y), "width": int(w), "height": int(h)},
        "centroid": {"x": float(cx), "y": float(cy)},
        "score_max": float(d.score_max),
        "score_mean": float(d.score_mean),
        "class": str(getattr(d, "cls", "defect")),
    }


def _verdict_fields(insp: Inspection) -> dict[str, Any]:
    """Which result this is, of which part, and its verdict: the fields that ``result`` and
    ``reject`` payloads share, in their order."""
    return {
        "result_id": insp.result_id,
        "station": insp.station,
        "camera": insp.camera,
        "seq": insp.seq,
        "part_id": insp.part_id,
        "verdict": insp.verdict.value,
        "rule": insp.rule,
        "reason": insp.reason,
    }


def _line_fields(insp: Inspection, late: bool) -> dict[str, Any]:
    return {
        "gate_deadline": None if insp.gate_deadline is None else timestamp(insp.gate_deadline),
        "late": late,
        "correlation": insp.correlation,
    }


def result_message(insp: Inspection, t_published: float, *, late: bool = False) -> dict[str, Any]:
    """The ``result`` payload of one inspection.

    ``t_published`` is when the result was committed to the outbox for publishing (a re-send
    after a reconnect keeps it); ``t_grab`` is the wall-clock time of the grab. ``late`` marks
    a verdict that missed its part's gate (``gate_deadline``): it goes to the ``late`` topic.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": Kind.RESULT.value,
        **_verdict_fields(insp),
        "defects": [_defect(d) for d in insp.defects],
        "model": {"name": insp.model_name, "sha256": insp.model_sha256},
        "config_hash": insp.config_hash,
        "t_grab": timestamp(insp.t_grab_wall),
        "t_published": timestamp(t_published),
        "latencies_ms": {k: float(v) for k, v in insp.latencies_ms.items()},
        "image_shape": [int(s) for s in insp.image_shape],
        **_line_fields(insp, late),
    }


def reject_message(insp: Inspection, t_published: float) -> dict[str, Any]:
    """The compact ``reject`` payload for a fail or error verdict (what the reject gate needs)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": Kind.REJECT.value,
        **_verdict_fields(insp),
        "t_grab": timestamp(insp.t_grab_wall),
        "t_published": timestamp(t_published),
        **_line_fields(insp, False),
    }


def mark_late(payload: bytes) -> bytes:
    """A result payload re-encoded with ``late: true`` (for the ``late`` topic)."""
    message = json.loads(payload)
    message["late"] = True
    return encode(message)


def is_reject(insp: Inspection) -> bool:
    """Fail and error verdicts are rejects (error is fail-safe: the part cannot be trusted)."""
    return insp.verdict in (Verdict.FAIL, Verdict.ERROR)


def status_message(
    station: str, state: str, info: StatusInfo | None, t: float, reason: str | None = None
) -> dict[str, Any]:
    """The retained ``status`` payload; ``state`` is ``online`` or ``offline``.

    For the last will, ``t`` is when the will was registered (the connect), and ``reason`` is
    ``connection_lost``; a clean stop says ``stopped``.
    """
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": Kind.STATUS.value,
        "station": station,
        "state": state,
        "reason": reason,
        "t": timestamp(t),
        "version": info.version if info else None,
        "model": (
            {"name": info.model_name, "sha256": info.model_sha256}
            if info and info.model_name
            else None
        ),
        "config_hash": info.config_hash if info and info.config_hash else None,
        "cameras": list(info.cameras) if info else [],
        "extra": dict(info.extra) if info else {},
    }


def event_message(
    station: str, event: str, severity: str, data: dict[str, Any], t: float
) -> dict[str, Any]:
    """An ``event`` payload; ``data`` holds the event's own fields (JSON values)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": Kind.EVENT.value,
        "event_id": uuid.uuid4().hex,
        "station": station,
        "event": event,
        "severity": severity,
        "t": timestamp(t),
        "data": data,
    }


def shadow_message(station: str, summary: dict[str, Any], t: float) -> dict[str, Any]:
    """A ``shadow`` payload: shadow mode's running summary (``summary``: JSON values, the
    fields of ``shadow.schema.json`` after the envelope)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": Kind.SHADOW.value,
        "message_id": uuid.uuid4().hex,
        "station": station,
        "t": timestamp(t),
        **summary,
    }


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def encode(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON. NaN/inf (not JSON) become null rather than losing the message."""
    try:
        text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(message), separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


@cache
def load_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one message kind, from the package data."""
    Kind(kind)  # ValueError on an unknown kind
    text = resources.files("defectd.publish").joinpath(f"schemas/{kind}.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def schema_errors(kind: str, message: Any) -> list[str]:
    """Every way ``message`` breaks the schema of ``kind`` (empty when it is valid)."""
    validator = Draft202012Validator(load_schema(kind))
    return [
        f"{'/'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in validator.iter_errors(message)
    ]
