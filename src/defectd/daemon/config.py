"""The station config: one TOML file assembled from every module's own config section.

::

    station = "line1-top"            # id used in MQTT topics, logs and metrics
    [model]       path, backend, precision, threads, cache_dir, warmup
    [model.triton] url, protocol, model_name, model_version, timeouts (backend = "triton")
    [[cameras]]   one table per camera: a source (type = "genicam" | "synthetic" | "replay"
                  and its keys) plus the station's keys for that camera: calibration, roi
    [pipeline]    defectd.pipeline.config.PipelineConfig     (batching, deadlines, queues)
    [postprocess] defectd.pipeline.config.PostprocessConfig  (threshold, morphology, zones)
    [rules]       defectd.pipeline.config.RulesConfig        ([[rules.rules]] kind = ...)
    [mqtt]        defectd.publish.config.MqttConfig
    [outbox]      defectd.publish.config.OutboxConfig        (path defaults to the state dir)
    [archive]     defectd.daemon.archive.ArchiveConfig
    [audit]       defectd.daemon.audit.AuditConfig           (the audit log of model changes)
    [promotion]   defectd.daemon.promote.PromotionConfig     (gates of defectd promote)
    [health]      address of /healthz, /metrics and the operator view (token off loopback)
    [opcua]       defectd.opcua.config.OpcUaConfig           (OPC UA server; absent = off)
    [shadow]      defectd.daemon.shadow.config.ShadowConfig  (candidate model; absent = off)
    [drift]       defectd.daemon.drift.DriftConfig           (drift monitoring and its alarm)
    [daemon]      state_dir, drain and watchdog bounds, log rate limit

Paths: relative paths in the file are relative to the file's folder, except ``outbox.path``,
``archive.dir`` and ``audit.path``, which are relative to the state directory
(``daemon.state_dir``, else ``$STATE_DIRECTORY`` as systemd sets it, else ``./var/<station>``).

``load_station_config`` validates everything at once and raises one ``ConfigError`` that names
the file and every bad key, e.g. ``x.toml: cameras.0.rate_hz: Input should be greater than 0``.

Over 600 lines because it assembles every section of the station file and checks the keys
that only make sense together (paths, stop timeout, line contract) where each error can be
named by its key as written; the sections themselves live with the modules that use them.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from defectd.daemon.archive import ArchiveConfig
from defectd.daemon.audit import AuditConfig
from defectd.daemon.config_types import BackendName, CalibrationFile, ModelFile
from defectd.daemon.drift import DriftConfig
from defectd.daemon.fingerprint import decision_fingerprint
from defectd.daemon.health import is_loopback, parse_address
from defectd.daemon.promote import PromotionConfig
from defectd.daemon.shadow.config import ShadowConfig
from defectd.engines.remote import TritonOptions
from defectd.errors import ConfigError
from defectd.opcua.config import OpcUaConfig
from defectd.pipeline.config import (
    PipelineConfig,
    PostprocessConfig,
    Rect,
    RulesConfig,
)
from defectd.pipeline.parts import LineConfig
from defectd.pipeline.sources import SourceConfig
from defectd.publish.config import MqttConfig, OutboxConfig, check_topic_level

# What a shutdown may take beyond daemon.drain_timeout_s (stopping threads, flushing the
# outbox, publishing `offline`), and the stop timeout of the shipped systemd unit.
SHUTDOWN_GRACE_S = 5.0
UNIT_STOP_TIMEOUT_S = 30.0


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TritonSection(_Frozen):
    """``[model.triton]``: the inference server that runs the model for ``backend = "triton"``
    (``defectd.engines.remote.TritonOptions`` says what each key does)."""

    url: str = Field(default="127.0.0.1:8001", description="host:port (gRPC 8001, HTTP 8000)")
    protocol: Literal["grpc", "http"] = "grpc"
    model_name: str | None = Field(default=None, description="None: the card's name")
    model_version: str = Field(default="", description='"": the latest the server has')
    timeout_ms: Annotated[float, Field(gt=0, le=60_000)] = 1000.0
    retries: Annotated[int, Field(ge=0, le=10)] = 1
    backoff_ms: Annotated[float, Field(ge=0, le=10_000)] = 50.0
    reconnect_max_s: Annotated[float, Field(gt=0, le=300)] = 2.0
    connect_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0

    @field_validator("url")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if "://" in value or not sep or not host or not port.isdigit():
            raise ValueError(f"{value!r} is not HOST:PORT (e.g. triton.plant.local:8001)")
        return value

    def options(self) -> TritonOptions:
        return TritonOptions(**self.model_dump())


class ModelSection(_Frozen):
    """``[model]``: the model file (``.onnx`` with its card beside it) and how to run it."""

    path: ModelFile
    backend: BackendName = Field(
        default="auto", description="auto, openvino, ort, torch, tensorrt, triton"
    )
    precision: Literal["fp32", "fp16", "bf16", "int8"] | None = Field(
        default=None,
        description="None: the precision the calibration files for this model name, else the "
        "engines' default (the card's, or its fast precision on CPU)",
    )
    threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    cache_dir: Path | None = Field(
        default=None,
        description="compiled engines; default $CACHE_DIRECTORY, $XDG_CACHE_HOME/defectd or "
        "~/.cache/defectd (outside the state directory)",
    )
    warmup: Annotated[int, Field(ge=0, le=100)] = Field(
        default=2, description="inferences at max batch before announcing ready"
    )
    triton: TritonSection | None = None

    @model_validator(mode="after")
    def _triton_with_its_server(self) -> ModelSection:
        if self.backend == "triton" and self.triton is None:
            raise ValueError(
                'backend "triton" needs a [model.triton] table naming the server (url = ...)'
            )
        if self.triton is not None and self.backend != "triton":
            raise ValueError(
                f'[model.triton] is set but backend is {self.backend!r}; set backend = "triton"'
            )
        return self


class StationCamera(_Frozen):
    """One ``[[cameras]]`` table: the source settings plus what the station adds per camera."""

    source: SourceConfig
    calibration: CalibrationFile | None = Field(
        default=None, description="calibration file (threshold, camera geometry, flat-field)"
    )
    roi: Rect | None = Field(default=None, description="inspect only this rectangle")
    ignore_zones: tuple[Rect | Path, ...] = ()
    line: LineConfig = Field(
        default_factory=LineConfig,
        description="part identity and gate deadline ([cameras.line]; see docs/plc.md)",
    )

    @model_validator(mode="before")
    @classmethod
    def _split(cls, data: Any) -> Any:
        # The TOML table is flat; the source's keys go to ``source``.
        if isinstance(data, Mapping) and "source" not in data:
            own = {k: data[k] for k in ("calibration", "roi", "ignore_zones", "line") if k in data}
            rest = {k: v for k, v in data.items() if k not in own}
            return {**own, "source": rest}
        return data

    @model_validator(mode="after")
    def _line_needs_a_trigger(self) -> StationCamera:
        if self.line.mode == "plc-trigger" and getattr(self.source, "trigger", None) != "request":
            raise ValueError(
                "line.mode = 'plc-trigger' needs trigger = 'request' on the camera "
                "(the daemon fires the camera once per trigger)"
            )
        return self

    @property
    def camera(self) -> str:
        return self.source.camera


class HealthSection(_Frozen):
    """``[health]``: the HTTP endpoint for ``/healthz``, ``/metrics`` and the operator view.

    The view (``/``) is read-only. Bound to a loopback address it is open to this machine;
    bound to any other address it asks for an access token, read from ``token_file`` or the
    environment variable ``token_env`` (never written in the config itself).
    """

    enabled: bool = True
    address: str = Field(default="127.0.0.1:9464", description="HOST:PORT; port 0 = any free")
    view: bool = Field(default=True, description="serve the operator view at /")
    token_file: Path | None = None
    token_env: str | None = Field(default=None, min_length=1)
    view_fps: float = Field(
        default=2.0, gt=0, le=30, description="at most this many images per camera and second"
    )
    view_width: int = Field(default=480, ge=64, le=4096, description="live images scaled to this")
    gallery: int = Field(default=24, ge=1, le=500, description="rejects in the gallery")

    @field_validator("address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        try:
            parse_address(value)
        except ConfigError as exc:
            raise ValueError(str(exc).split(": ", 1)[1]) from None
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HealthSection:
        if self.token_file is not None and self.token_env is not None:
            raise ValueError("token_file and token_env: give one of them, not both")
        if self.enabled and self.view and not self.view_is_local and not self.has_token:
            raise ValueError(
                f"token_file: the operator view on {self.address} is reachable from other "
                "machines and needs an access token: set token_file or token_env "
                "(or view = false)"
            )
        return self

    @property
    def view_is_local(self) -> bool:
        """Whether the endpoint is bound to a loopback address only."""
        return is_loopback(parse_address(self.address)[0])

    @property
    def has_token(self) -> bool:
        return self.token_file is not None or self.token_env is not None

    def read_token(self) -> SecretStr | None:
        """The view's access token from ``token_file`` or ``token_env`` (None when neither).

        Raises ``ConfigError`` naming the key when the file or variable is missing or empty.
        """
        if self.token_file is not None:
            try:
                value = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"health.token_file: cannot read {self.token_file}: {exc.strerror}"
                ) from None
            if not value:
                raise ConfigError(f"health.token_file: {self.token_file} is empty")
            return SecretStr(value)
        if self.token_env is not None:
            env = os.environ.get(self.token_env, "").strip()
            if not env:
                raise ConfigError(
                    f"health.token_env: environment variable {self.token_env} is not set"
                )
            return SecretStr(env)
        return None


class DaemonSection(_Frozen):
    """``[daemon]``: where state lives, how long shutdown may take, what counts as progress.

    A shutdown takes at most ``drain_timeout_s`` + ``SHUTDOWN_GRACE_S``; that must fit in
    ``stop_timeout_s`` (systemd's ``TimeoutStopSec``), or the service manager kills the daemon
    in the middle of its drain.
    """

    state_dir: Path | None = Field(
        default=None, description="outbox and archive; default $STATE_DIRECTORY or ./var/STATION"
    )
    stop_timeout_s: Annotated[float, Field(gt=0)] = Field(
        default=UNIT_STOP_TIMEOUT_S,
        description="how long the service manager waits after SIGTERM before it kills the "
        "daemon: systemd's TimeoutStopSec (30 s in systemd/defectd.service); keep them equal",
    )
    drain_timeout_s: Annotated[float, Field(gt=0, le=600)] = Field(
        default=10.0, description="on SIGTERM: time to finish frames in flight and flush"
    )
    stall_timeout_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=10.0,
        description="frames in flight but no verdict for this long: the pipeline is stuck",
    )
    camera_stall_s: Annotated[float, Field(gt=0)] = Field(
        default=30.0, description="a streaming camera silent this long is stuck"
    )
    camera_idle_ok: bool = Field(
        default=False, description="a camera delivering no frames is not a fault (triggered line)"
    )
    status_interval_s: Annotated[float, Field(gt=0, le=3600)] = Field(
        default=5.0, description="how often STATUS= and the status log line are refreshed"
    )
    log_rate_limit_s: Annotated[float, Field(gt=0)] = 10.0
    log_burst: Annotated[int, Field(ge=1)] = 5
    exit_when_sources_end: bool = Field(
        default=False,
        description="exit (0, after draining) once every camera source ended by itself: a "
        "replay or a counted synthetic line run as a batch job",
    )
    result_ledger: Path | None = Field(
        default=None,
        description="append each result id, once durable in the outbox, to this file (one "
        "per line; relative to the state directory): a list to reconcile deliveries against",
    )
    max_result_age_s: Annotated[float, Field(gt=0)] = Field(
        default=15.0,
        description="a result waiting this long for its PUBACK makes the station not ready "
        "(a hung or slow broker: connected, but not acknowledging)",
    )
    disk_warn_free_bytes: Annotated[int, Field(ge=0)] = Field(
        default=256 * 1024 * 1024,
        description="free space below this on the disk of the state, outbox, archive or "
        "engine cache: a disk_space_low warning event (0: off)",
    )

    @field_validator("drain_timeout_s")
    @classmethod
    def _fits_the_stop_timeout(cls, value: float, info: ValidationInfo) -> float:
        stop = info.data.get("stop_timeout_s")
        if stop is not None and value + SHUTDOWN_GRACE_S > stop:
            raise ValueError(
                f"{value:g} s + {SHUTDOWN_GRACE_S:g} s to stop threads and publish offline "
                f"exceeds stop_timeout_s = {stop:g} s (systemd TimeoutStopSec), which would "
                f"kill the daemon mid-drain: lower drain_timeout_s to at most "
                f"{stop - SHUTDOWN_GRACE_S:g}, or raise TimeoutStopSec and stop_timeout_s together"
            )
        return value


class StationConfig(_Frozen):
    """The whole station, validated once at start (and again on SIGHUP)."""

    station: str = Field(min_length=1, max_length=64)
    model: ModelSection
    cameras: tuple[StationCamera, ...]
    pipeline: PipelineConfig = PipelineConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    rules: RulesConfig = RulesConfig()
    mqtt: MqttConfig = MqttConfig()  # type: ignore[call-arg]
    outbox: OutboxConfig
    archive: ArchiveConfig = ArchiveConfig()
    audit: AuditConfig = AuditConfig()
    promotion: PromotionConfig = PromotionConfig()
    health: HealthSection = HealthSection()
    daemon: DaemonSection = DaemonSection()
    opcua: OpcUaConfig | None = None
    shadow: ShadowConfig | None = None
    drift: DriftConfig = DriftConfig()
    # Set by the loader, not by the file.
    source_path: Path | None = Field(default=None, exclude=True)
    state_dir: Path = Field(default=Path("var"), exclude=True)

    @field_validator("station")
    @classmethod
    def _topic_safe(cls, value: str) -> str:
        return check_topic_level(value, "station")

    @model_validator(mode="after")
    def _unique_cameras(self) -> StationConfig:
        if not self.cameras:
            raise ValueError("cameras: at least one [[cameras]] table is needed")
        seen: set[str] = set()
        for cam in self.cameras:
            check_topic_level(cam.camera, "camera")
            if cam.camera in seen:
                raise ValueError(f"camera id {cam.camera!r} is used twice")
            seen.add(cam.camera)
        return self

    def camera(self, camera: str) -> StationCamera:
        for cam in self.cameras:
            if cam.camera == camera:
                return cam
        raise KeyError(camera)

    def hash(self) -> str:
        """Fingerprint of everything that decides a verdict, the files the config names
        included (see ``defectd.daemon.fingerprint``): every verdict carries it."""
        return decision_fingerprint(self)

    def reload_only_differences(self, other: StationConfig) -> list[str]:
        """Top-level keys that differ from ``other`` and need a restart to take effect.

        A reload applies ``model``, ``postprocess``, ``rules`` and the cameras' calibration;
        anything else changed in the file is reported and keeps its old value.
        """
        changed: list[str] = []
        for key in (
            "station",
            "pipeline",
            "mqtt",
            "outbox",
            "archive",
            "audit",
            "health",
            "daemon",
            "opcua",
            "shadow",
            "drift",
        ):
            if getattr(self, key) != getattr(other, key):
                changed.append(key)
        if [c.source for c in self.cameras] != [c.source for c in other.cameras] or [
            (c.roi, c.ignore_zones) for c in self.cameras
        ] != [(c.roi, c.ignore_zones) for c in other.cameras]:
            changed.append("cameras")
        return changed


# --- loading ----------------------------------------------------------------------------------

# Keys whose values are paths relative to the config file ("*" = every list item).
_FILE_RELATIVE: tuple[tuple[str, ...], ...] = (
    ("model", "path"),
    ("model", "cache_dir"),
    ("cameras", "*", "calibration"),
    ("cameras", "*", "path"),
    ("cameras", "*", "producers", "*"),
    ("cameras", "*", "ignore_zones", "*"),
    ("postprocess", "ignore_zones", "*"),
    ("mqtt", "tls", "ca_file"),
    ("mqtt", "tls", "cert_file"),
    ("mqtt", "tls", "key_file"),
    ("mqtt", "password_file"),
    ("health", "token_file"),
    ("daemon", "state_dir"),
    ("opcua", "certificate"),
    ("opcua", "private_key"),
    ("opcua", "trusted_clients"),
    ("opcua", "users_file"),
    ("shadow", "path"),
    ("shadow", "calibration"),
)
# Keys whose values are paths relative to the state directory.
_STATE_RELATIVE: tuple[tuple[str, ...], ...] = (
    ("outbox", "path"),
    ("archive", "dir"),
    ("audit", "path"),
    ("daemon", "result_ledger"),
)


def _resolve(node: Any, key: tuple[str, ...], base: Path) -> Any:
    """Return ``node`` with the path at ``key`` made absolute against ``base`` (if present)."""
    if not key:
        if isinstance(node, str) and node:
            path = Path(node).expanduser()
            return str(path if path.is_absolute() else base / path)
        return node
    head, rest = key[0], key[1:]
    if head == "*" and isinstance(node, list):
        return [_resolve(item, rest, base) for item in node]
    if isinstance(node, dict) and head in node:
        return {**node, head: _resolve(node[head], rest, base)}
    return node


# Linux limits (``NAME_MAX``, ``PATH_MAX``): a longer path makes every file call fail with
# ``OSError: File name too long``, so it is refused at load with the key that holds it.
_NAME_MAX = 255
_PATH_MAX = 4095


def _items_at(
    node: Any, key: tuple[str, ...], where: tuple[str, ...] = ()
) -> Iterator[tuple[str, Any]]:
    """Yield ``(dotted key as written, value)`` for every value at ``key`` (``*`` = each item)."""
    if not key:
        yield ".".join(where), node
        return
    head, rest = key[0], key[1:]
    if head == "*" and isinstance(node, list):
        for i, item in enumerate(node):
            yield from _items_at(item, rest, (*where, str(i)))
    elif isinstance(node, dict) and head in node:
        yield from _items_at(node[head], rest, (*where, head))


def path_problem(value: str) -> str | None:
    """Why ``value`` cannot be a file path on this system (NUL byte, too long), else None."""
    if "\x00" in value:
        return "the path contains a NUL byte"
    try:
        encoded = os.fsencode(value)
    except UnicodeError:
        return "the path cannot be encoded for the file system"
    if len(encoded) > _PATH_MAX:
        return f"the path is too long ({len(encoded)} bytes; at most {_PATH_MAX})"
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if longest > _NAME_MAX:
        return f"a path component is too long ({longest} bytes; at most {_NAME_MAX})"
    return None


def _path_problems(data: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """``key: problem`` for every path value (resolved) that no file call could take.

    Keys the file leaves out (defaults under a bad ``daemon.state_dir``) are named only when
    no key the file sets is at fault.
    """
    keys = (*_FILE_RELATIVE, *_STATE_RELATIVE)
    problems: list[tuple[str, str]] = []
    for key in keys:
        for dotted, value in _items_at(data, key):
            if isinstance(value, str) and (problem := path_problem(value)) is not None:
                problems.append((dotted, problem))
    written = {dotted for key in keys for dotted, _ in _items_at(raw, key)}
    named = [p for p in problems if p[0] in written] or problems
    return [f"{dotted}: {problem}" for dotted, problem in named]


def _state_dir(raw: dict[str, Any], env: Mapping[str, str]) -> Path:
    daemon = raw.get("daemon")
    if isinstance(daemon, dict) and isinstance(daemon.get("state_dir"), str):
        return Path(daemon["state_dir"])
    if env.get("STATE_DIRECTORY"):
        # systemd may list several directories separated by ':'; ours is the first.
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    station = raw.get("station") if isinstance(raw.get("station"), str) else "defectd"
    return Path.cwd() / "var" / str(station).replace("/", "_")


# Levels the config models add that the TOML file does not have.
_WRAPPERS = frozenset({"source"})


def _loc(loc: tuple[int | str, ...], raw: Any) -> str:
    """A dotted key as the user wrote it: drops the discriminator and wrapper levels that
    pydantic adds (``cameras.0.source.synthetic.rate_hz`` -> ``cameras.0.rate_hz``)."""
    parts: list[str] = []
    node = raw
    for i, item in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict):
            if item in node:
                node = node[item]
            elif isinstance(item, str) and (not last or item in _WRAPPERS):
                continue  # a level the file does not have (``source``, ``synthetic``)
            else:
                node = None
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
        else:
            node = None
        text = str(item)
        parts.append(text if text.isprintable() else repr(text))  # keep the message one line
    return ".".join(parts) or "(top level)"


def _message(error: Mapping[str, Any]) -> str:
    msg = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``): a config
    error is one line even when a key or a path in the file holds such characters."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_validation_error(where: str, exc: ValidationError, raw: Any) -> str:
    """One line naming every bad key: ``where: key: message; key: message``."""
    seen: list[str] = []
    for error in exc.errors():
        text = f"{_loc(tuple(error['loc']), raw)}: {_message(error)}"
        if text not in seen:
            seen.append(text)
    return one_line(f"{where}: " + "; ".join(seen))


def default_cache_dir(environ: Mapping[str, str], state: Path) -> Path:
    """Where compiled engines go unless ``model.cache_dir`` says: outside the state directory,
    so that a cache filling its disk cannot cost the outbox its room. systemd's
    ``$CACHE_DIRECTORY`` (``CacheDirectory=``), else ``$XDG_CACHE_HOME/defectd``, else
    ``~/.cache/defectd``; ``STATE/cache`` only when none of them is known."""
    cache = environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if cache:
        return Path(cache)
    xdg = environ.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "defectd"
    home = environ.get("HOME", "")
    if home and Path(home).is_absolute():
        return Path(home) / ".cache" / "defectd"
    return state / "cache"


def parse_station_config(
    raw: dict[str, Any], *, base: Path, where: str, env: Mapping[str, str] | None = None
) -> StationConfig:
    """Validate an already parsed config (e.g. built by ``defectd demo``) the same way."""
    environ = os.environ if env is None else env
    data: dict[str, Any] = dict(raw)
    for key in _FILE_RELATIVE:
        data = _resolve(data, key, base)
    state = _state_dir(data, environ)
    if not state.is_absolute():
        state = base / state
    outbox = data.get("outbox", {})
    if isinstance(outbox, dict) and "path" not in outbox:
        data["outbox"] = {**outbox, "path": "outbox.sqlite"}
    archive = data.get("archive", {})
    if isinstance(archive, dict) and "dir" not in archive:
        data["archive"] = {**archive, "dir": "archive"}
    audit = data.get("audit", {})
    if isinstance(audit, dict) and "path" not in audit:
        data["audit"] = {**audit, "path": "audit.jsonl"}
    for key in _STATE_RELATIVE:
        data = _resolve(data, key, state)
    model = data.get("model")
    if isinstance(model, dict) and "cache_dir" not in model:
        data["model"] = {**model, "cache_dir": str(default_cache_dir(environ, state))}
    data["source_path"] = where
    data["state_dir"] = str(state)
    problems = _path_problems(data, raw)
    if problems:
        raise ConfigError(one_line(f"{where}: " + "; ".join(problems)))
    try:
        return StationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(where, exc, raw)) from None
    except OSError as exc:  # a file check in a validator met what the path check above missed
        raise ConfigError(one_line(f"{where}: {exc.filename}: {exc.strerror}")) from None


def load_station_config(path: Path, env: Mapping[str, str] | None = None) -> StationConfig:
    """Read and validate the station config at ``path``.

    Raises ``ConfigError`` naming the file (missing, unreadable, not TOML) or every bad key.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_station_config(raw, base=path.resolve().parent, where=str(path), env=env)


__all__ = [
    "DaemonSection",
    "HealthSection",
    "ModelSection",
    "StationCamera",
    "StationConfig",
    "format_validation_error",
    "load_station_config",
    "one_line",
    "parse_station_config",
]
