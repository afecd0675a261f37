"""The training sampler: defective share, equal shares per defect kind, reproducible draws."""

from collections import Counter

import numpy as np
import pytest

from defectd.training.torchdata import DefectBalancedSampler

# 12 good images, then 8 scratches, 2 pits and 2 stains.
KINDS = ["good"] * 12 + ["scratch"] * 8 + ["pit"] * 2 + ["stain"] * 2
DEFECTIVE = np.array([k != "good" for k in KINDS])


def _drawn(sampler: DefectBalancedSampler) -> Counter[str]:
    return Counter(KINDS[i] for i in sampler)


def test_defect_fraction_is_the_share_of_defective_draws() -> None:
    sampler = DefectBalancedSampler(DEFECTIVE, defect_fraction=0.25, num_samples=20_000)
    shares = sampler.shares(KINDS)
    assert shares["good"] == pytest.approx(0.75)
    # Without balancing each defective image is as likely as any other: kinds by their counts.
    assert shares["scratch"] == pytest.approx(0.25 * 8 / 12, abs=1e-4)
    drawn = _drawn(sampler)
    assert drawn["good"] / 20_000 == pytest.approx(0.75, abs=0.015)


def test_balanced_kinds_share_the_defective_draws_equally() -> None:
    sampler = DefectBalancedSampler(
        DEFECTIVE, defect_fraction=0.6, num_samples=30_000, seed=3, kinds=KINDS
    )
    shares = sampler.shares(KINDS)
    assert shares["good"] == pytest.approx(0.4)
    for kind in ("scratch", "pit", "stain"):
        assert shares[kind] == pytest.approx(0.2, abs=1e-4)
    drawn = _drawn(sampler)
    for kind in ("scratch", "pit", "stain"):
        assert drawn[kind] / 30_000 == pytest.approx(0.2, abs=0.015)
    # Within a kind every image is equally likely: the two pits share theirs.
    pits = [i for i, k in enumerate(KINDS) if k == "pit"]
    assert sampler.weights[pits[0]] == pytest.approx(sampler.weights[pits[1]])


def test_draws_repeat_for_a_seed_and_epoch_and_change_with_the_epoch() -> None:
    a = DefectBalancedSampler(DEFECTIVE, num_samples=64, seed=7, kinds=KINDS)
    b = DefectBalancedSampler(DEFECTIVE, num_samples=64, seed=7, kinds=KINDS)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_kinds_must_name_every_image() -> None:
    with pytest.raises(ValueError, match="3 kinds for 24 images"):
        DefectBalancedSampler(DEFECTIVE, kinds=KINDS[:3])
