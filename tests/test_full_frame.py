"""Full-frame inference: a fully convolutional model under the ``tile`` policy inspects a large
frame in a few large windows, with the same result as model-sized tiles (within tolerance)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import blob_batch
from defectd.engines import open_engine
from defectd.model.card import ModelCard, card_path, load_card
from defectd.model.fit import fully_convolutional, window_size
from defectd.model.unet import UNetConfig
from defectd.pipeline.config import PipelineConfig
from defectd.pipeline.frame import Frame
from defectd.pipeline.preprocess import full_frame_window
from defectd.pipeline.runner import Pipeline, PipelineResult
from defectd.pipeline.tiling import axis_positions, plan_tiles, stitch

H, W = 192, 320  # three by five model inputs of 64


@pytest.fixture(scope="module")
def tile_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny trained U-Net (batch norm, depth 2) with a card that says ``tile`` and names
    its architecture."""
    out = tmp_path_factory.mktemp("fcn") / "model.onnx"
    shutil.copy(tiny_model, out)
    card = load_card(tiny_model)
    arch = {"type": "unet", **UNetConfig(base=4, depth=2).as_dict()}
    tile_input = card.input.model_copy(update={"resize": "tile"})
    card.model_copy(update={"input": tile_input, "architecture": arch}).save(card_path(out))
    return out


def part_image(seed: int) -> np.ndarray:
    """A ``(H, W)`` uint8 part: 15 tiles' worth of noisy surface with bright discs."""
    rng = np.random.default_rng(seed)
    images, _ = blob_batch(rng, 15)
    rows = [np.concatenate(list(images[r * 5 : r * 5 + 5, 0]), axis=1) for r in range(3)]
    return np.concatenate(rows, axis=0).astype(np.uint8)


def test_a_unet_with_batch_norm_is_fully_convolutional_and_group_norm_is_not() -> None:
    assert fully_convolutional({"type": "unet", "depth": 4, "norm": "batch"}) == 16
    assert fully_convolutional({"type": "unet", "depth": 2, "norm": "none"}) == 4
    assert fully_convolutional({"type": "unet", "depth": 4, "norm": "group"}) is None
    assert fully_convolutional({}) is None


@pytest.mark.parametrize(("h", "w"), [(2048, 2448), (1000, 1000), (192, 320), (300, 500)])
def test_windows_cover_the_frame_within_the_pixel_budget_with_less_overlap_than_tiles(
    h: int, w: int
) -> None:
    budget = 1 << 20
    wh, ww = window_size((h, w), (64, 64), multiple=16, overlap=32, max_pixels=budget)
    assert wh % 16 == ww % 16 == 0 and 64 <= wh <= h and 64 <= ww <= w
    assert wh * ww <= budget
    windows = len(axis_positions(h, wh, 32)) * len(axis_positions(w, ww, 32))
    tiles = len(axis_positions(h, 64, 32)) * len(axis_positions(w, 64, 32))
    assert windows * wh * ww < tiles * 64 * 64


def test_a_float32_engine_gets_half_the_window_pixels_of_a_16_bit_one() -> None:
    """The budget bounds the bytes the windows' activations hold: twice the bytes per pixel in
    float32, so half the pixels (two windows at once: 512 K px each for bf16, 256 K for fp32)."""
    card = load_card(Path(__file__).parent / "data" / "magnetic_tile_v1" / "model.onnx")
    arch = {"type": "unet", "depth": 4, "norm": "batch"}
    card = card.model_copy(
        update={
            "architecture": arch,
            "input": card.input.model_copy(update={"height": 256, "width": 256, "resize": "tile"}),
        }
    )
    cfg = PipelineConfig()
    half = cfg.full_frame_max_px // 2
    bf16 = full_frame_window(card, cfg, "tile", (2048, 2448), at_once=2)
    fp32 = full_frame_window(card, cfg, "tile", (2048, 2448), at_once=2, float32=True)
    assert bf16 is not None and fp32 is not None
    assert half // 2 < bf16[0] * bf16[1] <= half
    assert fp32[0] * fp32[1] <= half // 2


def test_full_frame_probabilities_equal_the_tiled_ones_within_tolerance(tile_model: Path) -> None:
    card = load_card(tile_model)
    engine = open_engine(tile_model, backend="openvino", precision="fp32", max_batch=1)
    whole = engine.at_size(H, W)  # type: ignore[attr-defined]
    x = card.normalisation.apply(part_image(1)[None, None])
    full = whole.infer(x)[0, 0]
    plan = plan_tiles(H, W, 64, 64, overlap=32)
    tiles = [engine.infer(np.ascontiguousarray(plan.tile(x, i)))[0, 0] for i in range(plan.count)]
    tiled = stitch(plan, tiles, np.empty((H, W), np.float32))
    whole.close()
    engine.close()
    diff = np.abs(full - tiled)
    # Tiles see zero padding at their seams where the whole frame sees the part itself: they
    # differ a little there, and agree everywhere else.
    assert float(diff.mean()) < 0.01
    assert float(np.percentile(diff, 99)) < 0.05
    masks_differ = np.count_nonzero((full > card.threshold) != (tiled > card.threshold))
    assert masks_differ <= 0.002 * H * W


def run_line(model: Path, full_frame: bool, seeds: range) -> tuple[dict[int, PipelineResult], int]:
    """Verdicts of the parts ``seeds`` through a pipeline, and how many tiles it inferred."""
    card = load_card(model)
    engine = open_engine(model, backend="openvino", precision="fp32", max_batch=2)
    results: dict[int, PipelineResult] = {}
    lock = threading.Lock()
    done = threading.Event()

    def sink(result: PipelineResult) -> None:
        with lock:
            results[result.inspection.seq] = result
            if len(results) == len(seeds):
                done.set()

    cfg = PipelineConfig(max_batch=2, full_frame=full_frame, max_latency_ms=None)
    pipe = Pipeline(engine, card, cfg, on_result=sink)
    pipe.start()
    for seed in seeds:
        pipe.submit(
            Frame(
                station="st1",
                camera="cam0",
                seq=seed,
                image=part_image(seed),
                t_wall=time.time(),
                t_host_ns=time.monotonic_ns(),
            )
        )
    assert done.wait(60)
    tiles = pipe.stats().tiles
    pipe.stop()
    engine.close()
    return results, tiles


def test_the_pipeline_gives_a_large_frame_the_same_verdicts_in_one_window_as_in_tiles(
    tile_model: Path,
) -> None:
    seeds = range(4)
    whole, windows = run_line(tile_model, True, seeds)
    tiled, tiles = run_line(tile_model, False, seeds)
    assert windows == len(seeds)  # the whole frame at once
    assert tiles == len(seeds) * len(axis_positions(H, 64, 32)) * len(axis_positions(W, 64, 32))
    for seed in seeds:
        a, b = whole[seed], tiled[seed]
        assert a.inspection.verdict == b.inspection.verdict
        assert a.mask is not None and b.mask is not None
        assert np.count_nonzero(a.mask != b.mask) <= 0.002 * H * W
        assert len(a.inspection.defects) == len(b.inspection.defects)


def test_full_frame_is_not_used_for_a_model_whose_card_resizes(tiny_model: Path) -> None:
    card: ModelCard = load_card(tiny_model)
    assert card.input.resize == "resize"
    card = card.model_copy(update={"architecture": {"type": "unet", "depth": 2}})

    assert full_frame_window(card, PipelineConfig(), "resize", (H, W)) is None
    assert full_frame_window(card, PipelineConfig(), "tile", (H, W)) == (H, W)
    assert full_frame_window(card, PipelineConfig(full_frame=False), "tile", (H, W)) is None
