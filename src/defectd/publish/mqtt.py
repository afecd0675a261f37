"""The MQTT publisher: results from the outbox to the broker, at least once, in order.

One named thread (``mqtt-publisher-<station>``) owns the paho client and the outbox's reading
side. ``submit`` only encodes the messages and commits them to the outbox (tens of µs), then
wakes that thread; it never waits for the network. The thread:

- connects with clean start off and a session expiry (MQTT 5) or clean session off (3.1.1),
  a retained ``offline`` last will, and publishes a retained ``online`` status on every connect;
- reconnects with exponential backoff and jitter; a broker that is down at start is not an
  error (results wait in the outbox);
- publishes pending rows in id order with at most ``max_inflight`` unacknowledged, maps each
  PUBACK back to its row and removes the row; after a reconnect paho re-sends the messages
  that were in flight (DUP set) and publishing resumes where it stopped; after a restart every
  row of the outbox is published again from the oldest;
- reports a refused connection (CONNACK reason code) or a refused publish (MQTT 5 PUBACK reason
  code, e.g. an ACL denial) as an error log and an event naming the reason code; a refused row
  stays in the outbox and is tried again later.

The thread runs paho's network loop by hand (``loop_read``/``loop_write``/``loop_misc`` on a
``select`` over the client's socket and a wake-up socket) rather than ``loop_start``: the same
thread then owns the outbox reads, the reconnect schedule and the drain deadline, so no lock
is shared with a paho thread and ``submit`` wakes it at once.

The broker password lives only in a ``SecretStr`` and is handed to paho at connect: it is
never a log field, never in ``stats()`` and never in a repr.

This module is over 600 lines on purpose: connection state, sending, acknowledgement and
shutdown are steps of the one publisher thread and read best together; the message formats
(``messages``), the outbox (``outbox``) and the settings (``config``) live apart.

Times are read from the ``Clock`` it is given (``clock``, monotonic: backoff, deadlines) and
``wall_clock`` (message timestamps, outbox row ages).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from defectd import __version__
from defectd.clock import SYSTEM_CLOCK, Clock
from defectd.errors import ConfigError, PublishError
from defectd.log import get_logger
from defectd.pipeline.inspection import Inspection
from defectd.pipeline.parts import expiry_interval_s, is_late
from defectd.publish import messages as m
from defectd.publish.config import MqttConfig, OutboxConfig, check_topic_level
from defectd.publish.connection import (
    MessageProperties,
    backoff_delay,
    connect_options,
    describe_reason,
    make_client,
)
from defectd.publish.failsafe import (
    DirectMessage,
    DirectQueue,
    NotDurableError,
    failsafe_inspection,
    failsafe_messages,
)
from defectd.publish.outbox import (
    PRIORITY_DROP_FIRST,
    PRIORITY_KEEP,
    Outbox,
    OutboxMessage,
    OutboxRow,
)
from defectd.publish.takeover import TakeoverDetector

log = get_logger(__name__)

_HOUSEKEEPING_S = 1.0
_REFUSED_RETRY_S = 30.0
_EVENT_MIN_INTERVAL_S = 10.0
_LATENCY_WINDOW = 10_000
_RESULT_KINDS = (m.Kind.RESULT.value, m.Kind.REJECT.value)
_SCHEMA_VERSION = str(m.SCHEMA_VERSION)
# The user property that carries a message's id, by kind (results and rejects: result_id).
_ID_PROPERTY = {m.Kind.EVENT.value: "event_id", m.Kind.SHADOW.value: "message_id"}


class Link(Enum):
    """The publisher thread's connection to the broker: down -> connecting -> up -> down."""

    DOWN = "down"  # no connection; the next attempt is due at ``_next_attempt``
    CONNECTING = "connecting"  # CONNECT sent, waiting for CONNACK (bounded)
    UP = "up"  # CONNACK received: the outbox is being sent


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Counters of one publisher since ``start`` (depth and age are of the outbox file)."""

    connected: bool
    outbox_depth: int
    oldest_age_s: float | None
    submitted: int  # inspections handed to submit()
    published: int  # PUBLISH calls, re-sends after a restart included
    acked: int  # rows acknowledged by the broker and removed from the outbox
    dropped: int  # rows dropped at the outbox bound or by age
    dropped_rejects: int  # of which fail/error results and rejects
    refused: int  # PUBACKs with a failure reason code (e.g. ACL denial)
    inflight: int
    connects: int
    connect_failures: int
    near_bound: bool
    near_bound_warnings: int
    last_error: str | None  # the most recent error (kept after recovery; see connected)
    ack_latency_ms_p50: float | None  # submit -> PUBACK, last 10,000 messages
    ack_latency_ms_p99: float | None
    # Age of the oldest result or reject still waiting for its PUBACK (None: none waiting).
    oldest_result_age_s: float | None = None
    outbox_fault: str | None = None  # "disk_full", "damaged", "io" (see Outbox.fault)
    outbox_fault_detail: str | None = None
    outbox_free_bytes: int | None = None  # free space on the outbox's file system
    # Verdicts that missed their part's gate: results sent to the late topic instead, and
    # their rejects (and response-topic copies), which are then not sent at all.
    late: int = 0
    late_withheld: int = 0
    # The fail-safe path (``publish.failsafe``): verdicts the outbox could not store, whether
    # storing fails now (until a store succeeds again) and the direct publishes it made.
    not_durable: int = 0
    store_failing: bool = False
    store_error: str | None = None
    direct_queued: int = 0
    direct_acked: int = 0
    direct_dropped: int = 0
    # Another client is using this station's client id (see publish.takeover): disconnects
    # attributed to it, and whether the clash is going on now.
    client_id_clashes: int = 0
    client_id_clash: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Inflight:
    row_id: int
    kind: str
    topic: str
    message_id: str | None
    created: float


class Publisher:
    """Publishes inspections, events and the station status to MQTT through a durable outbox.

    Life cycle: ``start()`` -> ``submit()``/``publish_event()`` from any thread -> ``stop()``.
    Raises ``ConfigError`` at construction when the station id cannot be a topic level or the
    password file/variable is missing, ``PublishError`` from ``start`` when the outbox cannot be
    opened (e.g. another process holds it).
    """

    def __init__(
        self,
        config: MqttConfig,
        outbox_config: OutboxConfig,
        station: str,
        *,
        status: m.StatusInfo | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        try:
            check_topic_level(station, "station")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._config = config
        self._outbox_config = outbox_config
        self._station = station
        self._topics = m.Topics(config.topic_prefix, station)
        self._client_id = config.client_id_for(station)
        self._password = config.read_password()
        self._rng = rng if rng is not None else random.Random()
        self._clock = wall_clock
        self._mono = clock
        self._status_info = status or m.StatusInfo(version=__version__)
        self._v5 = config.protocol == "5"

        self._outbox: Outbox | None = None
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._drain_deadline = 0.0
        self._lock = threading.Lock()  # submit counters and status info
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._checked_cameras: set[str] = set()
        self._direct = DirectQueue()
        self._not_durable = 0
        self._store_failing_since: float | None = None
        self._store_error: str | None = None
        self._last_alarm = 0.0

        # Publisher-thread state.
        self._state = Link.DOWN  # owned by the publisher thread
        self._attempt = 0
        self._next_attempt = 0.0
        self._connecting_since = 0.0
        self._down_since: float | None = None
        self._cursor = 0
        self._inflight: dict[int, _Inflight] = {}
        self._direct_inflight: dict[int, str] = {}
        self._direct_acked = 0
        self._acks: list[int] = []
        self._refusals: list[tuple[_Inflight, ReasonCode]] = []
        self._parked: dict[int, float] = {}
        self._connack: tuple[bool, ReasonCode, bool] | None = None
        self._disconnect_reason: ReasonCode | None = None
        self._status_dirty = False
        self._refused_streak: str | None = None
        self._takeover = TakeoverDetector()
        self._last_refusal_event = 0.0
        self._last_housekeeping = 0.0
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._lat_lock = threading.Lock()
        self._offline_mid: int | None = None
        self._offline_acked = False

        self._submitted = 0
        self._published = 0
        self._acked = 0
        self._refused = 0
        self._late = 0
        self._late_withheld = 0
        self._connects = 0
        self._connect_failures = 0
        self._last_error: str | None = None

    # -- public API ------------------------------------------------------------------------
    @property
    def topics(self) -> m.Topics:
        return self._topics

    @property
    def client_id(self) -> str:
        return self._client_id

    def start(self) -> None:
        """Open the outbox and start the publisher thread; connecting happens in that thread."""
        if self._thread is not None:
            raise PublishError("publisher already started")
        self._outbox = Outbox(self._outbox_config, clock=self._clock)
        self._client = self._make_client()
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-publisher-{self._station}", daemon=True
        )
        self._thread.start()
        log.info(
            "publisher_started",
            station=self._station,
            host=self._config.host,
            port=self._config.port,
            protocol=self._config.protocol,
            tls=self._config.tls is not None,
            client_id=self._client_id,
            outbox=str(self._outbox.path),
            pending=self._outbox.depth,
        )

    def submit(self, inspection: Inspection) -> None:
        """Commit the ``result`` (and for fail/error the ``reject``) to the outbox; returns once
        they are durable. Never waits for the network.

        Raises ``NotDurableError`` when the outbox cannot store them: the verdict's fail-safe
        reject (a pass becomes ``error:not_durable``) is then queued for a direct, best-effort
        publish flagged ``not_durable``, and an ``outbox_store_failed`` alarm event with it.
        Raises ``PublishError`` when the publisher is not started, ``ConfigError`` when the
        camera id cannot be a topic level.
        """
        outbox = self._require_outbox()
        camera = inspection.camera
        if camera not in self._checked_cameras:
            try:
                check_topic_level(camera, "camera")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            self._checked_cameras.add(camera)
        now = self._clock()
        reject = m.is_reject(inspection)
        priority = PRIORITY_KEEP if reject else PRIORITY_DROP_FIRST
        qos = self._config.result_qos
        result = m.result_message(inspection, now)
        gate = _gate_of_message(result)  # the publisher reads it back without decoding
        rows = [
            OutboxMessage(
                self._topics.result(camera),
                m.encode(result),
                qos,
                False,
                priority,
                m.Kind.RESULT.value,
                inspection.result_id,
                gate,
            )
        ]
        if reject:
            rows.append(
                OutboxMessage(
                    self._topics.reject,
                    m.encode(m.reject_message(inspection, now)),
                    max(qos, 1),
                    False,
                    PRIORITY_KEEP,
                    m.Kind.REJECT.value,
                    inspection.result_id,
                    gate,
                )
            )
        if inspection.response_topic is not None:
            # MQTT 5 request/response: the trigger named where its answer goes.
            rows.append(replace(rows[0], topic=inspection.response_topic, qos=max(qos, 1)))
        try:
            outbox.put_many(rows)
        except PublishError as exc:
            self._failsafe(inspection, str(exc), now)
            raise NotDurableError(
                f"verdict {inspection.result_id} of camera {camera} is not stored durably; its"
                f" reject was sent directly (not_durable): {exc}"
            ) from exc
        with self._lock:
            self._submitted += 1
            recovered = self._store_failing_since is not None
        if recovered:
            self._store_recovered()
        self._wake()

    def _failsafe(self, inspection: Inspection, error: str, now: float) -> None:
        """Queue the fail-safe reject of a verdict that could not be stored, and the alarm."""
        safe = failsafe_inspection(inspection, error)
        for topic, payload in failsafe_messages(safe, self._topics, now):
            kind = m.Kind.REJECT.value if topic == self._topics.reject else m.Kind.RESULT.value
            self._direct.put(DirectMessage(topic, payload, kind))
        mono = self._mono.monotonic()
        with self._lock:
            self._submitted += 1
            self._not_durable += 1
            first = self._store_failing_since is None
            if first:
                self._store_failing_since = mono
            self._store_error = error
            alarm = first or mono - self._last_alarm >= _EVENT_MIN_INTERVAL_S
            if alarm:
                self._last_alarm = mono
            count = self._not_durable
        if alarm:
            log.error(
                "outbox_store_failed",
                camera=inspection.camera,
                result_id=inspection.result_id,
                not_durable=count,
                error=error,
            )
            event = m.event_message(
                self._station,
                "outbox_store_failed",
                "error",
                {"error": error, "not_durable": count, "camera": inspection.camera},
                now,
            )
            self._direct.put(DirectMessage(self._topics.events, m.encode(event), "event"))
        self._wake()

    def _store_recovered(self) -> None:
        with self._lock:
            since, self._store_failing_since = self._store_failing_since, None
            count = self._not_durable
        if since is None:
            return
        outage = round(self._mono.monotonic() - since, 3)
        log.info("outbox_store_recovered", outage_s=outage, not_durable=count)
        self._event("outbox_store_recovered", outage_s=outage, not_durable=count)

    def publish_event(self, kind: str, *, severity: str | None = None, **fields: Any) -> None:
        """Queue an ``event`` (e.g. ``camera_lost``, camera="cam0") through the outbox.

        ``fields`` must be JSON values. ``severity`` defaults from ``messages.EVENT_SEVERITY``
        (``info`` for other kinds). Raises ``PublishError`` when not started.
        """
        outbox = self._require_outbox()
        sev = severity or m.EVENT_SEVERITY.get(kind, "info")
        msg = m.event_message(self._station, kind, sev, dict(fields), self._clock())
        self._put_droppable(outbox, self._topics.events, msg, m.Kind.EVENT, msg["event_id"])

    def publish_shadow(self, summary: dict[str, Any]) -> None:
        """Queue a ``shadow`` summary (``messages.shadow_message``) through the outbox, as
        droppable as an event. Raises ``PublishError`` when not started."""
        outbox = self._require_outbox()
        msg = m.shadow_message(self._station, summary, self._clock())
        self._put_droppable(outbox, self._topics.shadow, msg, m.Kind.SHADOW, msg["message_id"])

    def _put_droppable(
        self, outbox: Outbox, topic: str, msg: dict[str, Any], kind: m.Kind, message_id: str
    ) -> None:
        """Queue ``msg`` (QoS 1, not retained) among the rows the outbox drops first when full,
        and wake the publisher thread."""
        outbox.put(
            topic,
            m.encode(msg),
            1,
            False,
            priority=PRIORITY_DROP_FIRST,
            kind=kind.value,
            message_id=message_id,
        )
        self._wake()

    def set_status(self, info: m.StatusInfo) -> None:
        """What the retained ``online`` status says; published now when connected, else at
        the next connect."""
        with self._lock:
            self._status_info = info
            self._status_dirty = True
        self._wake()

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Publish what can be published within ``drain_timeout_s``, publish the retained
        ``offline`` status, disconnect cleanly and close the outbox. What is left stays in the
        outbox for the next start. Idempotent."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._drain_deadline = self._mono.monotonic() + max(0.0, drain_timeout_s)
            self._stopping.set()
            self._wake()
            thread.join(drain_timeout_s + self._config.connect_timeout_s + 5.0)
            if thread.is_alive():
                log.error("publisher_thread_stuck", thread=thread.name)
        if self._outbox is not None:
            self._outbox.close()
        for s in (self._wake_r, self._wake_w):
            s.close()

    def stats(self) -> PublisherStats:
        """A snapshot of counters (cheap; safe from any thread, e.g. a metrics endpoint)."""
        ob = self._outbox.stats() if self._outbox is not None else None
        with self._lat_lock:
            lat = sorted(self._latencies)
        p50 = lat[len(lat) // 2] if lat else None
        p99 = lat[min(len(lat) - 1, math.ceil(len(lat) * 0.99) - 1)] if lat else None
        return PublisherStats(
            connected=self._state is Link.UP,
            outbox_depth=ob.depth if ob else 0,
            oldest_age_s=ob.oldest_age_s if ob else None,
            submitted=self._submitted,
            published=self._published,
            acked=self._acked,
            dropped=ob.dropped if ob else 0,
            dropped_rejects=ob.dropped_keep if ob else 0,
            refused=self._refused,
            inflight=len(self._inflight),
            connects=self._connects,
            connect_failures=self._connect_failures,
            near_bound=ob.near_bound if ob else False,
            near_bound_warnings=ob.near_bound_warnings if ob else 0,
            last_error=self._last_error,
            ack_latency_ms_p50=p50,
            ack_latency_ms_p99=p99,
            oldest_result_age_s=(
                self._outbox.oldest_age_s(_RESULT_KINDS) if self._outbox is not None else None
            ),
            outbox_fault=ob.fault.kind if ob and ob.fault else None,
            outbox_fault_detail=ob.fault.detail if ob and ob.fault else None,
            outbox_free_bytes=ob.free_bytes if ob else None,
            late=self._late,
            not_durable=self._not_durable,
            store_failing=self._store_failing_since is not None,
            store_error=self._store_error,
            direct_queued=len(self._direct),
            direct_acked=self._direct_acked,
            direct_dropped=self._direct.dropped,
            late_withheld=self._late_withheld,
            client_id_clashes=self._takeover.clashes,
            client_id_clash=self._takeover.active,
        )

    # -- helpers for callers' threads --------------------------------------------------------
    def _require_outbox(self) -> Outbox:
        if self._outbox is None:
            raise PublishError("publisher not started: call start() before submit()")
        return self._outbox

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # -- the publisher thread ----------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        client = make_client(
            self._config,
            self._client_id,
            password=self._password,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        client.max_inflight_messages_set(self._config.max_inflight + 16)
        client.max_queued_messages_set(0)
        will = m.status_message(
            self._station, "offline", self._status_info, self._clock(), "connection_lost"
        )
        client.will_set(
            self._topics.status,
            m.encode(will),
            qos=1,
            retain=True,
            properties=self._props(m.Kind.STATUS.value, None, will_message=True),
        )
        client.on_publish = self._on_publish
        client.connect_async(**connect_options(self._config))
        return client

    def _props(
        self,
        kind: str,
        message_id: str | None,
        *,
        will_message: bool = False,
        expiry_s: int | None = None,
        correlation: bytes | None = None,
    ) -> Properties | None:
        if not self._v5:
            return None
        user = [("schema_version", _SCHEMA_VERSION), ("kind", kind)]
        if message_id is not None:
            user.append((_ID_PROPERTY.get(kind, "result_id"), message_id))
        return MessageProperties(
            PacketTypes.WILLMESSAGE if will_message else PacketTypes.PUBLISH,
            content_type=m.CONTENT_TYPE,
            payload_format=1,
            user=user,
            expiry_s=expiry_s,
            correlation=correlation,
        )

    # paho callbacks run inside loop_read/loop_write on the publisher thread: record only.
    def _on_connect(self, client: mqtt.Client, reason_code: ReasonCode, session: bool) -> None:
        self._connack = (not reason_code.is_failure, reason_code, session)

    def _on_disconnect(self, reason_code: ReasonCode) -> None:
        self._disconnect_reason = reason_code

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if mid == self._offline_mid:
            self._offline_acked = True
            return
        if self._direct_inflight.pop(mid, None) is not None:
            self._direct_acked += int(not reason_code.is_failure)
            return
        entry = self._inflight.pop(mid, None)
        if entry is None:  # the online status
            return
        if reason_code.is_failure:
            self._refusals.append((entry, reason_code))
        else:
            self._acks.append(entry.row_id)
            with self._lat_lock:
                self._latencies.append((self._clock() - entry.created) * 1000.0)

    def _run(self) -> None:
        assert self._client is not None and self._outbox is not None
        while True:
            try:
                if self._stopping.is_set() and (
                    self._mono.monotonic() >= self._drain_deadline
                    or (
                        self._outbox.depth == 0
                        and not self._inflight
                        and not self._direct_inflight
                        and not len(self._direct)
                    )
                ):
                    break
                self._step(self._client, self._outbox)
            except PublishError as exc:
                # The outbox logged and recorded its fault (rate-limited); wait and try again.
                log.debug("publisher_outbox_error", error=str(exc))
                self._stopping.wait(0.5)
            except Exception:
                log.exception("publisher_loop_error")
                self._stopping.wait(0.5)
        self._shutdown(self._client, self._outbox)

    def _step(self, client: mqtt.Client, outbox: Outbox) -> None:
        now = self._mono.monotonic()
        if self._state is Link.DOWN and now >= self._next_attempt:
            self._try_connect(client, now)
        elif self._state is Link.CONNECTING and now - self._connecting_since > (
            self._config.connect_timeout_s + 1.0
        ):
            self._connection_failed("no CONNACK from the broker in time", now)
        if self._state is Link.UP:
            with self._lock:
                dirty, self._status_dirty = self._status_dirty, False
            if dirty:
                self._publish_online(client)
            self._pump_direct(client)
            self._pump(client, outbox)

        sock = client.socket() if self._state is not Link.DOWN else None
        rlist: list[Any] = [self._wake_r]
        wlist: list[Any] = []
        timeout = _HOUSEKEEPING_S
        if self._state is Link.DOWN:
            timeout = min(timeout, max(0.0, self._next_attempt - now))
        if self._stopping.is_set():
            timeout = min(timeout, 0.05)
        pending_tls = 0
        if sock is not None:
            rlist.append(sock)
            if client.want_write():
                wlist.append(sock)
            pending = getattr(sock, "pending", None)
            if pending is not None:
                pending_tls = int(pending())
                if pending_tls:
                    timeout = 0.0
        readable, writable, _ = select.select(rlist, wlist, [], timeout)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(65536)
        if sock is not None:
            if sock in readable or pending_tls:
                client.loop_read()
            if client.socket() is sock and (sock in writable or client.want_write()):
                client.loop_write()
            if client.socket() is sock:
                client.loop_misc()
        self._after_network(client, outbox)
        if self._mono.monotonic() - self._last_housekeeping >= _HOUSEKEEPING_S:
            self._last_housekeeping = self._mono.monotonic()
            self._housekeeping(outbox)

    def _try_connect(self, client: mqtt.Client, now: float) -> None:
        self._connack = None
        self._disconnect_reason = None
        try:
            rc = client.reconnect()
        except (OSError, ValueError) as exc:
            # ValueError: ssl.CertificateError on older Pythons; OSError covers refused,
            # unreachable, timeouts and TLS handshake failures (certificate, hostname).
            self._connection_failed(_describe_exc(exc), now)
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._connection_failed(describe_reason(rc), now)
            return
        self._state = Link.CONNECTING
        self._connecting_since = now

    def _connection_failed(self, why: str, now: float, refused: bool = False) -> None:
        first = self._attempt == 0
        self._connect_failures += 1
        delay = backoff_delay(
            self._attempt, self._config.reconnect_min_s, self._config.reconnect_max_s, self._rng
        )
        self._attempt += 1
        self._next_attempt = now + delay
        self._state = Link.DOWN
        if self._down_since is None:
            self._down_since = now
        self._last_error = why
        fields = {
            "host": self._config.host,
            "port": self._config.port,
            "reason": why,
            "attempt": self._attempt,
            "retry_in_s": round(delay, 2),
        }
        if refused:
            log.error("broker_refused", client_id=self._client_id, **fields)
        elif first:
            log.warning("broker_unreachable", **fields)
        else:
            log.info("broker_unreachable", **fields)

    def _after_network(self, client: mqtt.Client, outbox: Outbox) -> None:
        now = self._mono.monotonic()
        connack, self._connack = self._connack, None
        if connack is not None:
            ok, rc, session_present = connack
            if ok:
                self._connected(client, outbox, session_present, now)
            else:
                why = f"broker refused the connection: {describe_reason(rc)}"
                if rc.value in (134, 135):  # bad user name or password, not authorized
                    who = self._config.username or "anonymous"
                    why += f" (user {who!r}: check mqtt.username, the password and the broker ACL)"
                self._connection_failed(why, now, refused=True)
                if self._refused_streak != why:
                    self._refused_streak = why
                    self._event(
                        "broker_refused",
                        reason_code=rc.value,
                        reason=rc.getName(),
                        host=self._config.host,
                    )
                self._disconnect_reason = None  # paho reports the refusal once more as a disconnect
        reason, self._disconnect_reason = self._disconnect_reason, None
        if reason is not None and self._state is not Link.DOWN:
            was_up = self._state is Link.UP
            clash = self._takeover.disconnected(reason.value, now) if was_up else None
            self._connection_failed(f"connection lost: {describe_reason(reason)}", now)
            if clash is not None:
                self._report_clash(clash, describe_reason(reason))
            if was_up:
                log.warning(
                    "broker_disconnected",
                    reason=describe_reason(reason),
                    inflight=len(self._inflight),
                    pending=outbox.depth,
                )
        if self._acks:
            acks, self._acks = self._acks, []
            try:
                self._acked += outbox.ack(acks)
            except PublishError:
                # Delivered but still stored (e.g. disk full): try again on the next pass;
                # the outbox reports its fault. A restart would only send them again.
                self._acks = acks + self._acks
        if self._refusals:
            refusals, self._refusals = self._refusals, []
            self._handle_refusals(refusals, now)

    def _connected(
        self, client: mqtt.Client, outbox: Outbox, session_present: bool, now: float
    ) -> None:
        outage = None if self._down_since is None or self._connects == 0 else now - self._down_since
        self._state = Link.UP
        self._attempt = 0
        self._down_since = None
        self._connects += 1
        self._refused_streak = None
        self._takeover.connected(now)
        log.info(
            "broker_connected",
            host=self._config.host,
            port=self._config.port,
            session_present=session_present,
            pending=outbox.depth,
            inflight=len(self._inflight),
        )
        self._publish_online(client)
        if outage is not None:
            self._event("broker_reconnected", outage_s=round(outage, 3), pending=outbox.depth)

    def _publish_online(self, client: mqtt.Client) -> None:
        with self._lock:
            info = self._status_info
            self._status_dirty = False
        msg = m.status_message(self._station, "online", info, self._clock())
        client.publish(
            self._topics.status,
            m.encode(msg),
            qos=1,
            retain=True,
            properties=self._props(m.Kind.STATUS.value, None),
        )

    def _pump(self, client: mqtt.Client, outbox: Outbox) -> None:
        free = self._config.max_inflight - len(self._inflight)
        if free <= 0:
            return
        if self._parked:
            now = self._mono.monotonic()
            due = [rid for rid, t in self._parked.items() if t <= now][:free]
            if due:
                for rid in due:
                    del self._parked[rid]
                for row in outbox.get(due):
                    self._publish_row(client, outbox, row)
                free = self._config.max_inflight - len(self._inflight)
        while free > 0:
            rows = outbox.pending(self._cursor, free)
            if not rows:
                return
            for row in rows:
                if row.id in self._parked:
                    self._cursor = row.id
                    continue
                if not self._publish_row(client, outbox, row):
                    return
                self._cursor = row.id
            free = self._config.max_inflight - len(self._inflight)

    def _pump_direct(self, client: mqtt.Client) -> None:
        """Publish the fail-safe messages (QoS 1, not in the outbox: best effort)."""
        for msg in self._direct.take(100):
            info = client.publish(
                msg.topic, msg.payload, qos=1, retain=False, properties=self._props(msg.kind, None)
            )
            if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self._direct_inflight[info.mid] = msg.kind
                self._published += 1
            else:
                log.error("publish_failed", topic=msg.topic, reason=describe_reason(info.rc))

    def _publish_row(self, client: mqtt.Client, outbox: Outbox, row: OutboxRow) -> bool:
        topic, payload = row.topic, row.payload
        gate_expiry: int | None = None
        correlation: str | None = None
        if row.kind in _RESULT_KINDS:
            gate = row.note if isinstance(row.note, _Gate) else _gate_of(payload)
            deadline, correlation, camera = gate
            now = self._clock()
            if is_late(deadline, now):
                if row.kind == m.Kind.RESULT.value and topic == self._topics.result(camera):
                    # Missed its gate: for reconciliation only, never on result or reject.
                    topic, payload = self._topics.late(camera), m.mark_late(payload)
                    self._late += 1
                else:
                    self._late_withheld += 1
                    log.warning("late_verdict_withheld", topic=topic, result_id=row.message_id)
                    self._acked += outbox.ack([row.id])
                    return True
            else:
                gate_expiry = expiry_interval_s(deadline, now)
        expiry_s = None
        if self._config.message_expiry_s is not None and not row.retain:
            left = self._config.message_expiry_s - (self._clock() - row.created)
            expiry_s = max(1, math.ceil(left))
        if gate_expiry is not None:
            # The verdict is worthless once its part has passed the gate.
            expiry_s = gate_expiry if expiry_s is None else min(gate_expiry, expiry_s)
        props = self._props(
            row.kind,
            row.message_id,
            expiry_s=expiry_s,
            correlation=bytes.fromhex(correlation) if correlation else None,
        )
        info = client.publish(topic, payload, qos=row.qos, retain=row.retain, properties=props)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            # NO_CONN: paho keeps the message and sends it after the reconnect.
            log.error("publish_failed", topic=row.topic, reason=describe_reason(info.rc))
            return False
        self._published += 1
        if row.qos == 0:
            # At most once by configuration: handed to the client is as good as it gets.
            self._acked += outbox.ack([row.id])
        else:
            self._inflight[info.mid] = _Inflight(
                row.id, row.kind, row.topic, row.message_id, row.created
            )
        return True

    def _handle_refusals(self, refusals: list[tuple[_Inflight, ReasonCode]], now: float) -> None:
        for entry, rc in refusals:
            self._refused += 1
            self._parked[entry.row_id] = now + _REFUSED_RETRY_S
            self._last_error = f"broker refused a publish on {entry.topic}: {describe_reason(rc)}"
            log.error(
                "publish_refused",
                topic=entry.topic,
                kind=entry.kind,
                result_id=entry.message_id,
                reason_code=rc.value,
                reason=rc.getName(),
                retry_in_s=_REFUSED_RETRY_S,
            )
        # An event about a refused event could itself be refused: report results only.
        result_refusals = [(e, rc) for e, rc in refusals if e.kind != m.Kind.EVENT.value]
        if result_refusals and now - self._last_refusal_event >= _EVENT_MIN_INTERVAL_S:
            self._last_refusal_event = now
            entry, rc = result_refusals[0]
            self._event(
                "publish_refused",
                topic=entry.topic,
                reason_code=rc.value,
                reason=rc.getName(),
                count=len(result_refusals),
            )

    def _housekeeping(self, outbox: Outbox) -> None:
        self._takeover.settled(time.monotonic())
        outbox.maintain()
        if outbox.check_near_bound():
            cfg = outbox.config
            self._event(
                "outbox_near_bound",
                depth=outbox.depth,
                max_rows=cfg.max_rows,
                oldest_age_s=round(outbox.oldest_age_s() or 0.0, 1),
                max_age_s=cfg.max_age_s,
            )
        drops = outbox.take_drops()
        if drops is not None:
            self._event(
                "outbox_dropped",
                rows=drops.rows,
                rejects=drops.keep_rows,
                expired=drops.expired,
                result_ids=list(drops.keep_ids),
            )

    def _report_clash(self, evidence: str, reason: str) -> None:
        """Name a client-id clash once per streak: an error line and a ``client_id_clash``
        event (published once a connection holds long enough)."""
        log.error(
            "client_id_clash",
            client_id=self._client_id,
            station=self._station,
            evidence=evidence,
            reason=reason,
            fix="another client connects with this client id, e.g. a second station with the "
            "same station id: give every station its own station id or mqtt.client_id",
        )
        self._event("client_id_clash", client_id=self._client_id, evidence=evidence, reason=reason)

    def _event(self, kind: str, **fields: Any) -> None:
        try:
            self.publish_event(kind, **fields)
        except PublishError as exc:
            log.error("event_not_stored", event_kind=kind, error=str(exc))

    def _shutdown(self, client: mqtt.Client, outbox: Outbox) -> None:
        if self._state is Link.UP:
            msg = m.status_message(
                self._station, "offline", self._status_info, self._clock(), "stopped"
            )
            info = client.publish(
                self._topics.status,
                m.encode(msg),
                qos=1,
                retain=True,
                properties=self._props(m.Kind.STATUS.value, None),
            )
            self._offline_mid = info.mid
            deadline = self._mono.monotonic() + 2.0
            while (
                not self._offline_acked
                and self._mono.monotonic() < deadline
                and self._state is Link.UP
            ):
                self._network_once(client, 0.05)
                self._after_network(client, outbox)
            client.disconnect()
            deadline = self._mono.monotonic() + 1.0
            while client.socket() is not None and self._mono.monotonic() < deadline:
                self._network_once(client, 0.05)
        self._state = Link.DOWN
        log.info(
            "publisher_stopped",
            station=self._station,
            pending=outbox.depth,
            published=self._published,
            acked=self._acked,
            offline_published=self._offline_acked,
        )

    def _network_once(self, client: mqtt.Client, timeout: float) -> None:
        sock = client.socket()
        if sock is None:
            return
        wlist = [sock] if client.want_write() else []
        readable, writable, _ = select.select([sock], wlist, [], timeout)
        if readable:
            client.loop_read()
        if client.socket() is sock and (writable or client.want_write()):
            client.loop_write()


class _Gate(NamedTuple):
    """What the publisher needs of a result or reject to send it on time."""

    deadline: float | None  # the part's gate (epoch s)
    correlation: str | None  # the trigger's correlation data (hex)
    camera: str


def _gate_of(payload: bytes) -> _Gate:
    """The gate of a stored result or reject payload (rows read back from the outbox file),
    so that rows written before a restart are judged the same way as fresh ones."""
    try:
        return _gate_of_message(json.loads(payload))
    except ValueError:
        return _Gate(None, None, "")


def _gate_of_message(message: Any) -> _Gate:
    try:
        gate = message.get("gate_deadline")
        deadline = float(gate["epoch"]) if isinstance(gate, dict) else None
        correlation = message.get("correlation")
        return _Gate(
            deadline, correlation if isinstance(correlation, str) else None, message["camera"]
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return _Gate(None, None, "")


def _describe_exc(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"
