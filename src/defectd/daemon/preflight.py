"""What ``defectd run`` opens before it starts, checked by one function for check and run.

``check_station(config)`` is called by ``defectd config check`` and, before anything is
started, by ``defectd run``; so a config that the check accepts starts, and one it rejects
fails ``run`` with the very same message. It opens, and closes again (but see ``opener``):

- the model as the daemon will run it: the file is ONNX (or a ``.pt`` checkpoint / ``.plan``),
  its card is present and valid and agrees with the graph, and the engine opens on the chosen
  backend and runs one batch at ``pipeline.max_batch`` (TensorRT: checked without a build);
- every referenced file: calibration files, ignore-zone masks, GenTL producers (``.cti``),
  replay paths, the MQTT password file or variable, the TLS CA/certificate/key;
- the state: ``daemon.state_dir``, ``model.cache_dir``, ``archive.dir``, ``outbox.path``,
  ``audit.path`` and ``daemon.result_ledger`` can be created where they do not exist
  (nothing is created);
- the pipeline is assembled (rules that need mm², zone masks) without starting a thread;
- the shadow candidate (``[shadow]``) like the model, its calibration file (a threshold
  section, calibrated for the candidate) and its pipeline, each problem named ``shadow.*``;
- with ``open_cameras`` each camera source is started and stopped again (a GenICam device is
  opened and configured; the daemon must not hold it at that moment).

Every problem is named by its key as written in the file, all in one ``ConfigError`` line:
``station.toml: model.path: ...; cameras.0.producers: ...``.

``defectd run`` passes its engine ``opener``: the model is then opened as the service opens it
(``load_model``: its compile cache, its warm-up) and, when every check passes, handed back open
in ``StationCheck.loaded`` for the service's first generation, so a start compiles it once.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from defectd.daemon.config import StationConfig, one_line
from defectd.daemon.drift import check_reference
from defectd.engines.base import Engine
from defectd.errors import ConfigError, DefectdError
from defectd.model.card import ModelCard, file_sha256, load_card
from defectd.pipeline.cameras import CameraSetup
from defectd.pipeline.sources import (
    GenICamSourceConfig,
    ReplaySourceConfig,
    Source,
    SyntheticSourceConfig,
)

if TYPE_CHECKING:
    from defectd.daemon.station import EngineOpener, LoadedModel

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StationCheck:
    """What the check opened: the engine it ran, the model's card name and file hash."""

    engine: str
    model: str
    model_sha256: str
    cameras_opened: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # e.g. model.precision differs from a calibration file's
    # With an ``opener``: the model, open and warmed up; the caller owns it and closes its
    # engine. None without one, and for TensorRT (checked without a build).
    loaded: LoadedModel | None = None


class _Problems:
    """Collects ``key: message`` lines; ``attempt`` turns an expected failure into one."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        # Errors raised by the config's own checks already start with their key.
        named = message.startswith((f"{key}:", f"{key}.")) or (
            key == "pipeline" and ": " in message
        )
        text = message if named else f"{key}: {message}"
        if text not in self.lines:
            self.lines.append(text)

    def attempt(self, key: str, action: Callable[[], T]) -> T | None:
        try:
            return action()
        except DefectdError as exc:
            self.add(key, str(exc))
        except ssl.SSLError as exc:
            self.add(key, f"TLS: {exc.reason or exc}")
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            self.add(key, f"{where}{exc.strerror or exc}")
        except ValueError as exc:  # e.g. a value the OS or a library refuses
            self.add(key, str(exc))
        return None


def creatable(path: Path, *, is_dir: bool) -> None:
    """Raise ``ConfigError`` unless ``path`` exists as the right kind, or can be created.

    Nothing is created: the nearest existing ancestor must be a writable folder.
    """
    if path.exists():
        if is_dir and not path.is_dir():
            raise ConfigError(f"{path} exists and is not a folder")
        if not is_dir and path.is_dir():
            raise ConfigError(f"{path} is a folder, not a file")
        # A file (the SQLite outbox, the ledger) needs its folder writable too (WAL, journal).
        targets = (path,) if is_dir else (path, path.parent)
        if not all(os.access(t, os.W_OK) for t in targets):
            raise ConfigError(f"{path} is not writable")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {path}: {parent} is not writable")


def _check_tls(config: StationConfig) -> None:
    """Load the CA and the client pair into a TLS context as the publisher will."""
    tls = config.mqtt.tls
    if tls is None:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(tls.ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"mqtt.tls.ca_file: {tls.ca_file}: not a PEM CA certificate ({exc})"
        ) from None
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"mqtt.tls.cert_file: {tls.cert_file} with key {tls.key_file}: "
                f"not a usable client certificate and key ({exc})"
            ) from None


def _card(path: Path) -> ModelCard:
    if path.suffix.lower() == ".pt":
        from defectd.model.checkpoint import load_checkpoint  # noqa: PLC0415  (torch is heavy)

        return load_checkpoint(path)[1]
    return load_card(path)


@dataclass(frozen=True, slots=True)
class _Model:
    engine: Engine | None  # None: TensorRT, checked without a build
    engine_name: str
    card: ModelCard
    sha256: str
    loaded: LoadedModel | None = None  # opened by ``load_model`` (an ``opener`` was given)


def _open_model(
    config: StationConfig, precision: str | None, opener: EngineOpener | None = None
) -> _Model:
    """Open the model as ``load_model`` will (at ``precision``, from ``model_precision``) and
    run one batch; with ``opener``, open it with ``load_model`` itself. TensorRT is checked
    without a build (a build takes minutes). The caller closes the engine."""
    # Runtimes are imported here: loading a config needs none of them.
    from defectd.daemon.station import load_model, warm_up  # noqa: PLC0415
    from defectd.engines import choose_backend, open_engine  # noqa: PLC0415

    m = config.model
    if not m.path.is_file():
        raise ConfigError(f"model.path: model file not found: {m.path}")
    backend = m.backend if m.backend != "auto" else choose_backend(m.path)[0]
    digest = file_sha256(m.path)
    if backend == "tensorrt":
        from defectd.engines.model_file import (  # noqa: PLC0415
            check_onnx_against_card,
            read_onnx_io,
        )

        card = load_card(m.path)
        if m.path.suffix.lower() != ".plan":
            check_onnx_against_card(m.path, read_onnx_io(m.path), card)
        return _Model(None, "tensorrt (not built)", card, digest)
    if opener is not None:
        loaded = load_model(config, opener=opener)
        if m.warmup < 1:  # the check runs one batch whatever the warm-up
            try:
                warm_up(loaded.engine, 1)
            except BaseException:
                loaded.engine.close()
                raise
        return _Model(loaded.engine, loaded.engine.name, loaded.card, digest, loaded)
    card = _card(m.path)
    engine = open_engine(
        m.path,
        backend=backend,
        precision=precision,
        max_batch=config.pipeline.max_batch,
        threads=m.threads,
        cache_dir=None,  # the check writes nothing
        mode=config.pipeline.mode,
        remote=m.triton.options() if m.triton is not None else None,
    )
    try:
        warm_up(engine, 1)
    except BaseException:
        engine.close()
        raise
    return _Model(engine, engine.name, card, digest)


def _assemble_pipeline(
    model: _Model, config: StationConfig, setups: dict[str, CameraSetup]
) -> None:
    """Build (not start) the pipeline: settings that only make sense against the model (tile
    overlap, rules that need mm², zone masks) are checked where it is built."""
    from defectd.pipeline.runner import Pipeline  # noqa: PLC0415

    if model.engine is None:
        return
    Pipeline(
        model.engine,
        model.card,
        config.pipeline,
        on_result=lambda _result: None,
        postprocess=config.postprocess,
        rules=config.rules,
        cameras=setups,
    )


def _check_sources(config: StationConfig, problems: _Problems) -> None:
    """Producers, replay paths and synthetic surfaces, as each source's start checks them."""
    from defectd.pipeline.sources.gentl import resolve_producers  # noqa: PLC0415
    from defectd.pipeline.sources.replay import ReplaySource  # noqa: PLC0415
    from defectd.pipeline.sources.synthetic import SyntheticSource  # noqa: PLC0415

    for i, cam in enumerate(config.cameras):
        src = cam.source
        if isinstance(src, GenICamSourceConfig):
            check = partial(resolve_producers, src.producers, camera=src.camera)
            problems.attempt(f"cameras.{i}.producers", check)
        elif isinstance(src, ReplaySourceConfig):
            problems.attempt(f"cameras.{i}.path", ReplaySource(src, config.station).probe)
        elif isinstance(src, SyntheticSourceConfig):
            problems.attempt(f"cameras.{i}.surfaces", SyntheticSource(src, config.station).probe)


def _start(source: Source) -> bool:
    source.start(lambda _frame: None)
    return True


def _open_cameras(config: StationConfig, problems: _Problems) -> tuple[str, ...]:
    """Start and stop every camera source (GenICam: open and configure the device)."""
    from defectd.pipeline.sources import make_sources  # noqa: PLC0415

    opened: list[str] = []
    sources = make_sources([c.source for c in config.cameras], config.station)
    for i, source in enumerate(sources):
        camera = config.cameras[i].camera
        if problems.attempt(f"cameras.{i}", partial(_start, source)):
            opened.append(camera)
        source.stop(timeout=2.0)
    return tuple(opened)


def _check_zones(config: StationConfig, problems: _Problems) -> None:
    from defectd.pipeline.postprocess import load_zone_mask  # noqa: PLC0415

    zone_keys = [("postprocess.ignore_zones", config.postprocess.ignore_zones)] + [
        (f"cameras.{i}.ignore_zones", cam.ignore_zones) for i, cam in enumerate(config.cameras)
    ]
    for key, zones in zone_keys:
        for j, zone in enumerate(zones):
            if isinstance(zone, Path):
                problems.attempt(f"{key}.{j}", partial(load_zone_mask, zone))


def _check_shadow(config: StationConfig, problems: _Problems, warnings: list[str]) -> None:
    """Open the candidate as the daemon will, check its calibration and assemble its pipeline."""
    shadow = config.shadow
    if shadow is None or not shadow.enabled:
        return
    from defectd.daemon.shadow.runner import (  # noqa: PLC0415  (opens an engine)
        candidate_calibrations,
        candidate_config,
        candidate_setups,
        check_calibration_names,
    )
    from defectd.daemon.station import model_precision  # noqa: PLC0415

    candidate = candidate_config(config, shadow)
    files = candidate_calibrations(config, shadow)
    choice = problems.attempt("shadow.precision", lambda: model_precision(candidate, files))
    if choice is None:
        return
    warnings.extend(f"shadow.precision: {d.message()}" for d in choice.differs)
    model = problems.attempt("shadow.path", lambda: _open_model(candidate, choice.precision))
    if model is None:
        return
    try:
        card_sha = model.card.sha256

        def calibration() -> dict[str, CameraSetup]:
            check_calibration_names(shadow, card_sha)
            return candidate_setups(config, shadow)

        setups = problems.attempt("shadow.calibration", calibration)
        if setups is not None:
            problems.attempt("shadow", lambda: _assemble_pipeline(model, config, setups))
    finally:
        if model.engine is not None:
            model.engine.close()


def check_station(
    config: StationConfig, *, open_cameras: bool = False, opener: EngineOpener | None = None
) -> StationCheck:
    """Open (and close) everything ``defectd run`` opens before its first frame; see the module.

    With ``opener`` the model is opened with it as the service opens it (this writes its compile
    cache) and returned open in ``StationCheck.loaded``; the caller then owns its engine. The
    check closes it itself when it raises.

    Raises one ``ConfigError`` naming the config file and every key at fault.
    """
    from defectd.daemon.station import camera_setup, model_precision  # noqa: PLC0415

    problems = _Problems()
    warnings: list[str] = []
    d = config.daemon
    problems.attempt("daemon.state_dir", lambda: creatable(config.state_dir, is_dir=True))
    if config.model.cache_dir is not None:
        cache = config.model.cache_dir
        problems.attempt("model.cache_dir", lambda: creatable(cache, is_dir=True))
    problems.attempt("outbox.path", lambda: creatable(config.outbox.path, is_dir=False))
    if config.archive.enabled:
        problems.attempt("archive.dir", lambda: creatable(config.archive.dir, is_dir=True))
    problems.attempt("audit.path", lambda: creatable(config.audit.path, is_dir=False))
    if d.result_ledger is not None:
        ledger = d.result_ledger
        problems.attempt("daemon.result_ledger", lambda: creatable(ledger, is_dir=False))
    key = "mqtt.password_file" if config.mqtt.password_file is not None else "mqtt.password_env"
    problems.attempt(key, config.mqtt.read_password)
    problems.attempt("mqtt.tls", lambda: _check_tls(config))

    setups: dict[str, CameraSetup] = {}
    for i, cam in enumerate(config.cameras):
        setup = problems.attempt(f"cameras.{i}.calibration", partial(camera_setup, cam))
        if setup is not None:
            setups[cam.camera] = setup
    _check_zones(config, problems)
    _check_sources(config, problems)

    choice = problems.attempt("model.precision", lambda: model_precision(config))
    model = None
    if choice is not None:
        warnings.extend(f"model.precision: {d.message()}" for d in choice.differs)
        precision = choice.precision
        # Kept for the service only when nothing is wrong so far: a config that fails here
        # anyway is opened as `config check` opens it (no cache written, same messages).
        keep = opener if not problems.lines else None
        model = problems.attempt("model.path", lambda: _open_model(config, precision, keep))
    handed = False
    try:
        if model is not None:
            card = model.card
            problems.attempt("drift.reference", lambda: check_reference(config.drift, card))
            problems.attempt("pipeline", lambda: _assemble_pipeline(model, config, setups))
        _check_shadow(config, problems, warnings)
        opened: tuple[str, ...] = ()
        if open_cameras and not problems.lines:
            opened = _open_cameras(config, problems)
        if problems.lines:
            raise ConfigError(one_line(f"{config.source_path}: " + "; ".join(problems.lines)))
        assert model is not None
        result = StationCheck(
            engine=model.engine_name,
            model=model.card.name,
            model_sha256=model.sha256,
            cameras_opened=opened,
            warnings=tuple(warnings),
            loaded=model.loaded,
        )
        handed = model.loaded is not None
        return result
    finally:
        if model is not None and model.engine is not None and not handed:
            model.engine.close()


__all__ = ["StationCheck", "check_station", "creatable"]
