"""Building the station's parts from its config: engine (warmed up), per-camera setups.

Kept apart from the life cycle (``service.py``) so that start and SIGHUP reload build things
the same way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from defectd.calibration.file import load_calibration
from defectd.clock import SYSTEM_CLOCK, Clock
from defectd.daemon.config import StationCamera, StationConfig
from defectd.engines import open_engine
from defectd.engines.base import Engine
from defectd.engines.remote import TritonOptions
from defectd.errors import ConfigError, DefectdError, ModelError
from defectd.log import get_logger
from defectd.model.card import ModelCard, file_sha256, load_card
from defectd.pipeline.cameras import CameraSetup, camera_setup_from_calibration
from defectd.pipeline.runner import Pipeline, ResultSink
from defectd.pipeline.sources import GenICamSourceConfig, SourceConfig, SyntheticSourceConfig

log = get_logger(__name__)


class EngineOpener(Protocol):
    """How the station opens its engine: ``defectd.engines.open_engine`` (tests hand in one
    that wraps it, e.g. an engine that blocks on demand)."""

    def __call__(
        self,
        model_path: Path,
        *,
        backend: str,
        precision: str | None,
        max_batch: int,
        threads: int | None,
        cache_dir: Path | None,
        mode: str,
        remote: TritonOptions | None = None,
    ) -> Engine: ...


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """An opened, warmed-up engine with the card and file hash it was opened from."""

    engine: Engine
    card: ModelCard
    path: Path
    file_sha256: str
    load_s: float
    executed: Path  # the file the engine runs: model.int8.onnx for int8, a TensorRT plan ...
    executed_sha256: str  # what every verdict names as its model


@dataclass(frozen=True, slots=True)
class Generation:
    """What one (re)load built: the config in force, its model and its pipeline."""

    config: StationConfig
    model: LoadedModel
    pipeline: Pipeline


def build_generation(
    config: StationConfig,
    on_result: ResultSink,
    *,
    opener: EngineOpener = open_engine,
    clock: Clock = SYSTEM_CLOCK,
    model: LoadedModel | None = None,
) -> Generation:
    """Open and warm up the model, read the cameras' calibration and build (not start) the
    pipeline that calls ``on_result``. The engine is closed again when a later step fails.

    ``model``: ``config``'s model, already opened by ``load_model`` (``defectd run``'s pre-flight
    check); it is used instead of opening one and owned from here like one opened here."""
    if model is None:
        model = load_model(config, opener=opener)
    try:
        pipeline = Pipeline(
            model.engine,
            model.card,
            config.pipeline,
            on_result=on_result,
            postprocess=config.postprocess,
            rules=config.rules,
            cameras=camera_setups(config),
            clock=clock,
            config_hash=config.hash(),
            model_sha256=model.executed_sha256,
        )
    except BaseException:
        model.engine.close()
        raise
    return Generation(config, model, pipeline)


def _card_for(path: Path) -> ModelCard:
    if path.suffix.lower() == ".pt":
        # torch only for a .pt checkpoint: ONNX stations need not import it.
        from defectd.model.checkpoint import load_checkpoint  # noqa: PLC0415

        return load_checkpoint(path)[1]
    return load_card(path)


_NO_FILE = "no calibration file names this model"
# (camera name, or "[shadow] candidate" for shadow.calibration; its calibration file)
Calibrations = Sequence[tuple[str, Path]]


def _who(label: str) -> str:
    return label if label.startswith("[") else f"camera {label}"


def calibration_files(config: StationConfig) -> Calibrations:
    """The cameras' calibration files, each with its camera's name."""
    return tuple((c.camera, c.calibration) for c in config.cameras if c.calibration is not None)


@dataclass(frozen=True, slots=True)
class PrecisionDiffers:
    """A calibration file for the model that names another precision than ``model.precision``."""

    camera: str
    file: Path
    calibrated: str
    configured: str

    def message(self) -> str:
        return (
            f"{_who(self.camera)}: {self.file} was calibrated at {self.calibrated}, "
            f"the config asks for {self.configured}: its threshold was not chosen at the "
            "precision the daemon runs"
        )


@dataclass(frozen=True, slots=True)
class PrecisionChoice:
    """The precision to open the model at (``None``: the engines' default) and why."""

    precision: str | None
    reason: str
    differs: tuple[PrecisionDiffers, ...] = ()


def choose_precision(
    card: ModelCard, configured: str | None, calibrations: Calibrations
) -> PrecisionChoice:
    """The precision the model runs at: what eval and calibration promise, the daemon does.

    A calibration file applies to the model when its threshold section names the model's
    sha256; it was calibrated at its ``precision`` (an older file without one: the card's).
    ``configured`` (``model.precision``) wins, with a ``PrecisionDiffers`` for each applying
    file that names another precision. Without it, the applying files' precision is used;
    files that name different precisions raise ``ConfigError`` naming the cameras and files.
    No applying file: ``None`` (the engines' default, e.g. the card's fast precision).
    """
    applying: dict[str, list[tuple[str, Path]]] = {}
    for camera, path in calibrations:
        try:
            th = load_calibration(path).threshold
        except DefectdError:
            continue  # named where the camera's setup is read
        if th is None or not th.model_sha256 or th.model_sha256 != card.sha256:
            continue
        applying.setdefault(th.ran_at(card.precision), []).append((camera, path))
    if configured is not None:
        differs = tuple(
            PrecisionDiffers(camera, path, calibrated, configured)
            for calibrated, files in applying.items()
            if calibrated != configured
            for camera, path in files
        )
        return PrecisionChoice(configured, "model.precision", differs)
    if not applying:
        return PrecisionChoice(None, _NO_FILE)

    def named(files: list[tuple[str, Path]]) -> str:
        return ", ".join(f"{_who(camera)} ({path})" for camera, path in files)

    if len(applying) > 1:
        listed = "; ".join(f"{p}: {named(files)}" for p, files in sorted(applying.items()))
        raise ConfigError(
            f"model.precision: the calibration files for model {card.name} were calibrated at "
            f"different precisions ({listed}); recalibrate them at one precision or set "
            "model.precision"
        )
    ((precision, files),) = applying.items()
    return PrecisionChoice(precision, f"calibrated at {precision}: {named(files)}")


def model_precision(
    config: StationConfig, calibrations: Calibrations | None = None
) -> PrecisionChoice:
    """``choose_precision`` for ``config.model`` and ``calibrations`` (default: the cameras').
    A model or card that cannot be read leaves ``model.precision`` as it is (opening the model
    names that problem)."""
    m = config.model
    files = calibration_files(config) if calibrations is None else calibrations
    try:
        card = _card_for(m.path) if files else None
    except DefectdError:
        card = None
    if card is None:
        return PrecisionChoice(m.precision, "model.precision" if m.precision else _NO_FILE)
    return choose_precision(card, m.precision, files)


def log_precision(choice: PrecisionChoice, model: str) -> None:
    """Log where the precision comes from and each calibration file that names another."""
    log.info("model_precision", model=model, precision=choice.precision, reason=choice.reason)
    for d in choice.differs:
        log.warning(
            "calibration_precision_differs",
            camera=d.camera,
            file=str(d.file),
            calibrated=d.calibrated,
            configured=d.configured,
        )


def load_model(
    config: StationConfig,
    *,
    opener: EngineOpener = open_engine,
    calibrations: Calibrations | None = None,
) -> LoadedModel:
    """Open ``config.model`` with ``opener`` for the pipeline's batch size and warm it up.

    Its precision: ``model_precision`` with ``calibrations`` (default: the cameras' files).
    Raises ``ModelError``/``EngineError`` naming the file when it cannot be opened or run,
    ``ConfigError`` when the calibration files name different precisions.
    """
    m = config.model
    t0 = time.monotonic()
    if not m.path.is_file():
        raise ModelError(f"model.path: model file not found: {m.path}")
    digest = file_sha256(m.path)
    card = _card_for(m.path)
    files = calibration_files(config) if calibrations is None else calibrations
    choice = choose_precision(card, m.precision, files)
    log_precision(choice, card.name)
    if m.cache_dir is not None:
        try:
            m.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelError(f"model.cache_dir: cannot create {m.cache_dir}: {exc}") from None
    # Only a triton station passes its server: test openers need not know the keyword.
    remote = {} if m.triton is None else {"remote": m.triton.options()}
    engine = opener(
        m.path,
        backend=m.backend,
        precision=choice.precision,
        max_batch=config.pipeline.max_batch,
        threads=m.threads,
        cache_dir=m.cache_dir,
        mode=config.pipeline.mode,
        **remote,
    )
    try:
        warm_up(engine, m.warmup)
    except Exception:
        engine.close()
        raise
    executed = engine.model_file
    executed_sha256 = digest if executed == m.path else file_sha256(executed)
    load_s = time.monotonic() - t0
    log.info(
        "model_loaded",
        model=card.name,
        sha256=executed_sha256,
        engine=engine.name,
        version=engine.version,
        path=str(m.path),
        executed=str(executed),
        load_s=round(load_s, 3),
    )
    return LoadedModel(engine, card, m.path, digest, load_s, executed, executed_sha256)


def warm_up(engine: Engine, rounds: int) -> None:
    """Run ``rounds`` inferences at batch 1 and at the largest batch, so the first real frames
    do not pay for lazy compilation and allocation."""
    spec = engine.spec
    for n in sorted({spec.min_batch, spec.max_batch}):
        batch = np.zeros((n, spec.channels, spec.height, spec.width), np.float32)
        for _ in range(rounds):
            out = engine.infer(batch)
            if out.shape != (n, spec.outputs, spec.height, spec.width):
                raise ModelError(
                    f"engine {engine.name} returned {out.shape} for a batch of {n}; "
                    f"expected ({n}, {spec.outputs}, {spec.height}, {spec.width})"
                )


def camera_setup(camera: StationCamera) -> CameraSetup:
    """The pipeline's view of one camera: ROI, zones, and what its calibration file holds.

    Raises ``ConfigError`` naming the calibration file and key when it is invalid.
    """
    frame_size, channels = configured_format(camera.source)
    if camera.calibration is None:
        setup = CameraSetup(roi=camera.roi, ignore_zones=camera.ignore_zones)
    else:
        setup = camera_setup_from_calibration(
            camera.calibration, roi=camera.roi, ignore_zones=camera.ignore_zones
        )
    return dataclasses.replace(setup, frame_size=frame_size, channels=channels)


def configured_format(source: SourceConfig) -> tuple[tuple[int, int] | None, int]:
    """``((H, W) or None, channels)`` that a camera's frames must have, from its source config:
    the synthetic line's size, a GenICam camera's ``Width``/``Height`` nodes when both are set
    (its size otherwise comes from the device), every source's output channels."""
    if isinstance(source, SyntheticSourceConfig):
        return (source.height, source.width), source.channels
    if isinstance(source, GenICamSourceConfig):
        w, h = source.nodes.get("Width"), source.nodes.get("Height")
        if type(w) is int and type(h) is int:  # not a bool, not a string node value
            return (h, w), source.channels
    return None, source.channels


def camera_setups(config: StationConfig) -> dict[str, CameraSetup]:
    setups: dict[str, CameraSetup] = {}
    for cam in config.cameras:
        try:
            setups[cam.camera] = camera_setup(cam)
        except DefectdError as exc:
            raise ConfigError(f"cameras.{cam.camera}.calibration: {exc}") from exc
    return setups
