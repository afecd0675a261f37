"""The station's OPC UA server: asyncua on its own thread and event loop (docs/opcua.md).

Address space (namespace ``urn:defectd:<station>``, string node ids ``<station>/<path>``)::

    Objects/<station>                      events: VerdictEventType (one per part), HistoryRead
      Status, Live, Ready, Health, ModelName, ModelSha256, Engine, ConfigHash,
      OutboxDepth, BrokerConnected, LastSequence
      Counters/   Results, Pass, Fail, Error, Late, EventsDropped
      Cameras/<camera>/
        LastSequence, LastPartId, LastResultId, LastVerdict, LastVerdictCode, LastRule,
        LastReason, LastDefects, LastDefectsJson, LastModelSha256, LastTime,
        LastGateDeadline, LastLate, LastLatencyMs
        Counters/  Results, Pass, Fail, Error, Late
        Recent/    Sequences, PartIds, VerdictCodes, Verdicts, ResultIds  (newest first)
        Trigger(PartId, GateDeadline, GateMs) -> (Accepted, Message)

The result path never waits for this server: ``submit`` (from pipeline threads) puts a record
in a bounded ``VerdictQueue`` and returns; the loop takes the queue in batches, emits one
``Verdict`` event per record (and keeps it for HistoryRead), then writes only the latest value
of each node (drop-to-latest). A verdict the full queue refused is counted in
``EventsDropped`` and leaves a gap in the event ``Sequence``.

Security: endpoints from ``security_policies`` (default Basic256Sha256 Sign&Encrypt only), the
client's application certificate must be in ``trusted_clients`` (``BadCertificateUntrusted``
otherwise), the user must log in with a name and password from ``users_file``
(``BadUserAccessDenied``); anonymous sessions are refused (``BadIdentityTokenRejected``) unless
``allow_anonymous``.

Over 600 lines because the asyncua server, its security setup, the verdict nodes, events and
history, and the Trigger method share one event loop and address space and read best in one
place; configuration, certificates and users, and verdict records live in their own modules.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import datetime as dt
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from asyncua import Node, Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.event_generator import EventGenerator
from asyncua.server.history import HistoryStorageInterface
from asyncua.server.internal_server import InternalServer
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from defectd.errors import ConfigError, DefectdError
from defectd.log import get_logger
from defectd.opcua.certs import TrustedClients, UsersFile, certificate_uris
from defectd.opcua.config import OpcUaConfig
from defectd.opcua.records import (
    OpcUaStats,
    RecentRing,
    StationState,
    VerdictQueue,
    VerdictRecord,
)
from defectd.pipeline.inspection import Inspection
from defectd.pipeline.parts import TriggerError, parse_trigger
from defectd.pipeline.runner import PipelineResult

log = get_logger(__name__)

# ``on_trigger(camera, payload, t_wall, t_ns)``: the trigger as the MQTT trigger topic carries
# it (``trigger.schema.json``), already checked by ``parse_trigger``; runs on the server's
# thread and must be quick.
OnTrigger = Callable[[str, bytes, float, int], None]

_POLICIES = {
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "None": ua.SecurityPolicyType.NoSecurity,
}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NO_DEADLINE_BEFORE = 1e9  # epoch s (2001-09-09); parse_trigger's floor for gate_deadline


def _utc(t: float | None) -> dt.datetime | None:
    return None if t is None else _EPOCH + timedelta(seconds=t)


_V = ua.VariantType


@dataclass(frozen=True, slots=True)
class _RecordField:
    """A field of a verdict record as OPC UA shows it, declared once: in the Verdict event as
    ``name`` (unless not ``event``) and on the camera's object as ``Last<name>`` (unless not
    ``camera``), whose value before the first verdict is ``first``."""

    name: str
    vtype: ua.VariantType
    read: Callable[[VerdictRecord], Any]
    first: Any = None
    event: bool = True
    camera: bool = True


_RECORD_FIELDS = (
    _RecordField("Sequence", _V.UInt32, lambda r: r.sequence, 0),
    _RecordField("Camera", _V.String, lambda r: r.camera, camera=False),
    _RecordField("PartId", _V.String, lambda r: r.part_id, ""),
    _RecordField("ResultId", _V.String, lambda r: r.result_id, ""),
    _RecordField("Verdict", _V.String, lambda r: r.verdict, "none"),
    _RecordField("VerdictCode", _V.Int32, lambda r: r.verdict_code, 0),
    _RecordField("Rule", _V.String, lambda r: r.rule, ""),
    _RecordField("Reason", _V.String, lambda r: r.reason, ""),
    _RecordField("Defects", _V.UInt32, lambda r: r.defects, 0),
    _RecordField("DefectsJson", _V.String, lambda r: r.defects_json, "[]"),
    _RecordField("ModelSha256", _V.String, lambda r: r.model_sha256, ""),
    _RecordField("GrabTime", _V.DateTime, lambda r: _utc(r.t_grab), camera=False),
    # The event's own ``Time`` (BaseEventType's) is the verdict's time too.
    _RecordField("Time", _V.DateTime, lambda r: _utc(r.t_verdict), event=False),
    _RecordField("GateDeadline", _V.DateTime, lambda r: _utc(r.gate_deadline)),
    _RecordField("Late", _V.Boolean, lambda r: r.late, False),
    _RecordField("LatencyMs", _V.Double, lambda r: r.latency_ms, 0.0),
)
# Fields of the Verdict event beyond BaseEventType's.
_EVENT_FIELDS = tuple(f for f in _RECORD_FIELDS if f.event)
# The variables of ``Cameras/<camera>`` that show its latest verdict.
_CAMERA_FIELDS = tuple(f for f in _RECORD_FIELDS if f.camera)

# The station's variables that show its state (their first value: a fresh ``StationState``).
_STATION_VARS: tuple[tuple[str, ua.VariantType, Callable[[StationState], Any]], ...] = (
    ("Status", _V.String, lambda s: s.status),
    ("Live", _V.Boolean, lambda s: s.live),
    ("Ready", _V.Boolean, lambda s: s.ready),
    ("Health", _V.String, lambda s: s.health),
    ("ModelName", _V.String, lambda s: s.model_name),
    ("ModelSha256", _V.String, lambda s: s.model_sha256),
    ("Engine", _V.String, lambda s: s.engine),
    ("ConfigHash", _V.String, lambda s: s.config_hash),
    ("OutboxDepth", _V.UInt32, lambda s: max(0, s.outbox_depth)),
    ("BrokerConnected", _V.Boolean, lambda s: s.broker_connected),
)

# ``Cameras/<camera>/Recent``: the newest verdicts first.
_RECENT_ARRAYS: tuple[tuple[str, ua.VariantType], ...] = (
    ("Sequences", _V.UInt32),
    ("PartIds", _V.String),
    ("VerdictCodes", _V.Int32),
    ("Verdicts", _V.String),
    ("ResultIds", _V.String),
)


class _UserManager:
    """asyncua's user check: a name and password from the users file; anonymous only when
    configured. Runs on the server loop (one scrypt per session activation)."""

    def __init__(self, users: UsersFile | None, allow_anonymous: bool, on_refused: Any) -> None:
        self._users = users
        self._anonymous = allow_anonymous
        self._on_refused = on_refused

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        # X509 user tokens are not offered, so no user name means anonymous (``certificate`` is
        # the secure channel's client certificate, already checked by the validator).
        if username is None:
            if self._anonymous:
                return User(role=UserRole.User)
            self._on_refused("anonymous", "anonymous sessions are off (opcua.allow_anonymous)")
            return None
        if self._users is not None and self._users.check(username, password):
            return User(role=UserRole.User, name=username)
        self._on_refused(username or "", "unknown user or wrong password")
        return None


class _VerdictHistory(HistoryStorageInterface):  # type: ignore[misc]
    """HistoryRead of Verdict events: the last ``count`` events, at most ``period`` old, in
    memory (asyncua's ``HistoryDict`` trims with ``list.pop(0)``; this is a time-ordered list
    trimmed in blocks). Gone when the daemon stops: see docs/opcua.md."""

    def __init__(self, count: int, period: timedelta) -> None:
        super().__init__(max_history_data_response_size=10_000)
        self._count = count
        self._period = period
        self._events: dict[ua.NodeId, list[Any]] = {}
        self._times: dict[ua.NodeId, list[dt.datetime]] = {}

    async def init(self) -> None:
        return None

    async def new_historized_node(
        self, node_id: ua.NodeId, period: timedelta | None, count: int = 0
    ) -> None:
        return None

    async def save_node_value(self, node_id: ua.NodeId, datavalue: ua.DataValue) -> None:
        return None

    async def read_node_history(
        self, node_id: ua.NodeId, start: dt.datetime | None, end: dt.datetime | None, nb_values: int
    ) -> tuple[list[ua.DataValue], dt.datetime | None]:
        return [], None

    async def new_historized_event(
        self, source_id: ua.NodeId, evtypes: list[Any], period: timedelta | None, count: int = 0
    ) -> None:
        self._events.setdefault(source_id, [])
        self._times.setdefault(source_id, [])

    def add(self, source_id: ua.NodeId, event: Any, when: dt.datetime) -> None:
        events = self._events.setdefault(source_id, [])
        times = self._times.setdefault(source_id, [])
        events.append(event)
        times.append(when)
        cut = max(0, len(events) - self._count)
        oldest = when - self._period
        while cut < len(times) and times[cut] < oldest:
            cut += 1
        # Trim in blocks: amortised O(1) per event.
        if cut and (cut >= 256 or cut * 8 >= len(events)):
            del events[:cut]
            del times[:cut]

    async def save_event(self, event: Any) -> None:
        return None  # events are added by the server as it emits them (``add``)

    async def read_event_history(
        self,
        source_id: ua.NodeId,
        start: dt.datetime | None,
        end: dt.datetime | None,
        nb_values: int,
        evfilter: Any,
    ) -> tuple[list[Any], dt.datetime | None]:
        events = self._events.get(source_id, [])
        times = self._times.get(source_id, [])
        # Entries beyond the window that were not trimmed yet are not served.
        first = max(0, len(events) - self._count)
        if times:
            first = max(first, bisect.bisect_left(times, times[-1] - self._period))
        epoch = ua.get_win_epoch()
        lo_t = None if start is None or start == epoch else start
        hi_t = None if end is None or end == epoch else end
        reverse = lo_t is not None and hi_t is not None and lo_t > hi_t
        if reverse:
            lo_t, hi_t = hi_t, lo_t
        lo = first if lo_t is None else max(first, bisect.bisect_left(times, lo_t))
        hi = len(times) if hi_t is None else bisect.bisect_right(times, hi_t)
        selected = events[lo:hi]
        if reverse or (lo_t is None and hi_t is not None):
            selected = selected[::-1]
        if nb_values and len(selected) > nb_values:
            selected = selected[:nb_values]
        cont = None
        if len(selected) > self.max_history_data_response_size:
            cont = selected[self.max_history_data_response_size].Time
            selected = selected[: self.max_history_data_response_size]
        return selected, cont

    async def stop(self) -> None:
        return None


class _CameraNodes:
    """The nodes of one camera and what was last written to them."""

    def __init__(self, camera: str, node: Node) -> None:
        self.camera = camera
        self.node = node
        self.values: dict[str, tuple[ua.NodeId, ua.VariantType]] = {}
        self.counts = {"Results": 0, "Pass": 0, "Fail": 0, "Error": 0, "Late": 0}
        self.recent: RecentRing | None = None


class OpcUaServer:
    """One station's OPC UA server.

    ``start()`` builds the address space and listens (raises ``ConfigError`` for a bad
    certificate, key, trust folder or users file, ``DefectdError`` when the endpoint cannot be
    bound); ``submit(ins)`` / ``observe(result)`` hand a verdict over from any thread without
    blocking; ``set_state(state)`` refreshes the station nodes (latest wins); ``stop()`` is
    idempotent. ``trigger_cameras`` are the cameras whose ``Trigger`` method is served (line
    modes ``plc-trigger``/``hw-counter``), each call handed to ``on_trigger``.
    """

    def __init__(
        self,
        config: OpcUaConfig,
        station: str,
        cameras: Sequence[str],
        *,
        trigger_cameras: Sequence[str] = (),
        on_trigger: OnTrigger | None = None,
        clock_wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.station = station
        self.cameras = tuple(cameras)
        self._trigger_cameras = frozenset(trigger_cameras)
        self._on_trigger = on_trigger
        self._clock_wall = clock_wall
        self._queue = VerdictQueue(config.queue_size)
        self._state_lock = threading.Lock()
        self._state: StationState | None = StationState()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._events = 0
        self._refused = 0
        self._triggers = 0
        self._bad_triggers = 0
        self.endpoint_url = config.endpoint
        self._ns = 0
        self._server: Server | None = None
        self._history = _VerdictHistory(config.history_size, timedelta(seconds=config.history_s))
        self._station_node: Node | None = None
        self._station_values: dict[str, tuple[ua.NodeId, ua.VariantType]] = {}
        self._station_counts = {"Results": 0, "Pass": 0, "Fail": 0, "Error": 0, "Late": 0}
        self._cams: dict[str, _CameraNodes] = {}
        self._camera_ids: dict[str, ua.NodeId] = {}
        self._gen: EventGenerator | None = None
        self._last_state: StationState | None = None
        self._written: dict[ua.NodeId, Any] = {}

    # ------------------------------------------------------------------ thread side API

    def start(self, timeout: float = 60.0) -> None:
        """Start the server thread and wait until it listens (or failed)."""
        if self._thread is not None:
            return
        self._check_files()
        self._thread = threading.Thread(target=self._run, name=f"opcua-{self.station}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            self._stopping = True
            raise DefectdError(f"opcua: the server did not start within {timeout:g} s")
        if self._error is not None:
            self._thread.join(5.0)
            if isinstance(self._error, DefectdError):
                raise self._error
            raise DefectdError(
                f"opcua: cannot serve {self.config.endpoint}: {self._error}"
            ) from self._error
        log.info("opcua_started", endpoint=self.endpoint_url, cameras=list(self.cameras))

    def submit(self, ins: Inspection) -> None:
        """Hand a verdict to the server (any thread; never blocks)."""
        if not self._queue.put(ins, self._clock_wall()):
            log.warning("opcua_verdict_dropped", camera=ins.camera, part_id=ins.part_id)

    def observe(self, result: PipelineResult) -> None:
        """A ``ResultRouter`` observer."""
        self.submit(result.inspection)

    def set_state(self, state: StationState) -> None:
        """New station status and health (latest wins); any thread, never blocks."""
        with self._state_lock:
            self._state = state
        self._poke()

    def set_trigger(self, cameras: Sequence[str], on_trigger: OnTrigger) -> None:
        """Serve the ``Trigger`` method of ``cameras``, handing each accepted call to
        ``on_trigger`` (on the server thread; must be quick)."""
        self._on_trigger = on_trigger
        self._trigger_cameras = frozenset(cameras)

    def stats(self) -> OpcUaStats:
        return OpcUaStats(
            queued=self._queue.accepted,
            events=self._events,
            dropped=self._queue.dropped,
            waiting=len(self._queue),
            refused_sessions=self._refused,
            triggers=self._triggers,
            bad_triggers=self._bad_triggers,
            running=self._thread is not None and self._thread.is_alive(),
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Emit what is queued, close client sessions, stop the thread. Idempotent."""
        self._stopping = True
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("opcua_stop_timeout", timeout_s=timeout)

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(wake.set)

    def _check_files(self) -> None:
        cfg = self.config
        if cfg.secure:
            assert cfg.certificate is not None and cfg.private_key is not None
            uris = certificate_uris(cfg.certificate)
            app_uri = cfg.application_uri_for(self.station)
            if app_uri not in uris:
                raise ConfigError(
                    f"opcua.certificate: {cfg.certificate} names {uris or 'no URI'}, not the "
                    f"application URI {app_uri!r}; create it with defectd opcua cert"
                )
            try:
                serialization.load_pem_private_key(cfg.private_key.read_bytes(), password=None)
            except OSError as exc:
                raise ConfigError(
                    f"opcua.private_key: cannot read {cfg.private_key}: {exc.strerror}"
                ) from None
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"opcua.private_key: {cfg.private_key} is not an unencrypted PEM key: {exc}"
                ) from None

    # ------------------------------------------------------------------ server thread

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(); the thread must end quietly
            if not self._started.is_set():
                self._error = exc
                self._started.set()
            else:
                log.error("opcua_server_failed", error=repr(exc))

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        logging.getLogger("asyncua").setLevel(logging.WARNING)
        server = await self._build()
        self._server = server
        try:
            await server.start()
        except OSError as exc:
            raise DefectdError(
                f"opcua.endpoint: cannot listen on {self.endpoint_url}: {exc}"
            ) from None
        self._queue.set_waker(self._poke)
        self._started.set()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._flush()
                if self._stopping:
                    await self._flush()
                    break
        finally:
            self._queue.set_waker(None)
            try:
                await server.stop()
            except Exception as exc:  # already stopping: report, do not mask the loop's error
                log.warning("opcua_stop_failed", error=repr(exc))
            log.info("opcua_stopped", events=self._events, dropped=self._queue.dropped)

    async def _build(self) -> Server:
        cfg = self.config
        trusted = TrustedClients(cfg.trusted_clients) if cfg.trusted_clients is not None else None
        users = UsersFile(cfg.users_file) if cfg.users_file is not None else None
        server = Server(user_manager=_UserManager(users, cfg.allow_anonymous, self._refuse))
        await server.init()
        server.iserver.history_manager.set_storage(self._history)
        host = cfg.endpoint.split("//", 1)[1].split(":", 1)[0].strip("[]")
        port = cfg.port or _free_port(host)
        path = cfg.endpoint.split("//", 1)[1].partition("/")[2]
        self.endpoint_url = f"opc.tcp://{host}:{port}/{path}"
        server.set_endpoint(self.endpoint_url)
        server.set_server_name(f"defectd {self.station}")
        await server.set_application_uri(cfg.application_uri_for(self.station))
        server.product_uri = "urn:defectd"
        if cfg.secure:
            assert cfg.certificate is not None and cfg.private_key is not None
            await server.load_certificate(str(cfg.certificate))
            await server.load_private_key(str(cfg.private_key))
        server.set_security_policy([_POLICIES[p] for p in cfg.security_policies])
        tokens: list[type] = [ua.UserNameIdentityToken] if users is not None else []
        if cfg.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        if trusted is not None:
            server.set_certificate_validator(self._validator(trusted))
        self._ns = await server.register_namespace(cfg.namespace_for(self.station))
        await self._address_space(server)
        return server

    def _refuse(self, who: str, why: str) -> None:
        self._refused += 1
        log.warning("opcua_session_refused", user=who, reason=why)

    def _validator(self, trusted: TrustedClients) -> Any:
        async def validate(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
            der = cert.public_bytes(serialization.Encoding.DER)
            subject = cert.subject.rfc4514_string()
            if trusted.name_of(der) is None:
                self._refuse(
                    subject,
                    f"client certificate not in opcua.trusted_clients ({trusted.folder})",
                )
                raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
            now = dt.datetime.now(dt.UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                self._refuse(subject, "client certificate expired or not yet valid")
                raise ServiceError(ua.StatusCodes.BadCertificateTimeInvalid)

        return validate

    # ------------------------------------------------------------------ address space

    def _id(self, *path: str) -> ua.NodeId:
        return ua.NodeId("/".join((self.station, *path)), self._ns)

    async def _var(
        self,
        parent: Node,
        path: tuple[str, ...],
        value: Any,
        vtype: ua.VariantType,
        *,
        into: dict[str, tuple[ua.NodeId, ua.VariantType]],
        key: str,
    ) -> None:
        node = await parent.add_variable(
            self._id(*path), ua.QualifiedName(path[-1], self._ns), ua.Variant(value, vtype)
        )
        into[key] = (node.nodeid, vtype)

    async def _group(
        self,
        parent: Node,
        path: tuple[str, ...],
        variables: Iterable[tuple[str, ua.VariantType, Any]],
        *,
        into: dict[str, tuple[ua.NodeId, ua.VariantType]],
    ) -> None:
        """An object at ``path`` (its last part names it) under ``parent``, holding
        ``variables`` (name, type, first value), each kept in ``into`` as ``<group>/<name>``."""
        group = path[-1]
        node = await parent.add_object(self._id(*path), ua.QualifiedName(group, self._ns))
        for name, vtype, value in variables:
            await self._var(node, (*path, name), value, vtype, into=into, key=f"{group}/{name}")

    async def _address_space(self, server: Server) -> None:
        ns = self._ns
        station = await server.nodes.objects.add_object(
            self._id(), ua.QualifiedName(self.station, ns)
        )
        self._station_node = station
        sv = self._station_values
        first = StationState()
        for name, vtype, read in _STATION_VARS:
            await self._var(station, (name,), read(first), vtype, into=sv, key=name)
        await self._var(station, ("LastSequence",), 0, _V.UInt32, into=sv, key="LastSequence")
        counts = (*self._station_counts, "EventsDropped")
        await self._group(station, ("Counters",), [(n, _V.UInt32, 0) for n in counts], into=sv)
        folder = await station.add_folder(self._id("Cameras"), ua.QualifiedName("Cameras", ns))
        for camera in self.cameras:
            await self._camera_nodes(folder, camera)

        fields = [(f.name, f.vtype) for f in _EVENT_FIELDS]
        etype = await server.create_custom_event_type(
            ns, "VerdictEventType", ua.ObjectIds.BaseEventType, fields
        )
        gen = await server.get_event_generator(etype, station)
        self._gen = gen
        await station.set_event_notifier(
            [ua.EventNotifier.SubscribeToEvents, ua.EventNotifier.HistoryRead]
        )
        await self._history.new_historized_event(station.nodeid, [etype], None)

    async def _camera_nodes(self, folder: Node, camera: str) -> None:
        ns = self._ns
        node = await folder.add_object(self._id(camera), ua.QualifiedName(camera, ns))
        self._camera_ids[camera] = node.nodeid
        cam = _CameraNodes(camera, node)
        self._cams[camera] = cam
        for f in _CAMERA_FIELDS:
            name = f"Last{f.name}"
            await self._var(node, (camera, name), f.first, f.vtype, into=cam.values, key=name)
        counters = [(name, _V.UInt32, 0) for name in cam.counts]
        await self._group(node, (camera, "Counters"), counters, into=cam.values)
        cam.recent = RecentRing(self.config.recent_size)
        arrays = cam.recent.arrays()
        recent = [(name, vtype, arrays[name]) for name, vtype in _RECENT_ARRAYS]
        await self._group(node, (camera, "Recent"), recent, into=cam.values)
        args_in = [
            _argument("PartId", ua.ObjectIds.String, "the part's id (1-128 printable ASCII)"),
            _argument(
                "GateDeadline",
                ua.ObjectIds.DateTime,
                "absolute gate deadline (UTC); null or 1601-01-01 = none (use GateMs)",
            ),
            _argument("GateMs", ua.ObjectIds.Double, "gate deadline in ms from now; 0 = none"),
        ]
        args_out = [
            _argument("Accepted", ua.ObjectIds.Boolean, "the part was queued for its frame"),
            _argument("Message", ua.ObjectIds.String, "why not, when not accepted"),
        ]
        await node.add_method(
            self._id(camera, "Trigger"),
            ua.QualifiedName("Trigger", ns),
            self._trigger_method(camera),
            args_in,
            args_out,
        )

    # ------------------------------------------------------------------ the Trigger method

    def _trigger_method(self, camera: str) -> Any:
        async def trigger(parent: ua.NodeId, *args: ua.Variant) -> list[ua.Variant]:
            accepted, message = self._trigger(camera, [a.Value for a in args])
            return [
                ua.Variant(accepted, ua.VariantType.Boolean),
                ua.Variant(message, ua.VariantType.String),
            ]

        return trigger

    def _trigger(self, camera: str, values: list[Any]) -> tuple[bool, str]:
        t_wall, t_ns = time.time(), time.monotonic_ns()
        if camera not in self._trigger_cameras or self._on_trigger is None:
            self._bad_triggers += 1
            return False, (
                f"camera {camera!r} takes no triggers over OPC UA (its cameras.line.mode is "
                "not plc-trigger)"
            )
        if len(values) != 3:
            self._bad_triggers += 1
            return False, "expected 3 arguments: PartId, GateDeadline, GateMs"
        part_id, deadline, gate_ms = values
        message: dict[str, Any] = {"part_id": part_id}
        if isinstance(deadline, dt.datetime):
            if deadline.tzinfo is None:
                deadline = deadline.replace(tzinfo=dt.UTC)
            # Before 2001 = none: the OPC UA null time (1601) or a PLC's zero date (1970).
            if deadline.timestamp() >= _NO_DEADLINE_BEFORE:
                message["gate_deadline"] = deadline.timestamp()
        if gate_ms:
            message["gate_ms"] = gate_ms
        payload = json.dumps(message).encode()
        try:
            ticket = parse_trigger(payload, camera=camera, now_wall=t_wall, now_ns=t_ns)
        except TriggerError as exc:
            self._bad_triggers += 1
            log.warning("opcua_bad_trigger", camera=camera, error=str(exc))
            return False, str(exc)
        if ticket.gate_deadline is not None and ticket.gate_deadline <= t_wall:
            self._bad_triggers += 1
            return False, f"trigger {part_id!r}: its gate deadline has passed already"
        try:
            self._on_trigger(camera, payload, t_wall, t_ns)
        except DefectdError as exc:
            self._bad_triggers += 1
            return False, str(exc)
        self._triggers += 1
        return True, "accepted"

    # ------------------------------------------------------------------ verdicts and state

    async def _flush(self) -> None:
        server, gen = self._server, self._gen
        if server is None or gen is None:
            return
        records = self._queue.take()
        latest: dict[str, VerdictRecord] = {}
        for record in records:
            await self._emit(gen, record)
            latest[record.camera] = record
            self._count(record)
        writes: list[tuple[ua.NodeId, ua.VariantType, Any]] = []
        for camera, record in latest.items():
            cam = self._cams.get(camera)
            if cam is not None:
                writes += self._camera_writes(cam, record)
        if records:
            sv = self._station_values
            last = records[-1].sequence
            writes.append((*sv["LastSequence"], last))
            for name, count in self._station_counts.items():
                writes.append((*sv[f"Counters/{name}"], count))
            writes.append((*sv["Counters/EventsDropped"], self._queue.dropped))
        with self._state_lock:
            state, self._state = self._state, None
        if state is not None and state != self._last_state:
            writes += self._state_writes(state)
            self._last_state = state
        written = self._written
        for nodeid, vtype, value in writes:
            # Only values that changed: a write costs an address-space update and a data
            # change to every client monitoring the node.
            if nodeid in written and written[nodeid] == value:
                continue
            written[nodeid] = value
            await server.write_attribute_value(nodeid, ua.DataValue(ua.Variant(value, vtype)))

    async def _emit(self, gen: EventGenerator, r: VerdictRecord) -> None:
        ev = gen.event
        for f in _EVENT_FIELDS:
            setattr(ev, f.name, f.read(r))
        ev.Severity = 500 if r.verdict != "pass" else 100
        camera_id = self._camera_ids.get(r.camera)
        if camera_id is not None:
            ev.SourceNode = camera_id
        ev.SourceName = r.camera
        when = _utc(r.t_verdict)
        assert when is not None
        # What EventGenerator.trigger does, without its per-event uuid, local-time lookup and
        # browse-name read: the result id is already unique, LocalTime is optional.
        ev.EventId = r.result_id.encode()
        ev.Time = when
        ev.ReceiveTime = when
        ev.Message = ua.LocalizedText(f"{r.camera} part {r.part_id or '-'}: {r.verdict}")
        await gen.isession.subscription_service.trigger_event(ev)
        assert self._station_node is not None
        self._history.add(self._station_node.nodeid, copy.copy(ev), when)
        self._events += 1
        if self._cams.get(r.camera) is not None:
            ring = self._cams[r.camera].recent
            if ring is not None:
                ring.add(r)

    def _count(self, r: VerdictRecord) -> None:
        key = {"pass": "Pass", "fail": "Fail", "error": "Error"}.get(r.verdict)
        targets = [self._station_counts]
        cam = self._cams.get(r.camera)
        if cam is not None:
            targets.append(cam.counts)
        for counts in targets:
            counts["Results"] += 1
            if key is not None:
                counts[key] += 1
            if r.late:
                counts["Late"] += 1

    def _camera_writes(
        self, cam: _CameraNodes, r: VerdictRecord
    ) -> list[tuple[ua.NodeId, ua.VariantType, Any]]:
        v = cam.values
        values = {f"Last{f.name}": f.read(r) for f in _CAMERA_FIELDS}
        for name, count in cam.counts.items():
            values[f"Counters/{name}"] = count
        if cam.recent is not None:
            for name, array in cam.recent.arrays().items():
                values[f"Recent/{name}"] = array
        return [(*v[k], value) for k, value in values.items()]

    def _state_writes(self, s: StationState) -> list[tuple[ua.NodeId, ua.VariantType, Any]]:
        sv = self._station_values
        return [(*sv[name], read(s)) for name, _, read in _STATION_VARS]


def _argument(name: str, data_type: int, description: str) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = ua.NodeId(data_type)
    arg.ValueRank = -1
    arg.Description = ua.LocalizedText(description)
    return arg


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("", "0.0.0.0") else "127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
