"""``defectd demo``: the demo station end to end, with the local or the embedded broker."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from defectd.demo import (
    DEMO_STATION,
    Confusion,
    DemoSummary,
    EmbeddedBroker,
    broker_reachable,
    find_demo_model,
    repo_root,
    run_demo,
    summary_table,
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
    for rate in ("escape_rate", "false_reject_rate"):
        assert confusion[f"{rate}_low"] <= confusion[rate] <= confusion[f"{rate}_high"]


def test_demo_reports_its_rates_with_their_95_percent_intervals() -> None:
    confusion = Confusion(true_reject=89, escape=6, false_reject=8, true_pass=199)
    c = confusion.as_dict()
    assert c["escape_rate"] == pytest.approx(6 / 95, abs=1e-4)
    # Wilson score 95% intervals of 6 of 95 and 8 of 207.
    assert (c["escape_rate_low"], c["escape_rate_high"]) == pytest.approx(
        (0.0293, 0.1310), abs=1e-4
    )
    assert (c["false_reject_rate_low"], c["false_reject_rate_high"]) == pytest.approx(
        (0.0197, 0.0744), abs=1e-4
    )
    summary = DemoSummary(
        station="s", model="m", engine="e", broker="b", duration_s=1.0, parts=302,
        verdicts={"pass": 205, "fail": 97, "error": 0}, fps=10.0, latency_ms={}, confusion=c,
        published_received=302, outbox_left=0, archive_dir="a", rejects=[],
    )  # fmt: skip
    rows = dict(zip(*(col.cells for col in summary_table(summary).columns), strict=True))
    assert rows["escape rate (95% interval)"] == "6.3% (2.9% to 13.1%)"
    assert rows["false-reject rate (95% interval)"] == "3.9% (2.0% to 7.4%)"


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
