"""Metrics checked against counts worked out by hand on small masks."""

import math

import numpy as np
import pytest

from defectd.data.metrics import (
    THRESHOLD_GRID,
    MetricsAccumulator,
    auroc,
    auroc_costs,
    decision_score,
    dice_score,
    escapes_of,
    image_stats,
    iou_score,
    remove_small,
)
from defectd.pipeline.postprocess import Postprocessor, PostprocessParams


def _mask(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = 1
    return m


def test_pixel_counts_of_overlapping_squares() -> None:
    truth = _mask((10, 10), (0, 4, 0, 4))  # 16 px
    prob = _mask((10, 10), (2, 6, 2, 6)).astype(np.float32)  # 16 px, 4 shared
    st = image_stats(prob, truth, threshold=0.5)
    assert (st.tp, st.fp, st.fn) == (4, 12, 12)
    assert st.iou == pytest.approx(4 / 28)
    assert dice_score(st.tp, st.fp, st.fn) == pytest.approx(8 / 32)


def test_split_dice_sums_pixels_over_images_not_means() -> None:
    acc = MetricsAccumulator(threshold=0.5)
    # image 1: 2 px truth, both found; image 2: 8 px truth, none found, 2 false px.
    acc.add(_mask((4, 4), (0, 1, 0, 2)).astype(np.float32), _mask((4, 4), (0, 1, 0, 2)))
    acc.add(_mask((4, 4), (3, 4, 0, 2)).astype(np.float32), _mask((4, 4), (0, 2, 0, 4)))
    rep = acc.report().overall
    tp, fp, fn = 2, 2, 8
    assert rep.dice == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert rep.iou == pytest.approx(tp / (tp + fp + fn))
    assert rep.precision == pytest.approx(tp / (tp + fp))
    assert rep.recall == pytest.approx(tp / (tp + fn))
    assert rep.mean_image_iou == pytest.approx((1.0 + 0.0) / 2)


def test_perfect_prediction_of_good_image_scores_one() -> None:
    zeros = np.zeros((5, 5), np.uint8)
    acc = MetricsAccumulator()
    acc.add(zeros.astype(np.float32), zeros)
    out = acc.report().overall
    assert (out.dice, out.iou, out.precision, out.recall, out.accuracy) == (1, 1, 1, 1, 1)
    assert math.isnan(out.mean_image_iou)


def test_auroc_counts_ties_as_half() -> None:
    assert auroc([True, False], [0.7, 0.7]) == pytest.approx(0.5)
    assert auroc([True, True, False, False], [0.9, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)


def test_auroc_of_perfect_and_reversed_ranking() -> None:
    labels = [False, False, True, True, True]
    assert auroc(labels, [0.1, 0.2, 0.3, 0.4, 0.5]) == 1.0
    assert auroc(labels, [0.9, 0.8, 0.3, 0.2, 0.1]) == 0.0


def test_auroc_is_nan_without_both_classes() -> None:
    assert math.isnan(auroc([True, True], [0.1, 0.2]))


def test_min_area_removes_small_components_before_image_decision() -> None:
    prob = _mask((12, 12), (0, 1, 0, 1), (5, 9, 5, 9)).astype(np.float32)  # 1 px + 16 px
    assert remove_small(prob > 0.5, 2).sum() == 16
    truth = np.zeros((12, 12), np.uint8)
    acc = MetricsAccumulator(min_area_px=20)
    acc.add(prob, truth)
    assert acc.report().overall.accuracy == 1.0  # both blobs below 20 px: called good
    acc0 = MetricsAccumulator(min_area_px=0)
    acc0.add(prob, truth)
    assert acc0.report().overall.accuracy == 0.0


def test_image_accuracy_and_auroc_from_max_probability() -> None:
    acc = MetricsAccumulator(threshold=0.5)
    good = np.zeros((4, 4), np.uint8)
    bad = _mask((4, 4), (1, 2, 1, 2))
    acc.add(np.full((4, 4), 0.2, np.float32), good)  # correct: good
    acc.add(np.full((4, 4), 0.6, np.float32), good)  # wrong: false alarm
    acc.add(bad.astype(np.float32) * 0.9, bad)  # correct: defect found
    rep = acc.report()
    assert rep.overall.accuracy == pytest.approx(2 / 3)
    assert rep.auroc == 1.0  # 0.9 beats 0.2 and 0.6


def _blobby_map(seed: int) -> np.ndarray:
    """A 48x40 probability map with a few bumps of different heights and sizes on noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:48, 0:40]
    prob = rng.uniform(0.0, 0.3, (48, 40))
    for _ in range(4):
        cy, cx, r, h = rng.uniform(0, 48), rng.uniform(0, 40), rng.uniform(1, 6), rng.uniform(0, 1)
        prob = np.maximum(prob, h * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    return np.round(prob, 3).astype(np.float32)  # ties between pixels, as quantised maps have


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("min_area", [0, 1, 5, 30, 200])
def test_decision_score_is_the_threshold_where_the_image_verdict_flips(
    seed: int, min_area: int
) -> None:
    prob = _blobby_map(seed)
    score = decision_score(prob, min_area)
    post = Postprocessor()
    below = np.nextafter(np.float32(score), np.float32(0))
    for t in [float(v) for v in (*THRESHOLD_GRID, score, below)]:
        offline = bool(remove_small(prob > np.float32(t), min_area).any())
        station, _ = post(prob, PostprocessParams(threshold=t, min_area_px=min_area))
        assert offline == (np.float32(score) > np.float32(t)), (t, score)  # in the map's dtype
        assert bool(station) == offline, t  # the station's verdict is the same decision


def test_decision_score_edges() -> None:
    flat = np.full((4, 4), 0.7, np.float32)
    assert decision_score(flat, 16) == pytest.approx(0.7)  # the whole map is one region
    assert decision_score(flat, 17) == 0.0  # no region can be that large
    assert decision_score(np.zeros((0, 0), np.float32), 5) == 0.0
    peak = np.zeros((8, 8), np.float32)
    peak[2, 2] = 0.9  # one hot pixel, the rest 0.4 in a 3x3 block around it
    peak[1:4, 1:4] = np.maximum(peak[1:4, 1:4], 0.4)
    assert decision_score(peak, 1) == pytest.approx(0.9)
    assert decision_score(peak, 9) == pytest.approx(0.4)


def test_report_gives_auroc_under_every_image_score() -> None:
    # A good image with one bright speck, a defective one with a large faint region: the
    # maximum ranks them wrongly, the station's decision at 10 px ranks them right.
    good = np.zeros((20, 20), np.uint8)
    speck = np.full((20, 20), 0.05, np.float32)
    speck[3, 3] = 0.95
    bad = _mask((20, 20), (5, 10, 5, 10))
    faint = np.where(bad > 0, 0.6, 0.05).astype(np.float32)
    acc = MetricsAccumulator(threshold=0.5, min_area_px=10, score="decision")
    acc.add(speck, good)
    acc.add(faint, bad)
    rep = acc.report()
    assert rep.auroc == 1.0
    assert rep.auroc_by_score == {"max": 0.0, "area": 1.0, "decision": 1.0}
    assert rep.as_dict()["auroc_by_score"]["max"] == 0.0
    plain = MetricsAccumulator(threshold=0.5, min_area_px=10)
    plain.add(speck, good)
    plain.add(faint, bad)
    assert set(plain.report().auroc_by_score) == {"max", "area"}  # decision not computed


def test_auroc_costs_name_the_images_behind_each_misordered_pair() -> None:
    # Scores: defective 0.9, 0.5, 0.2; good 0.1, 0.5, 0.6. Mis-ordered pairs: d(0.5) below
    # g(0.6) and tied with g(0.5) -> 1.5; d(0.2) below g(0.5) and g(0.6) -> 2. AUROC 5.5 / 9.
    acc = MetricsAccumulator(threshold=0.99)
    good = np.zeros((2, 2), np.uint8)
    bad = np.ones((2, 2), np.uint8)
    for i, v in enumerate((0.9, 0.5, 0.2)):
        acc.add(np.full((2, 2), v, np.float32), bad, stem=f"d{i}", cls="crack")
    for i, v in enumerate((0.1, 0.5, 0.6)):
        acc.add(np.full((2, 2), v, np.float32), good, stem=f"g{i}", cls="free")
    rep = acc.report()
    assert rep.auroc == pytest.approx(1 - 3.5 / 9)
    costs = auroc_costs(acc.stats, "max")
    assert [(r["stem"], r["pairs"]) for r in costs["defective"]] == [("d2", 2.0), ("d1", 1.5)]
    assert [(r["stem"], r["pairs"]) for r in costs["good"]] == [("g2", 2.0), ("g1", 1.5)]
    lost = sum(r["auroc_loss"] for r in costs["defective"])
    assert lost == pytest.approx(1 - rep.auroc, abs=1e-5)  # every lost pair, counted once
    assert costs["defective"][0]["cls"] == "crack"
    assert rep.as_dict()["auroc_costs"] == costs
    assert auroc_costs(acc.stats[:3], "max") == {"defective": [], "good": []}


def test_escapes_say_whether_the_defect_was_seen_and_why_it_passed() -> None:
    truth = _mask((12, 12), (2, 6, 2, 6))  # a 16 px defect
    acc = MetricsAccumulator(threshold=0.5, min_area_px=3)

    def add(stem: str, prob: np.ndarray, mask: np.ndarray = truth) -> None:
        acc.add(prob, mask, stem=stem, cls="pit")

    unseen = np.full((12, 12), 0.001, np.float32)
    unseen[10, 10] = 0.3  # the image's peak lies away from the defect
    add("unseen", unseen)
    faint = np.zeros((12, 12), np.float32)
    faint[3:5, 3:5] = 0.4
    add("faint", faint)
    speck = np.zeros((12, 12), np.float32)
    speck[3, 3:5] = 0.9  # 2 px above the threshold: under the 3 px min area
    add("speck", speck)
    add("caught", truth.astype(np.float32))
    elsewhere = np.zeros((12, 12), np.float32)
    elsewhere[8:11, 8:11] = 0.9  # rejected for a region off the defect: not an escape
    add("elsewhere", elsewhere)
    add("good", np.zeros((12, 12), np.float32), np.zeros((12, 12), np.uint8))

    by_stem = {s.stem: s for s in acc.stats}
    assert by_stem["unseen"].truth_peak == pytest.approx(0.001)
    assert by_stem["faint"].truth_peak == pytest.approx(0.4)
    assert [by_stem[k].escape for k in ("unseen", "faint", "speck")] == [
        "unseen", "below_threshold", "under_min_area",
    ]  # fmt: skip
    assert by_stem["caught"].escape is None and by_stem["elsewhere"].escape is None
    assert by_stem["good"].escape is None and by_stem["good"].truth_peak == 0.0
    escapes = escapes_of(acc.stats)
    assert escapes["count"] == 3
    assert (escapes["unseen"], escapes["below_threshold"], escapes["under_min_area"]) == (1, 1, 1)
    assert [r["stem"] for r in escapes["images"]] == ["speck", "faint", "unseen"]
    assert escapes["images"][2]["peak"] == pytest.approx(0.3)
    report = acc.report().as_dict()
    assert report["escapes"] == escapes
    # The count is the image-level misses: defective images the decision passed.
    missed = sum(s.has_defect and not s.predicted_defect for s in acc.stats)
    assert escapes["count"] == missed
    assert escapes["unseen_below"] == 0.01
    # A model operated at a low threshold sees at a tenth of it: 0.005 is seen at 0.01.
    low = MetricsAccumulator(threshold=0.01)
    for stem, value in (("seen", 0.005), ("unseen", 0.0005)):
        low.add(np.where(truth > 0, value, 0.0).astype(np.float32), truth, stem=stem)
    assert [s.escape for s in low.stats] == ["below_threshold", "unseen"]
    assert escapes_of(low.stats, 0.001) == low.report().as_dict()["escapes"]
    # A decision made elsewhere (a multi-class union) has no single threshold to blame.
    union = image_stats(faint, truth, threshold=0.5, binary=np.zeros((12, 12), bool))
    assert union.escape == "below_class_point"


def test_per_class_table_splits_images_by_class() -> None:
    acc = MetricsAccumulator()
    bad = _mask((4, 4), (0, 2, 0, 2))
    acc.add(bad.astype(np.float32), bad, cls="crack")
    acc.add(np.zeros((4, 4), np.float32), bad, cls="pit")
    acc.add(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8), cls="free")
    table = acc.report().per_class
    assert set(table) == {"crack", "free", "pit"}
    assert table["crack"].dice == 1.0
    assert table["pit"].recall == 0.0
    assert table["free"].accuracy == 1.0


def test_best_threshold_maximises_split_dice_on_the_grid() -> None:
    truth = _mask((1, 10), (0, 1, 0, 5))
    prob = np.array([[0.9, 0.8, 0.7, 0.6, 0.55, 0.3, 0.2, 0.1, 0.1, 0.1]], np.float32)
    acc = MetricsAccumulator()
    acc.add(prob, truth)
    thr, dice = acc.best_threshold()
    assert dice == 1.0
    assert 0.3 <= thr < 0.55
    for t, d in acc.sweep():
        st = image_stats(prob, truth, threshold=t)
        assert d == pytest.approx(dice_score(st.tp, st.fp, st.fn))


def test_iou_of_empty_sets_is_one() -> None:
    assert iou_score(0, 0, 0) == 1.0
