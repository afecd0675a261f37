"""Tiles cover large images with the configured overlap and stitch back without seams."""

import itertools

import numpy as np
import pytest

from defectd.pipeline.tiling import axis_positions, edge_weights, plan_tiles, stitch


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(2448, 256, 32), (2048, 512, 64), (300, 256, 0)]
)
def test_tiles_cover_the_axis_with_at_least_the_overlap(
    length: int, tile: int, overlap: int
) -> None:
    pos = axis_positions(length, tile, overlap)
    assert pos[0] == 0
    assert pos[-1] + tile == length
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(pos))
    assert all(b > a for a, b in itertools.pairwise(pos))


def test_an_axis_of_exactly_one_tile_has_one_position() -> None:
    assert axis_positions(256, 256, 32) == (0,)


def test_an_image_smaller_than_a_tile_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot hold a tile"):
        plan_tiles(200, 300, 256, 256, overlap=32)


def test_blend_weights_fall_towards_the_edges_and_stay_positive() -> None:
    w = edge_weights(64, 8)
    assert w.min() > 0
    assert w[0] == pytest.approx(1 / 9)
    assert np.all(w[8:-8] == 1.0)


@pytest.mark.parametrize("mode", ["blend", "max"])
def test_stitching_tiles_cut_from_a_map_gives_the_map_back(mode: str) -> None:
    rng = np.random.default_rng(0)
    full = rng.random((300, 520), dtype=np.float32)
    plan = plan_tiles(300, 520, 128, 128, overlap=24, stitch=mode)  # type: ignore[arg-type]
    tiles = [np.ascontiguousarray(plan.tile(full, i)) for i in range(plan.count)]
    out = np.empty_like(full)
    stitch(plan, tiles, out)
    np.testing.assert_allclose(out, full, atol=1e-6)


def test_max_stitching_keeps_the_higher_probability_in_an_overlap() -> None:
    plan = plan_tiles(64, 112, 64, 64, overlap=16, stitch="max")
    assert plan.positions == ((0, 0), (0, 48))
    low, high = np.full((64, 64), 0.2, np.float32), np.full((64, 64), 0.9, np.float32)
    out = np.empty((64, 112), np.float32)
    stitch(plan, [low, high], out)
    assert out[0, 47] == pytest.approx(0.2)
    assert np.all(out[:, 48:64] == pytest.approx(0.9))


def test_blend_stitching_favours_the_tile_whose_centre_is_nearer() -> None:
    plan = plan_tiles(64, 112, 64, 64, overlap=16, stitch="blend")
    left, right = np.zeros((64, 64), np.float32), np.ones((64, 64), np.float32)
    out = np.empty((64, 112), np.float32)
    stitch(plan, [left, right], out)
    row = out[32, 48:64]
    assert row[0] < 0.5 < row[-1]
    assert np.all(np.diff(row) > 0)


def test_a_tile_view_is_the_region_at_its_position() -> None:
    img = np.arange(3 * 100 * 150, dtype=np.float32).reshape(3, 100, 150)
    plan = plan_tiles(100, 150, 64, 64, overlap=8)
    y, x = plan.positions[-1]
    assert plan.tile(img, plan.count - 1).shape == (3, 64, 64)
    assert plan.tile(img, plan.count - 1)[0, 0, 0] == img[0, y, x]
