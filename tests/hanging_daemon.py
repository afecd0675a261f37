"""``python tests/hanging_daemon.py HANG_FILE <defectd arguments>``: the ``defectd`` command
with an engine whose ``infer`` blocks while ``HANG_FILE`` exists (the inference thread
"hangs"), so tests can show that a stuck pipeline stops the systemd watchdog pings."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from defectd.cli import main
from defectd.cli.app import Injected
from defectd.engines import open_engine
from defectd.engines.base import Engine, EngineSpec


class HangingEngine:
    """Wraps an engine; ``infer`` blocks while ``hang_file`` exists."""

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

    @property
    def model_file(self) -> Path:
        return self._engine.model_file

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        while self._hang_file.exists():
            time.sleep(0.05)
        return self._engine.infer(batch)

    def close(self) -> None:
        self._engine.close()


def hanging_opener(hang_file: Path) -> Any:
    """An engine opener (see ``defectd.daemon.station.EngineOpener``) that wraps the real one."""

    def open_hanging(model_path: Path, **options: Any) -> Engine:
        return HangingEngine(open_engine(model_path, **options), hang_file)

    return open_hanging


if __name__ == "__main__":
    hang = Path(sys.argv[1])
    sys.exit(main(sys.argv[2:], injected=Injected(engine_opener=hanging_opener(hang))))
