"""The pipeline end to end on a real ONNX Runtime engine: one verdict per frame, always."""

from __future__ import annotations

import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from defectd.errors import ConfigError, ModelError
from defectd.model.card import ModelCard
from defectd.pipeline.cameras import CameraSetup
from defectd.pipeline.config import PipelineConfig, Rect, RulesConfig
from defectd.pipeline.inspection import Verdict
from defectd.pipeline.runner import Pipeline, PipelineResult
from defectd.pipeline.tiling import axis_positions
from pipeline_support import OrtTestEngine, brightness_model, dark_frame


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    path = tmp_path_factory.mktemp("small") / "model.onnx"
    return path, brightness_model(path, size=64)


@pytest.fixture(scope="module")
def tile256(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    path = tmp_path_factory.mktemp("tile") / "model.onnx"
    return path, brightness_model(path, size=256)


class Collect:
    """A thread-safe sink that keeps every result."""

    def __init__(self) -> None:
        self.results: list[PipelineResult] = []
        self._lock = threading.Lock()

    def __call__(self, result: PipelineResult) -> None:
        with self._lock:
            self.results.append(result)

    def by_seq(self) -> dict[int, PipelineResult]:
        return {r.inspection.seq: r for r in self.results}

    def verdicts(self) -> list[str]:
        return [
            r.inspection.verdict.value for r in sorted(self.results, key=lambda r: r.inspection.seq)
        ]


@pytest.fixture
def run(small: tuple[Path, ModelCard]) -> Iterator[object]:
    """Factory: ``run(config=..., **pipeline kwargs) -> (pipeline, engine, sink)``; stops all."""
    made: list[Pipeline] = []

    def factory(
        config: PipelineConfig | None = None,
        *,
        model: tuple[Path, ModelCard] = small,
        engine: OrtTestEngine | None = None,
        start: bool = True,
        **kw: object,
    ) -> tuple[Pipeline, OrtTestEngine, Collect]:
        path, card = model
        eng = engine or OrtTestEngine(path, card)
        sink = Collect()
        pipe = Pipeline(eng, card, config, on_result=sink, **kw)  # type: ignore[arg-type]
        made.append(pipe)
        if start:
            pipe.start()
        return pipe, eng, sink

    yield factory
    for pipe in made:
        pipe.stop(timeout=2.0)


def test_every_frame_gets_one_verdict_that_matches_its_content(run) -> None:
    pipe, _, sink = run(PipelineConfig(max_batch=4, admission="block"))
    for i in range(24):
        pipe.submit(dark_frame(64, 64, seq=i, spots=[(20, 20, 6, 6)] if i % 3 == 0 else []))
    assert pipe.wait_idle(20)
    assert sorted(sink.by_seq()) == list(range(24))
    assert sink.verdicts() == ["fail" if i % 3 == 0 else "pass" for i in range(24)]
    fail = sink.by_seq()[0].inspection
    assert fail.rule == "any-defect" and len(fail.defects) == 1
    assert fail.defects[0].bbox == (20, 20, 6, 6)
    assert fail.model_name == "brightness" and fail.config_hash == pipe.config_hash
    assert set(fail.latencies_ms) == {
        "intake",
        "queue",
        "preprocess",
        "batch_wait",
        "infer",
        "post_wait",
        "postprocess",
        "total",
    }
    assert sink.by_seq()[1].inspection.rule == "none"


def test_the_result_mask_marks_the_defect_pixels_in_the_full_frame(run) -> None:
    pipe, _, sink = run()
    pipe.submit(dark_frame(64, 64, spots=[(30, 10, 4, 4)]))
    assert pipe.wait_idle(10)
    result = sink.results[0]
    assert result.mask is not None and result.mask.shape == (64, 64)
    ys, xs = np.nonzero(result.mask)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (30, 10, 33, 13)
    assert int(result.mask.sum()) == result.inspection.defects[0].area_px


@pytest.mark.parametrize("stitch", ["blend", "max"])
def test_a_small_defect_on_a_tile_seam_of_a_5mp_frame_is_found_once(run, tile256, stitch) -> None:
    xs = axis_positions(2448, 256, 32)
    ys = axis_positions(2048, 256, 32)
    seam_x = 256  # the right edge of the first tile column; the second starts at xs[1]
    assert xs[1] < seam_x - 4
    spots = [
        (seam_x - 4, 600, 8, 8),  # straddles where the first tile ends
        (xs[3] - 3, ys[2] - 3, 6, 6),  # on a tile corner: four tiles see it
        (1200, 1000, 5, 5),  # inside
    ]
    pipe, _, sink = run(
        PipelineConfig(max_batch=16, max_latency_ms=None, tile_overlap_px=32, stitch=stitch),
        model=tile256,
    )
    pipe.submit(dark_frame(2048, 2448, spots=spots))
    assert pipe.wait_idle(60)
    result = sink.results[0]
    inspection = result.inspection
    assert inspection.verdict is Verdict.FAIL
    assert pipe.stats().tiles == len(xs) * len(ys) == 99
    found = sorted(d.bbox for d in inspection.defects)
    assert found == sorted(spots)
    assert result.mask is not None and result.mask.shape == (2048, 2448)
    assert int(result.mask.sum()) == sum(d.area_px for d in inspection.defects)


def test_tiles_of_frames_from_several_cameras_share_batches(run) -> None:
    pipe, _, _ = run(PipelineConfig(max_batch=8, max_delay_ms=200), start=False)
    for i in range(16):
        pipe.submit(dark_frame(64, 64, camera=f"cam{i % 2}", seq=i))
    pipe.start()
    assert pipe.wait_idle(20)
    stats = pipe.stats()
    assert stats.tiles == 16
    assert stats.batches <= 4 and stats.mean_batch >= 4
    assert stats.cameras == {"cam0": {"pass": 8}, "cam1": {"pass": 8}}


def test_a_lone_frame_leaves_once_max_delay_has_passed(run) -> None:
    pipe, _, sink = run(PipelineConfig(max_batch=8, max_delay_ms=30))
    pipe.submit(dark_frame(64, 64))
    assert pipe.wait_idle(10)
    lat = sink.results[0].inspection.latencies_ms
    assert 25.0 <= lat["batch_wait"] < 1000.0


def test_a_corrupt_frame_gets_an_error_verdict_and_the_line_goes_on(run) -> None:
    pipe, _, sink = run()
    bad = dark_frame(64, 64, seq=0)
    bad.image = np.zeros((0, 64), np.uint8)
    pipe.submit(bad)
    pipe.submit(dark_frame(64, 64, seq=1))
    assert pipe.wait_idle(10)
    error = sink.by_seq()[0].inspection
    assert error.verdict is Verdict.ERROR and error.rule == "error:corrupt_frame"
    assert "empty" in str(error.reason)
    assert sink.by_seq()[1].inspection.verdict is Verdict.PASS
    assert pipe.stats().errors == {"corrupt_frame": 1}


def test_an_engine_failure_fails_only_the_frames_of_that_batch(run) -> None:
    pipe, engine, sink = run(PipelineConfig(max_batch=1))
    engine.fail_next = 1
    pipe.submit(dark_frame(64, 64, seq=0))
    assert pipe.wait_idle(10)
    pipe.submit(dark_frame(64, 64, seq=1))
    assert pipe.wait_idle(10)
    first, second = sink.by_seq()[0].inspection, sink.by_seq()[1].inspection
    assert first.verdict is Verdict.ERROR and first.rule == "error:engine_error"
    assert "simulated runtime failure" in str(first.reason)
    assert second.verdict is Verdict.PASS


def test_nan_probabilities_give_an_error_verdict(run) -> None:
    pipe, engine, sink = run()
    engine.nan_next = 1
    pipe.submit(dark_frame(64, 64))
    assert pipe.wait_idle(10)
    inspection = sink.results[0].inspection
    assert inspection.rule == "error:bad_output" and "NaN" in str(inspection.reason)


def test_a_frame_past_its_deadline_gets_an_error_verdict(run) -> None:
    pipe, _, sink = run(PipelineConfig(max_latency_ms=100))
    pipe.submit(dark_frame(64, 64, t_host_ns=time.monotonic_ns() - 5_000_000_000))
    assert pipe.wait_idle(10)
    inspection = sink.results[0].inspection
    assert inspection.verdict is Verdict.ERROR and inspection.rule == "error:deadline"
    assert "deadline 100 ms" in str(inspection.reason)


def test_a_zero_deadline_means_none_a_late_frame_is_still_inspected(run) -> None:
    pipe, _, sink = run(PipelineConfig(max_latency_ms=0))
    pipe.submit(dark_frame(64, 64, t_host_ns=time.monotonic_ns() - 3_600_000_000_000))
    assert pipe.wait_idle(10)
    assert sink.results[0].inspection.verdict is Verdict.PASS


def test_a_zero_deadline_is_accepted_from_the_station_config_and_a_negative_one_is_not() -> None:
    assert PipelineConfig.model_validate({"max_latency_ms": 0}).deadline_ms is None
    assert PipelineConfig().deadline_ms == 1000.0
    with pytest.raises(ValueError, match="max_latency_ms"):
        PipelineConfig.model_validate({"max_latency_ms": -1})


def test_overload_gives_the_overflow_error_verdicts_never_none_with_bounded_memory(run) -> None:
    cfg = PipelineConfig(max_batch=2, frame_queue=4, job_queue=2, result_queue=4)
    pipe, engine, _ = run(cfg)
    engine.delay_s = 0.005
    counts = {"pass": 0, "error": 0, "fail": 0}
    seen = np.zeros(3000, np.int32)
    lock = threading.Lock()

    def sink(result: PipelineResult) -> None:  # keeps nothing, so memory shows the pipeline's
        with lock:
            counts[result.inspection.verdict.value] += 1
            seen[result.inspection.seq] += 1

    pipe._on_result = sink  # the sink is fixed at construction; swap in the counting one
    for i in range(200):  # warm up buffers and caches
        pipe.submit(dark_frame(64, 64, seq=i))
    assert pipe.wait_idle(20)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for i in range(200, 3000):  # a camera far faster than the engine
        pipe.submit(dark_frame(64, 64, seq=i))
    assert pipe.wait_idle(30)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert np.all(seen == 1), "every frame has exactly one verdict"
    stats = pipe.stats()
    assert stats.errors.get("queue_full", 0) > 1000
    assert counts["pass"] > 0 and counts["pass"] + counts["error"] == 3000
    # 2,800 frames of 4 KiB plus their 16 KiB float tiles would be > 50 MiB if kept.
    assert peak - base < 4 * 1024 * 1024


def test_stop_gives_frames_still_in_flight_an_error_verdict(run) -> None:
    pipe, engine, sink = run(PipelineConfig(max_batch=1))
    engine.delay_s = 0.3
    for i in range(6):
        pipe.submit(dark_frame(64, 64, seq=i))
    assert not pipe.stop(timeout=0.1)
    assert sorted(sink.by_seq()) == list(range(6))
    assert "error" in sink.verdicts()
    assert pipe.stats().errors.get("stopped", 0) >= 1
    pipe.submit(dark_frame(64, 64, seq=6))
    assert sink.by_seq()[6].inspection.rule == "error:stopped"


def test_block_admission_waits_for_room_instead_of_rejecting(run) -> None:
    pipe, engine, sink = run(
        PipelineConfig(admission="block", frame_queue=1, job_queue=1, max_batch=1)
    )
    engine.delay_s = 0.002
    for i in range(40):
        pipe.submit(dark_frame(64, 64, seq=i))
    assert pipe.wait_idle(20)
    assert sink.verdicts() == ["pass"] * 40


def test_a_failing_sink_is_counted_and_the_line_goes_on(run, small) -> None:
    path, card = small
    calls = []

    def broken(result: PipelineResult) -> None:
        calls.append(result.inspection.seq)
        raise RuntimeError("archive disk full")

    pipe = Pipeline(OrtTestEngine(path, card), card, on_result=broken)
    pipe.start()
    try:
        for i in range(3):
            pipe.submit(dark_frame(64, 64, seq=i))
        assert pipe.wait_idle(10)
        assert sorted(calls) == [0, 1, 2]
        assert pipe.stats().sink_errors == 3
    finally:
        pipe.stop()


def test_swapped_model_inspects_new_frames_and_old_engine_is_released(run, small, tmp_path) -> None:
    pipe, old_engine, sink = run(PipelineConfig(max_batch=1))
    path2 = tmp_path / "v2.onnx"
    card2 = brightness_model(path2, size=64, level=0.3).model_copy(update={"name": "brightness-v2"})
    old_engine.delay_s = 0.1
    for i in range(4):
        pipe.submit(dark_frame(64, 64, seq=i))
    time.sleep(0.05)  # let the first frames reach the old engine's queue
    released = pipe.swap_engine(OrtTestEngine(path2, card2), card2)
    for i in range(4, 8):
        pipe.submit(dark_frame(64, 64, seq=i))
    assert pipe.wait_idle(20)
    assert released.wait(5)
    names = {s: r.inspection.model_name for s, r in sink.by_seq().items()}
    assert names[0] == "brightness" and all(names[s] == "brightness-v2" for s in range(4, 8))
    assert sum(n == "brightness" for n in names.values()) == old_engine.calls
    assert pipe.stats().model == "brightness-v2" and pipe.stats().swaps == 1


def test_an_engine_that_does_not_take_the_cards_input_is_refused(small, tile256) -> None:
    (path, card), (_, card256) = small, tile256
    with pytest.raises(ModelError, match=r"card input is 1x256x256 .* takes 1x64x64"):
        Pipeline(OrtTestEngine(path, card), card256, on_result=Collect())


def test_area_in_mm2_decides_for_a_calibrated_camera_with_a_roi(run) -> None:
    rules = RulesConfig.model_validate({"rules": [{"kind": "area", "min_area_mm2": 0.5}]})
    setup = CameraSetup(roi=Rect(x=100, y=50, width=64, height=64), mm_per_px=0.1)
    pipe, _, sink = run(rules=rules, cameras={"cam0": setup})
    pipe.submit(dark_frame(200, 300, seq=0, spots=[(110, 60, 9, 9)]))  # 77 px = 0.77 mm²
    pipe.submit(dark_frame(200, 300, seq=1, spots=[(110, 60, 5, 5)]))  # 21 px = 0.21 mm²
    pipe.submit(dark_frame(200, 300, seq=2, spots=[(10, 10, 20, 20)]))  # outside the ROI
    assert pipe.wait_idle(10)
    big, small_, outside = (sink.by_seq()[i].inspection for i in range(3))
    assert (big.verdict, big.rule) == (Verdict.FAIL, "area>=0.5mm2")
    assert big.defects[0].bbox == (110, 60, 9, 9)
    assert big.defects[0].area_mm2 == pytest.approx(0.77)
    assert (small_.verdict, small_.rule, len(small_.defects)) == (Verdict.PASS, "none", 1)
    assert outside.verdict is Verdict.PASS and outside.defects == ()


def test_a_mm2_rule_needs_a_scale_for_every_configured_camera(small) -> None:
    path, card = small
    rules = RulesConfig.model_validate({"rules": [{"kind": "area", "min_area_mm2": 0.5}]})
    with pytest.raises(ConfigError, match="camera 'top' has no calibrated mm_per_px"):
        Pipeline(
            OrtTestEngine(path, card),
            card,
            on_result=Collect(),
            rules=rules,
            cameras={"top": CameraSetup()},
        )


def test_a_frame_from_an_uncalibrated_camera_under_a_mm2_rule_is_an_error(run) -> None:
    rules = RulesConfig.model_validate({"rules": [{"kind": "area", "min_area_mm2": 0.5}]})
    pipe, _, sink = run(rules=rules)
    pipe.submit(dark_frame(64, 64, camera="unknown"))
    assert pipe.wait_idle(10)
    assert sink.results[0].inspection.rule == "error:not_calibrated"


@pytest.mark.parametrize(("model_sha", "expect"), [(None, "pass"), ("another-model", "fail")])
def test_a_calibrated_threshold_applies_only_to_the_model_it_was_made_for(
    run, small, model_sha, expect
) -> None:
    _, card = small
    setup = CameraSetup(threshold=0.99, threshold_model_sha256=model_sha or card.sha256)
    pipe, _, sink = run(cameras={"cam0": setup})
    pipe.submit(dark_frame(64, 64, spots=[(20, 20, 8, 8)], value=150))  # peak ~0.97
    assert pipe.wait_idle(10)
    assert sink.results[0].inspection.verdict.value == expect


def test_stats_report_counters_queues_and_latency_percentiles(run) -> None:
    pipe, _, _ = run()
    for i in range(10):
        pipe.submit(dark_frame(64, 64, seq=i))
    assert pipe.wait_idle(10)
    stats = pipe.stats()
    assert (stats.submitted, stats.completed, stats.in_flight) == (10, 10, 0)
    assert stats.verdicts == {"pass": 10}
    assert stats.queue_capacity == {"frames": 16, "jobs": 4, "results": 16}
    assert set(stats.latency_ms["total"]) == {"p50", "p90", "p99", "max"}
    assert stats.fps > 0
    assert stats.to_dict()["engine"] == "ort-fp32"


def test_max_in_flight_bounds_the_frames_between_submit_and_verdict(run) -> None:
    cfg = PipelineConfig(admission="block", max_in_flight=2, max_batch=1)
    pipe, engine, sink = run(cfg)
    engine.delay_s = 0.005
    seen: list[int] = []
    pipe._on_result = lambda r: (seen.append(pipe.stats().in_flight), sink(r))
    for i in range(20):
        pipe.submit(dark_frame(64, 64, seq=i))
    assert pipe.wait_idle(10)
    assert sink.verdicts() == ["pass"] * 20
    assert max(seen) <= 2


def test_max_in_flight_rejects_the_excess_on_a_real_line(run) -> None:
    pipe, engine, sink = run(PipelineConfig(max_in_flight=1, max_batch=1))
    engine.delay_s = 0.2
    for i in range(3):
        pipe.submit(dark_frame(64, 64, seq=i))
    assert pipe.wait_idle(10)
    assert sink.verdicts() == ["pass", "error", "error"]
    assert "max_in_flight" in str(sink.by_seq()[1].inspection.reason)


def test_repeated_errors_are_logged_once_per_interval_with_a_count(run) -> None:
    from structlog.testing import capture_logs

    pipe, _, sink = run(PipelineConfig(admission="block"))
    with capture_logs() as logs:
        for i in range(30):
            bad = dark_frame(64, 64, seq=i)
            bad.image = np.zeros((0, 0), np.uint8)
            pipe.submit(bad)
        assert pipe.wait_idle(10)
    events = [e for e in logs if e["event"] == "frame_error"]
    assert len(sink.results) == 30 and pipe.stats().errors == {"corrupt_frame": 30}
    assert len(events) == 1 and events[0]["reason"] == "corrupt_frame"


def test_a_frame_past_its_own_gate_deadline_gets_an_error_verdict_before_max_latency(
    run,
) -> None:
    pipe, _, sink = run(PipelineConfig(max_latency_ms=60_000))
    frame = dark_frame(64, 64, t_host_ns=time.monotonic_ns() - 500_000_000)
    frame.deadline_ns = frame.t_host_ns + 200_000_000  # its reject gate: 200 ms after grab
    pipe.submit(frame)
    assert pipe.wait_idle(10)
    inspection = sink.results[0].inspection
    assert inspection.verdict is Verdict.ERROR and inspection.rule == "error:deadline"
    assert "deadline 200 ms" in str(inspection.reason)
