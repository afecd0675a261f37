"""Building the station's parts from its config: engine (warmed up), per-camera setups.

Kept apart from the life cycle (``service.py``) so that start and SIGHUP reload build things
the same way.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

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
) -> Generation:
    """Open and warm up the model, read the cameras' calibration and build (not start) the
    pipeline that calls ``on_result``. The engine is closed again when a later step fails."""
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


def load_model(config: StationConfig, *, opener: EngineOpener = open_engine) -> LoadedModel:
    """Open ``config.model`` with ``opener`` for the pipeline's batch size and warm it up.

    Raises ``ModelError``/``EngineError`` naming the file when it cannot be opened or run.
    """
    m = config.model
    t0 = time.monotonic()
    if not m.path.is_file():
        raise ModelError(f"model.path: model file not found: {m.path}")
    digest = file_sha256(m.path)
    card = _card_for(m.path)
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
        precision=m.precision,
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
            if out.shape != (n, 1, spec.height, spec.width):
                raise ModelError(
                    f"engine {engine.name} returned {out.shape} for a batch of {n}; "
                    f"expected ({n}, 1, {spec.height}, {spec.width})"
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
