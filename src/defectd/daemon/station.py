"""Building the station's parts from its config: engine (warmed up), per-camera setups.

Kept apart from the life cycle (``service.py``) so that start and SIGHUP reload build things
the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from defectd.daemon.config import StationCamera, StationConfig
from defectd.engines import open_engine
from defectd.engines.base import Engine, EngineSpec
from defectd.errors import ConfigError, DefectdError, ModelError
from defectd.log import get_logger
from defectd.model.card import ModelCard, file_sha256, load_card
from defectd.pipeline.cameras import CameraSetup, camera_setup_from_calibration

log = get_logger(__name__)

# Test hook, read once at start from the environment by the CLI: while the named file exists,
# every inference call blocks (the inference thread "hangs"), so tests can show that a stuck
# pipeline stops the systemd watchdog pings. Unset in production.
HANG_FILE_ENV = "DEFECTD_TEST_HANG_FILE"


class HangHookEngine:
    """Wraps an engine; ``infer`` blocks while ``hang_file`` exists (see ``HANG_FILE_ENV``)."""

    def __init__(self, engine: Engine, hang_file: Path) -> None:
        self._engine = engine
        self._hang_file = hang_file

    @property
    def name(self) -> str:
        return self._engine.name

    @property
    def precision(self) -> str:
        return self._engine.precision

    @property
    def version(self) -> str:
        return self._engine.version

    @property
    def spec(self) -> EngineSpec:
        return self._engine.spec

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        while self._hang_file.exists():
            time.sleep(0.05)
        return self._engine.infer(batch)

    def close(self) -> None:
        self._engine.close()


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """An opened, warmed-up engine with the card and file hash it was opened from."""

    engine: Engine
    card: ModelCard
    path: Path
    file_sha256: str
    load_s: float


def _card_for(path: Path) -> ModelCard:
    if path.suffix.lower() == ".pt":
        # torch only for a .pt checkpoint: ONNX stations need not import it.
        from defectd.model.checkpoint import load_checkpoint  # noqa: PLC0415

        return load_checkpoint(path)[1]
    return load_card(path)


def load_model(config: StationConfig, *, hang_file: Path | None = None) -> LoadedModel:
    """Open ``config.model`` for the pipeline's batch size and warm it up.

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
    engine: Engine = open_engine(
        m.path,
        backend=m.backend,
        precision=m.precision,
        max_batch=config.pipeline.max_batch,
        threads=m.threads,
        cache_dir=m.cache_dir,
    )
    try:
        warm_up(engine, m.warmup)
    except Exception:
        engine.close()
        raise
    if hang_file is not None:
        engine = HangHookEngine(engine, hang_file)
    load_s = time.monotonic() - t0
    log.info(
        "model_loaded",
        model=card.name,
        sha256=card.sha256 or digest,
        engine=engine.name,
        version=engine.version,
        path=str(m.path),
        load_s=round(load_s, 3),
    )
    return LoadedModel(engine, card, m.path, digest, load_s)


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
    if camera.calibration is None:
        return CameraSetup(roi=camera.roi, ignore_zones=camera.ignore_zones)
    return camera_setup_from_calibration(
        camera.calibration, roi=camera.roi, ignore_zones=camera.ignore_zones
    )


def camera_setups(config: StationConfig) -> dict[str, CameraSetup]:
    setups: dict[str, CameraSetup] = {}
    for cam in config.cameras:
        try:
            setups[cam.camera] = camera_setup(cam)
        except DefectdError as exc:
            raise ConfigError(f"cameras.{cam.camera}.calibration: {exc}") from exc
    return setups


def hang_file_from_env(env: dict[str, str] | os._Environ[str]) -> Path | None:
    raw = env.get(HANG_FILE_ENV)
    return Path(raw) if raw else None
