"""Pieces of station configs (TOML text), model copies and a service on a thread: what many
daemon tests share."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from defectd.daemon.service import Service
from defectd.model.card import card_path


def model_section(model: Path | str) -> str:
    """``[model]`` for a small ONNX model on ONNX Runtime: one thread, one warm-up round
    (tests run beside each other on few cores)."""
    return f'[model]\npath = "{model}"\nbackend = "ort"\nthreads = 1\nwarmup = 1'


def synthetic_station(station: str, model: Path | str) -> str:
    """The head of a station config: its name, ``[model]`` (see ``model_section``) and a
    synthetic camera ``cam0`` whose further keys the caller appends."""
    camera = '[[cameras]]\ntype = "synthetic"\ncamera = "cam0"'
    return f'station = "{station}"\n{model_section(model)}\n{camera}'


# ``[mqtt]`` for a broker that never answers (port 1): results wait in the outbox, and the
# publisher retries quickly; ``[health]`` off (no port to pick).
NO_BROKER_NO_HEALTH = """[mqtt]
port = 1
reconnect_min_s = 0.5
reconnect_max_s = 1
connect_timeout_s = 1
[health]
enabled = false"""


# ``[pipeline]`` that gives every frame its verdict: no deadline, and intake waits instead of
# rejecting (a run's verdicts then do not depend on how busy the machine is).
EVERY_FRAME = '[pipeline]\nmax_latency_ms = 0\nadmission = "block"'


def run_to_the_end(port: int, state_dir: Path) -> str:
    """``[mqtt]`` on the test broker's ``port``, ``[health]`` off, and ``[daemon]`` with
    ``state_dir`` and an exit once the cameras have delivered all their parts."""
    return (
        f"[mqtt]\nport = {port}\n[health]\nenabled = false\n"
        f'[daemon]\nstate_dir = "{state_dir}"\nexit_when_sources_end = true'
    )


# ``[health]`` and ``[archive]`` off: no port to pick, nothing written beside the outbox.
NO_HEALTH_NO_ARCHIVE = """[health]
enabled = false
[archive]
enabled = false"""


def copy_model(model: Path, folder: Path) -> Path:
    """A private copy of ``model`` and its card as ``folder/model.onnx`` (``folder`` is made),
    so files a test writes beside the model stay in that test; returns the copy's path."""
    folder.mkdir()
    shutil.copyfile(model, folder / "model.onnx")
    shutil.copyfile(card_path(model), folder / "model.card.json")
    return folder / "model.onnx"


@contextmanager
def serving(
    service: Service,
    until: Callable[[], bool] = lambda: True,
    *,
    start_s: float = 30.0,
    stop_s: float = 30.0,
) -> Iterator[None]:
    """Runs ``service.serve`` on a thread (``test-service``) and waits, at most ``start_s``
    and while that thread lives, until ``until()`` holds; after the body the service is asked
    to exit and its thread must end within ``stop_s``."""
    thread = threading.Thread(target=service.serve, name="test-service")
    thread.start()
    deadline = time.monotonic() + start_s
    while not until():
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    yield
    service.should_exit = True
    thread.join(stop_s)
    assert not thread.is_alive()
