"""Drift monitoring: calibrated charts, the monitor's alarm and its evidence, the drifting
synthetic line, the ``[drift]`` config, and the whole daemon raising (and not raising) it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from defectd.cli import main
from defectd.daemon.archive import Archive, ArchiveConfig
from defectd.daemon.config import load_station_config
from defectd.daemon.drift import CameraDrift, DriftConfig, DriftMonitor, DriftState
from defectd.daemon.service import Service
from defectd.data.drift import (
    Chart,
    DriftReference,
    alarm_rate,
    drift_reference,
    ewma_limit,
    image_statistics,
    null_distribution,
    stat_reference,
)
from defectd.data.synth import PartRenderer
from defectd.errors import ConfigError
from defectd.model.card import ModelCard, load_card
from defectd.pipeline.frame import Frame
from defectd.pipeline.inspection import Inspection, Verdict
from defectd.pipeline.runner import PipelineResult
from defectd.pipeline.sources.base import SyntheticSourceConfig
from defectd.pipeline.sources.synthetic import apply_drift, drift_fraction
from station_support import NO_BROKER_NO_HEALTH, copy_model, synthetic_station

SIZE = 48


def _parts(n: int, seed: int = 0) -> list[np.ndarray]:
    renderer = PartRenderer(SIZE, SIZE, bank_size=2)
    rng = np.random.default_rng(seed)
    return [renderer.render(rng, defect_prob=0.0).image for _ in range(n)]


def _result(
    image: np.ndarray, seq: int, verdict: Verdict = Verdict.PASS, camera: str = "cam0"
) -> PipelineResult:
    rule = "error:engine_error" if verdict is Verdict.ERROR else None
    ins = Inspection("st", camera, seq, verdict, rule=rule)
    frame = Frame("st", camera, seq, image, 0, 0.0, part_id=f"{camera}-{seq}")
    return PipelineResult(ins, frame, None, score=None if verdict is Verdict.ERROR else 0.1)


# ---------------------------------------------------------------------------- the chart


def test_limit_meets_its_false_alarm_rate_on_simulated_normal_parts() -> None:
    rng = np.random.default_rng(1)
    ref = stat_reference(rng.normal(0.0, 1.0, 2000))
    mean, std, z, w = null_distribution("brightness", ref)
    h = ewma_limit(z, w, 0.05, 2e-3, ref.n)
    assert alarm_rate(z, w, 0.05, h, ref.n) <= 2e-3
    chart = Chart(mean, std, 0.05, h)
    alarms = 0
    for x in rng.normal(0.0, 1.0, 100_000):
        if chart.update(float(x)) >= 1.0:
            alarms += 1
            chart.e = 0.0
    # Expected 200 alarms; a Poisson count stays within 200 +- 5 sigma (about 70).
    assert 120 <= alarms <= 280


def test_rare_errors_in_the_reference_still_give_a_finite_limit_above_one_error() -> None:
    never = stat_reference(np.zeros(500))  # no error in 500 reference parts
    mean, std, z, w = null_distribution("error", never)
    assert 0.0 < mean < 0.01 and std > 0
    lam = 0.02
    h = ewma_limit(z, w, lam, 1e-6, 500)
    one_error_jump = lam * float(z.max())
    assert one_error_jump < h < 1e3  # one error alone never alarms


def test_image_statistics_follow_light_and_blur() -> None:
    image = _parts(1)[0]
    b, c, s = image_statistics(image)
    dim = apply_drift(
        SyntheticSourceConfig(camera="c", drift_after=0, drift_kind="lighting", drift_amount=0.5),
        image,
        0,
    )
    smooth = apply_drift(
        SyntheticSourceConfig(camera="c", drift_after=0, drift_kind="texture", drift_amount=1.0),
        image,
        0,
    )
    assert image_statistics(dim)[0] == pytest.approx(b / 2, rel=0.02)
    assert image_statistics(smooth)[2] < 0.7 * s
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    assert image_statistics(rgb) == pytest.approx((b, c, s), rel=1e-3)


# ---------------------------------------------------------------------------- the monitor

FAST = DriftConfig(learn_parts=60, smoothing=0.1, false_alarm_rate=1e-4)


def test_monitor_learns_then_alarms_on_dimmer_light_with_evidence_and_clears() -> None:
    raised: list[CameraDrift] = []
    cleared: list[CameraDrift] = []
    monitor = DriftMonitor(FAST, on_alarm=raised.append, on_clear=cleared.append, background=False)
    images = _parts(300)
    dim = SyntheticSourceConfig(camera="c", drift_after=0, drift_amount=0.4)
    for i in range(60):
        monitor.observe(_result(images[i], i))
    assert monitor.snapshot()["cam0"].state is DriftState.WATCHING
    for i in range(60, 160):
        monitor.observe(_result(images[i], i))
    assert not raised
    seq = 160
    while not raised and seq < 220:
        monitor.observe(_result(apply_drift(dim, images[seq], 0), seq))
        seq += 1
    assert raised, "a 40 % dimmer line must alarm within 60 parts"
    alarm = raised[0]
    # Dimming scales every grey level: brightness and contrast both fall.
    assert alarm.worst in {"brightness", "contrast"} and alarm.score >= 1.0
    assert alarm.part_id == f"cam0-{seq - 1}"
    evidence = alarm.evidence()["statistics"]["brightness"]
    assert evidence["now"] < 0.85 * evidence["reference"]
    assert monitor.snapshot()["cam0"].state is DriftState.ALARM
    for i in range(seq, 300):  # the light comes back: the alarm clears once, by hysteresis
        monitor.observe(_result(images[i], i))
    assert len(cleared) == 1 and len(raised) == 1
    assert cleared[0].score < FAST.clear_below


def test_a_rise_in_error_verdicts_alarms_on_the_error_rate() -> None:
    raised: list[CameraDrift] = []
    monitor = DriftMonitor(FAST, on_alarm=raised.append, background=False)
    images = _parts(64)
    for i in range(200):
        monitor.observe(_result(images[i % 64], i))
    for i in range(200, 260):
        verdict = Verdict.ERROR if i % 3 == 0 else Verdict.PASS
        monitor.observe(_result(images[i % 64], i, verdict))
    assert raised and raised[0].worst == "error"


def test_stopping_errors_are_not_drift() -> None:
    monitor = DriftMonitor(FAST, background=False)
    image = _parts(1)[0]
    ins = Inspection("st", "cam0", 0, Verdict.ERROR, rule="error:stopped")
    monitor.observe(PipelineResult(ins, Frame("st", "cam0", 0, image, 0, 0.0), None))
    assert monitor.snapshot() == {}


def test_cameras_are_watched_separately() -> None:
    raised: list[CameraDrift] = []
    monitor = DriftMonitor(FAST, on_alarm=raised.append, background=False)
    images = _parts(200)
    dim = SyntheticSourceConfig(camera="c", drift_after=0, drift_amount=0.5)
    for i in range(200):
        monitor.observe(_result(images[i], i, camera="a"))
        late = i >= 100
        monitor.observe(
            _result(apply_drift(dim, images[i], 0) if late else images[i], i, camera="b")
        )
    assert {r.camera for r in raised} == {"b"}
    assert monitor.snapshot()["a"].state is DriftState.WATCHING


def test_card_reference_watches_image_statistics_from_the_first_part() -> None:
    images = _parts(100)
    columns = zip(*(image_statistics(im) for im in images), strict=True)
    ref = drift_reference(dict(zip(("brightness", "contrast", "sharpness"), columns, strict=True)))
    card = ModelCard(name="m", drift=ref)
    raised: list[CameraDrift] = []
    monitor = DriftMonitor(FAST, on_alarm=raised.append, background=False)
    monitor.set_model(card)
    monitor.observe(_result(images[0], 0))
    view = monitor.snapshot()["cam0"]
    assert set(view.statistics) == {"brightness", "contrast", "sharpness"}
    assert view.state is DriftState.LEARNING and view.learning_left == FAST.learn_parts - 1
    dim = SyntheticSourceConfig(camera="c", drift_after=0, drift_amount=0.5)
    for i in range(1, 40):
        monitor.observe(_result(apply_drift(dim, images[i], 0), i))
    assert raised and raised[0].worst in {"brightness", "contrast"}
    learn_only = DriftMonitor(FAST.model_copy(update={"reference": "learn"}), background=False)
    learn_only.set_model(card)
    learn_only.observe(_result(images[0], 0))
    assert learn_only.snapshot()["cam0"].statistics == {}


def test_model_card_without_drift_profile_still_loads(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[1] / "models" / "demo" / "model.card.json"
    data = json.loads(shipped.read_text())
    data.pop("drift", None)  # as cards written before drift profiles existed
    (tmp_path / "old.card.json").write_text(json.dumps(data))
    card = load_card(tmp_path / "old.onnx")
    assert card.drift is None
    with_ref = card.model_copy(
        update={"drift": DriftReference(statistics={"brightness": stat_reference([1.0, 2.0])})}
    )
    with_ref.save(tmp_path / "m.card.json")
    assert load_card(tmp_path / "m.onnx").drift == with_ref.drift


def test_archive_keeps_more_passes_of_a_drifting_camera(tmp_path: Path) -> None:
    archive = Archive(ArchiveConfig(dir=tmp_path, pass_sample=0.01))
    passes = [Inspection("st", cam, i, Verdict.PASS) for i in range(2000) for cam in ("a", "b")]
    archive.set_pass_sample("a", 0.5)
    kept = {cam: sum(archive.wants(p) for p in passes if p.camera == cam) for cam in ("a", "b")}
    assert 850 < kept["a"] < 1150 and kept["b"] < 60
    archive.set_pass_sample("a", None)
    assert sum(archive.wants(p) for p in passes if p.camera == "a") < 60


# ---------------------------------------------------------------------------- the line


def test_drifting_line_is_the_stable_line_until_drift_after_then_a_pure_function() -> None:
    cfg = SyntheticSourceConfig(camera="c", drift_after=10, drift_amount=0.3, drift_ramp=4)
    assert [drift_fraction(cfg, n) for n in (0, 9, 10, 11, 13, 100)] == pytest.approx(
        [0.0, 0.0, 0.075, 0.15, 0.3, 0.3]
    )
    image = _parts(1)[0]
    assert apply_drift(cfg, image, 9) is image
    assert np.array_equal(apply_drift(cfg, image, 12), apply_drift(cfg, image, 12))


def test_drift_settings_are_validated_with_the_key_named(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        synthetic_station("st", "m.onnx")
        + '\ndrift_kind = "fog"\n[drift]\nsmoothing = 0\nstatistics = ["brightness", "hue"]\n'
        "learn_parts = 10\n"
    )
    with pytest.raises(ConfigError) as err:
        load_station_config(path)
    text = str(err.value)
    assert "cameras.0.synthetic.drift_kind" in text or "cameras.0.drift_kind" in text
    for key in ("drift.smoothing", "drift.statistics", "drift.learn_parts"):
        assert key in text
    assert "'hue'" in text


def _drift_station(tmp_path: Path, tiny_model: Path, drift: str, rest: str = "") -> Path:
    """``s.toml``: a 64 x 64 synthetic camera on a private copy of ``tiny_model``, the
    ``[drift]`` lines ``drift``, then the sections ``rest``."""
    model = copy_model(tiny_model, tmp_path / "model")
    path = tmp_path / "s.toml"
    path.write_text(
        synthetic_station("st", model) + f"\nheight = 64\nwidth = 64\n[drift]\n{drift}\n{rest}"
    )
    return path


def test_config_check_names_a_bad_drift_key(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _drift_station(tmp_path, tiny_model, "false_alarm_rate = 0.5")
    assert main(["config", "check", str(path)]) == 2
    assert "drift.false_alarm_rate" in capsys.readouterr().err


def test_card_reference_without_a_profile_in_the_card_is_refused_by_check_and_run(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _drift_station(
        tmp_path,
        tiny_model,
        'reference = "card"',
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n{NO_BROKER_NO_HEALTH}',
    )
    assert main(["config", "check", str(path)]) == 2
    check = capsys.readouterr().err.strip().splitlines()[-1]
    assert "drift.reference: 'card' but the card of model 'tiny' has no drift profile" in check
    assert main(["run", "--config", str(path)]) == 2
    assert "drift.reference: 'card'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the daemon


def _station(tmp_path: Path, model: Path, extra: str) -> Path:
    path = tmp_path / "station.toml"
    path.write_text(
        synthetic_station("drift", model)
        + f"\nheight = 64\nwidth = 64\nrate_hz = 100\ncount = 300\nseed = 3\n{extra}\n"
        + NO_BROKER_NO_HEALTH
        + '\n[pipeline]\nadmission = "block"\nmax_latency_ms = 0\n'
        + "[drift]\nlearn_parts = 80\nsmoothing = 0.1\nfalse_alarm_rate = 1e-4\n"
        + f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nexit_when_sources_end = true\n'
        + "drain_timeout_s = 2\n"
    )
    return path


def _serve(path: Path) -> tuple[Service, list[CameraDrift]]:
    service = Service(load_station_config(path), install_signals=False)
    assert service.drift is not None
    raised: list[CameraDrift] = []
    service.drift.listen(on_alarm=raised.append)
    service.serve()
    assert service.drift.wait_calibrated(10.0)
    return service, raised


def test_daemon_raises_drift_alarm_with_evidence_when_the_line_dims(
    tmp_path: Path, tiny_model: Path
) -> None:
    path = _station(
        tmp_path, tiny_model, 'drift_after = 200\ndrift_kind = "lighting"\ndrift_amount = 0.5'
    )
    service, raised = _serve(path)
    assert len(raised) == 1
    alarm = raised[0]
    part = int(alarm.part_id.rsplit("-", 1)[1])
    assert 200 <= part < 300
    # The frames got darker; the model's answers may move too (what moved most leads).
    brightness = alarm.statistics["brightness"]
    assert brightness.now < 0.8 * brightness.reference
    assert alarm.evidence()["statistic"] == alarm.worst
    scrape = service.scrape()
    assert 'defectd_drift_alarms_total{camera="cam0"} 1.0' in scrape
    assert 'defectd_drift_score{camera="cam0"}' in scrape
    assert service.drift is not None and service.drift.snapshot()["cam0"].state is DriftState.ALARM
    archived = [
        json.loads(p.read_text())
        for p in (tmp_path / "state" / "archive" / "results").glob("*.json")
    ]
    passes_after = [r for r in archived if r["verdict"] == "pass" and r["seq"] > part]
    # 1 % of passes before the alarm, 20 % after it: several of the last parts are kept.
    assert len(passes_after) >= 3


def test_daemon_on_a_stable_line_raises_no_alarm(tmp_path: Path, tiny_model: Path) -> None:
    service, raised = _serve(_station(tmp_path, tiny_model, ""))
    assert raised == []
    assert service.drift is not None
    view = service.drift.snapshot()["cam0"]
    assert view.parts == 300 and view.state is DriftState.WATCHING
    assert math.isfinite(view.score) and view.score < 1.0
