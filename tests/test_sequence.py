"""``seq`` goes on across restarts: after a clean stop at the next number, after a crash past a
reserved block, never repeating."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from defectd.daemon.config import load_station_config
from defectd.daemon.sdnotify import SdNotifier
from defectd.daemon.sequence import SequenceStore
from defectd.daemon.service import Service
from station_support import EVERY_FRAME, NO_HEALTH_NO_ARCHIVE, synthetic_station


def batch_station(tmp: Path, model: Path, port: int, *, count: int) -> Path:
    """A synthetic camera delivering ``count`` parts as fast as it can; exits when done."""
    path = tmp / "station.toml"
    path.write_text(
        f"""{synthetic_station("ord", model)}
height = 64
width = 64
defect_rate = 0.5
count = {count}
{EVERY_FRAME}
[mqtt]
port = {port}
{NO_HEALTH_NO_ARCHIVE}
[daemon]
state_dir = "{tmp / "state"}"
exit_when_sources_end = true
"""
    )
    return path


def run_station(path: Path) -> None:
    service = Service(load_station_config(path), notifier=SdNotifier({}), install_signals=False)
    assert service.serve() == 0


@pytest.mark.slow
def test_seq_goes_on_after_a_restart(
    tmp_path: Path, tiny_model: Path, mosquitto: Any, mqtt_collector: Any
) -> None:
    broker = mosquitto()
    sub = mqtt_collector(broker.host, broker.port, "defectd/ord/+/result")
    config = batch_station(tmp_path, tiny_model, broker.port, count=8)
    run_station(config)
    run_station(config)  # a restart: same state directory
    assert sub.wait_for(lambda _: len(sub.payloads("/result")) >= 16, 20)
    assert sorted(p["seq"] for p in sub.payloads("/result")) == list(range(16))


def test_after_a_crash_numbers_jump_ahead_but_never_repeat(tmp_path: Path) -> None:
    store = SequenceStore(tmp_path, reserve=100)
    assert store.start("cam0") == 0
    for seq in range(250):  # crosses two reserved blocks
        store.used("cam0", seq)
    # No close(): the process died. The next start must not hand out 0..249 again.
    again = SequenceStore(tmp_path, reserve=100)
    first = again.start("cam0")
    assert 250 <= first <= 250 + 100
    assert again.start("cam1") == 0  # a new camera starts at 0
    again.used("cam0", first)
    again.close()
    assert SequenceStore(tmp_path).start("cam0") == first + 1  # a clean stop: no gap
