"""Probability maps become measured defects: threshold, morphology, components, zones, mm²."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from defectd.errors import ConfigError
from defectd.pipeline.config import Rect
from defectd.pipeline.postprocess import (
    Postprocessor,
    PostprocessParams,
    check_probabilities,
    keep_mask,
    load_zone_mask,
)


def blobs(*rects: tuple[int, int, int, int], value: float = 0.9) -> np.ndarray:
    prob = np.full((100, 120), 0.05, np.float32)
    for x, y, w, h in rects:
        prob[y : y + h, x : x + w] = value
    return prob


def test_each_connected_region_is_one_defect_with_its_measures() -> None:
    prob = blobs((10, 20, 5, 4), (60, 50, 10, 10))
    prob[55, 65] = 0.99
    defects, mask = Postprocessor()(prob, PostprocessParams(threshold=0.5, min_area_px=0))
    assert len(defects) == 2
    big, small = defects
    assert (big.area_px, big.bbox, big.centroid) == (100, (60, 50, 10, 10), (64.5, 54.5))
    assert big.score_max == pytest.approx(0.99)
    assert big.score_mean == pytest.approx((99 * 0.9 + 0.99) / 100, abs=1e-4)
    assert (small.area_px, small.bbox) == (20, (10, 20, 5, 4))
    assert mask.dtype == np.uint8 and int(mask.sum()) == 120


def test_regions_below_the_minimum_area_are_not_defects() -> None:
    prob = blobs((10, 20, 2, 2), (60, 50, 10, 10))
    defects, _ = Postprocessor()(prob, PostprocessParams(threshold=0.5, min_area_px=5))
    assert [d.area_px for d in defects] == [100]


def test_opening_removes_specks_and_closing_joins_fragments() -> None:
    prob = blobs((5, 5, 1, 1), (40, 40, 10, 10), (52, 40, 10, 10))  # a speck; a split blob
    params = PostprocessParams(threshold=0.5, min_area_px=0, open_px=1, close_px=2)
    defects, _ = Postprocessor()(prob, params)
    assert len(defects) == 1
    assert defects[0].bbox == (40, 40, 22, 10)


def test_coordinates_are_shifted_into_full_frame_pixels() -> None:
    defects, _ = Postprocessor()(
        blobs((10, 20, 5, 5)), PostprocessParams(0.5, 0), offset=(300, 200)
    )
    assert defects[0].bbox == (310, 220, 5, 5)
    assert defects[0].centroid == (312.0, 222.0)


def test_area_in_mm2_when_the_scale_is_calibrated() -> None:
    params = PostprocessParams(0.5, 0, mm_per_px=0.1)
    defects, _ = Postprocessor()(blobs((10, 20, 5, 4)), params)
    assert defects[0].area_mm2 == pytest.approx(0.2)
    defects, _ = Postprocessor()(blobs((10, 20, 5, 4)), PostprocessParams(0.5, 0))
    assert defects[0].area_mm2 is None


def test_at_most_max_defects_are_reported_largest_first() -> None:
    prob = blobs(*[(12 * i, 10, 2 + i, 2) for i in range(9)])
    defects, _ = Postprocessor()(prob, PostprocessParams(0.5, 0, max_defects=3))
    assert [d.area_px for d in defects] == [20, 18, 16]


def test_ignore_zones_from_rectangles_and_mask_files_are_never_judged(tmp_path: Path) -> None:
    zone_file = tmp_path / "zone.png"
    zone = np.zeros((100, 120), np.uint8)
    zone[50:70, 50:80] = 255
    cv2.imwrite(str(zone_file), zone)
    zones = [Rect(x=0, y=0, width=30, height=30), load_zone_mask(zone_file)]
    keep = keep_mask(zones, (100, 120), (0, 0, 120, 100))
    prob = blobs((10, 20, 5, 4), (60, 50, 10, 10), (90, 80, 5, 5))
    defects, _ = Postprocessor()(prob, PostprocessParams(0.5, 0), keep)
    assert [d.bbox for d in defects] == [(90, 80, 5, 5)]


def test_an_ignore_mask_of_the_wrong_size_names_itself() -> None:
    with pytest.raises(ValueError, match=r"zone\.png: ignore mask is 10x10, frame is 120x100"):
        keep_mask([np.zeros((10, 10), np.uint8)], (100, 120), (0, 0, 120, 100), ["zone.png"])


def test_a_missing_ignore_mask_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nothere\.png"):
        load_zone_mask(tmp_path / "nothere.png")


def test_no_zones_means_no_keep_mask() -> None:
    assert keep_mask([], (100, 120), (0, 0, 120, 100)) is None


def test_an_empty_map_has_no_defects() -> None:
    defects, mask = Postprocessor()(blobs(), PostprocessParams(0.5, 0))
    assert defects == () and not mask.any()


def test_nan_and_out_of_range_probabilities_are_reported() -> None:
    prob = blobs()
    assert check_probabilities(prob) is None
    prob[3, 3] = np.nan
    assert "1 NaN" in str(check_probabilities(prob))
    assert check_probabilities(np.full((4, 4), 1.5, np.float32)) is not None
