"""bench/demo_line.py --contrast: each defective part's defect-free twin is the same part
without its defects, and the contrast report tells the caught from the missed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest


@pytest.fixture(scope="module")
def demo_line(bench_module: Callable[[str], ModuleType]) -> ModuleType:
    return bench_module("demo_line")


def test_twins_differ_from_their_parts_only_where_defects_were_drawn(
    demo_line: ModuleType,
) -> None:
    pairs = demo_line.line_parts_with_twins(40, 5)
    plain = demo_line.line_parts(40, 5)
    defective = 0
    for (part, twin), same in zip(pairs, plain, strict=True):
        assert np.array_equal(part.image, same.image)  # twins do not disturb the line's parts
        if not part.defects:
            assert twin is None
            continue
        defective += 1
        outside = part.mask == 0
        assert np.array_equal(part.image[outside], twin[outside])
        assert (part.image[~outside] != twin[~outside]).any()
        assert demo_line.contrast_of(part, twin)[0] > 0
    assert defective >= 5


def test_contrast_report_counts_the_missed_and_the_unseen(demo_line: ModuleType) -> None:
    pairs = demo_line.line_parts_with_twins(60, 9)
    parts = [p for p, _ in pairs]
    bad = [i for i, p in enumerate(parts) if p.defects]
    # Every other defective part is caught (its defect found at probability 1); the rest are
    # missed, one of them half seen (0.5 inside its defect), the others not seen at all.
    probs = np.zeros((len(parts), *parts[0].mask.shape), np.float32)
    fail = np.zeros(len(parts), bool)
    for n, i in enumerate(bad):
        if n % 2 == 0:
            probs[i] = parts[i].mask
            fail[i] = True
    half_seen = bad[1]
    probs[half_seen] = 0.5 * parts[half_seen].mask
    contrasts = [None if t is None else demo_line.contrast_of(p, t) for p, t in pairs]
    summary, escapes = demo_line.contrast_report(parts, contrasts, probs, fail)
    assert [e["index"] for e in escapes] == bad[1::2]
    assert {e["index"]: e["peak_probability"] for e in escapes}[half_seen] == 0.5
    single = [i for i in bad if len(set(parts[i].defects)) == 1]
    assert sum(k["parts"] for k in summary.values()) == len(single)
    missed_single = [i for i in single if not fail[i]]
    assert sum(k["escapes"] for k in summary.values()) == len(missed_single)
    assert sum(k["escapes_unseen"] for k in summary.values()) == len(
        [i for i in missed_single if i != half_seen]
    )


def test_paired_comparison_of_two_models_on_the_same_parts(demo_line: ModuleType) -> None:
    rng = np.random.default_rng(3)
    n, g = 600, len(demo_line.GRID_THRESHOLDS) * len(demo_line.GRID_MIN_AREAS)
    bad = rng.random(n) < 0.3
    # The first model fails every defective part but a fixed 30 and no good part, at every
    # grid point; the other catches 20 of those 30 as well.
    missed = np.flatnonzero(bad)[:30]
    first = np.repeat(bad[:, None], g, axis=1)
    first[missed] = False
    other = first.copy()
    other[missed[:20]] = True
    defective = int(bad.sum())
    same = demo_line.paired_comparison(bad, first, first, max_false_reject=0.05, resamples=200)
    assert same == {
        "difference": 0.0, "low": 0.0, "high": 0.0, "resamples": 200,
        "caught_by_first_only": 0, "caught_by_this_only": 0,
    }  # fmt: skip
    better = demo_line.paired_comparison(bad, first, other, max_false_reject=0.05, resamples=200)
    assert better is not None
    assert better["difference"] == pytest.approx(-20 / defective, abs=1e-4)
    assert better["low"] <= better["difference"] <= better["high"] < 0
    assert (better["caught_by_first_only"], better["caught_by_this_only"]) == (0, 20)
    # A model that false-rejects every good part has no point within the limit.
    noisy = np.ones_like(first)
    assert demo_line.paired_comparison(bad, first, noisy, max_false_reject=0.05) is None


def test_pooled_seeds_are_the_parts_each_seed_renders(demo_line: ModuleType) -> None:
    pooled = demo_line.pooled_parts(12, [5, 9], twins=False)
    alone = demo_line.line_parts(12, 5) + demo_line.line_parts(12, 9)
    assert len(pooled) == 24
    for (part, twin), same in zip(pooled, alone, strict=True):
        assert twin is None
        assert np.array_equal(part.image, same.image)
        assert part.defects == same.defects


def test_counted_rates_carry_counts_and_wilson_intervals(demo_line: ModuleType) -> None:
    bad = np.array([True] * 20 + [False] * 80)
    fail = np.zeros(100, bool)
    fail[:17] = True  # 3 of 20 defective parts escape
    fail[20:24] = True  # 4 of 80 good parts are rejected
    figures = demo_line.counted(fail, bad)
    escape, false_reject = figures["escape"], figures["false_reject"]
    assert (escape["k"], escape["n"], false_reject["k"], false_reject["n"]) == (3, 20, 4, 80)
    assert escape["rate"] == pytest.approx(0.15)
    assert false_reject["rate"] == pytest.approx(0.05)
    # Wilson 95% for 3 of 20: 0.0524 to 0.3604.
    assert (escape["low"], escape["high"]) == pytest.approx((0.0524, 0.3604), abs=1e-4)
    assert escape["low"] < escape["rate"] < escape["high"]
    assert "escapes 3 of 20, 15.0% (5.2% to 36.0%)" in demo_line.counted_text(figures)


def test_a_seed_named_twice_is_refused_before_anything_runs() -> None:
    bench = Path(__file__).resolve().parents[1] / "bench" / "demo_line.py"
    done = subprocess.run(
        [sys.executable, str(bench), "--model", "missing.onnx", "--seed", "3", "--seed", "3"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--seed [3, 3]: each seed once" in done.stderr
