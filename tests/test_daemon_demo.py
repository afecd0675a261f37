"""``defectd demo``: the demo station end to end, with the local or the embedded broker."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from defectd.demo import (
    DEMO_STATION,
    EmbeddedBroker,
    broker_reachable,
    find_demo_model,
    repo_root,
    run_demo,
)
from defectd.errors import ModelError

pytestmark = pytest.mark.slow


def test_demo_with_embedded_broker_inspects_and_delivers_every_part(
    tiny_model: Path, tmp_path: Path
) -> None:
    summary = run_demo(
        parts=24, model=tiny_model, state_dir=tmp_path, live=False, local_broker=False
    )
    assert summary.broker.startswith("embedded")
    assert summary.parts == 24
    assert sum(summary.verdicts.values()) == 24
    confusion = summary.confusion
    total = sum(confusion[k] for k in ("true_reject", "false_reject", "escape", "true_pass"))
    assert total == 24
    assert summary.outbox_left == 0
    assert summary.published_received == 24


def test_embedded_broker_starts_and_stops_on_a_free_port() -> None:
    broker = EmbeddedBroker()
    broker.start()
    try:
        assert broker_reachable(broker.host, broker.port)
    finally:
        broker.stop()
    assert not broker_reachable(broker.host, broker.port)


def test_missing_demo_model_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"demo model not found \(looked at .*nope\.onnx\)"):
        find_demo_model(tmp_path / "nope.onnx")


def test_demo_config_file_is_the_demo_station() -> None:
    raw = tomllib.loads((repo_root() / "configs" / "demo.toml").read_text())
    assert raw["station"] == DEMO_STATION["station"]
    assert raw["model"]["path"] == "../" + DEMO_STATION["model"]["path"]
    camera = raw["cameras"][0]
    for key, value in DEMO_STATION["cameras"][0].items():
        assert camera[key] == value, key
    assert raw["mqtt"] == DEMO_STATION["mqtt"]
    assert raw["pipeline"] == DEMO_STATION["pipeline"]
