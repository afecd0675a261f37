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


def test_hard_mining_draws_the_images_with_high_loss_more_often_within_their_group() -> None:
    sampler = DefectBalancedSampler(
        DEFECTIVE, defect_fraction=0.5, num_samples=40_000, kinds=KINDS, hard_mining=0.5
    )
    before = dict(sampler.shares(KINDS))
    # The network misses both stains (loss 2.0) and finds everything else (loss 0.1).
    sampler.record(range(len(KINDS)), [2.0 if k == "stain" else 0.1 for k in KINDS])
    drawn = _drawn(sampler)
    after = sampler.shares(KINDS)
    assert after["good"] == pytest.approx(before["good"])  # good parts keep their share
    assert after["stain"] > 2 * before["stain"]
    assert after["scratch"] < before["scratch"] and after["pit"] < before["pit"]
    assert drawn["stain"] / 40_000 == pytest.approx(after["stain"], abs=0.015)
    # Within the good images every loss is the same: their draws stay even.
    goods = [i for i, k in enumerate(KINDS) if k == "good"]
    assert np.allclose(sampler.weights[goods], sampler.weights[goods[0]])


def test_hard_mining_caps_an_images_weight_and_counts_unseen_images_as_the_mean() -> None:
    sampler = DefectBalancedSampler(DEFECTIVE, num_samples=100, hard_mining=1.0)
    bad = [i for i, k in enumerate(KINDS) if k != "good"]
    sampler.record(bad[:10], [1e6] + [1.0] * 9)  # one absurd loss; the last two never drawn
    weights = sampler._mined()
    mean = (1e6 + 9.0) / 10
    assert weights[bad[0]] / weights[bad[11]] == pytest.approx(8.0)  # capped at 8x the mean's
    assert weights[bad[1]] / weights[bad[11]] == pytest.approx(1.0 / mean)
    assert weights[bad].sum() == pytest.approx(0.5)


def test_without_hard_mining_recorded_losses_change_nothing() -> None:
    a = DefectBalancedSampler(DEFECTIVE, num_samples=64, seed=2, kinds=KINDS)
    b = DefectBalancedSampler(DEFECTIVE, num_samples=64, seed=2, kinds=KINDS)
    b.record(range(len(KINDS)), np.linspace(0.0, 5.0, len(KINDS)).tolist())
    assert list(a) == list(b)


def test_recorded_losses_travel_with_the_state_and_the_draws_follow_them() -> None:
    a = DefectBalancedSampler(DEFECTIVE, num_samples=256, seed=4, hard_mining=0.7)
    a.record(range(len(KINDS)), np.linspace(0.1, 3.0, len(KINDS)).tolist())
    b = DefectBalancedSampler(DEFECTIVE, num_samples=256, seed=4, hard_mining=0.7)
    b.load_state_dict(a.state_dict())
    assert list(a) == list(b) == a.drawn
    with pytest.raises(ValueError, match="3 recorded losses for 24 images"):
        b.load_state_dict({"losses": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match=r"hard_mining 1\.5"):
        DefectBalancedSampler(DEFECTIVE, hard_mining=1.5)
