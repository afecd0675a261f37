"""A tiny training run on synthetic parts learns to segment their defects."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from defectd.data.datasets import open_dataset
from defectd.data.synth import render_part
from defectd.errors import ConfigError, DataError
from defectd.model.card import ModelCard
from defectd.model.checkpoint import load_checkpoint, read_checkpoint
from defectd.model.unet import UNet, UNetConfig
from defectd.training.averaging import WeightAverage
from defectd.training.evaluate import TorchPredictor, evaluate
from defectd.training.train import (
    EpochRecord,
    TrainConfig,
    _selection_score,
    lr_factor,
    train,
)
from training_support import tiny_training

SIZE = 64


def write_chip_parts(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` 64x64 synthetic parts, 60% with chipped edges, in the manifest layout;
    every fifth part is in split ``val``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(count):
        part = render_part(rng, SIZE, SIZE, defect_prob=0.6, kinds=("chip",))
        stem = f"part{i:03d}"
        cv2.imwrite(str(root / "images" / f"{stem}.png"), part.image)
        cv2.imwrite(str(root / "masks" / f"{stem}.png"), part.mask * 255)
        rows.append(
            {
                "stem": stem,
                "cls": part.defects[0] if part.defects else "free",
                "image": f"images/{stem}.png",
                "mask": f"masks/{stem}.png",
                "split": "val" if i % 5 == 0 else "train",
                "has_defect": int(bool(part.defects)),
            }
        )
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def tiny_config(data: Path, out: Path) -> TrainConfig:
    return tiny_training(
        data,
        out,
        SIZE,
        depth=3,
        batch_size=16,
        epochs=4,
        steps_per_epoch=20,
        val_every=2,
        seed=0,
        command="defectd train --data parts --out run",
    )


@pytest.fixture(scope="module")
def chip_parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chip_parts(tmp_path_factory.mktemp("parts") / "data", 90)


@pytest.fixture(scope="module")
def tiny_run(chip_parts: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    config = tiny_config(chip_parts, tmp_path_factory.mktemp("run") / "run")
    train(config)
    return config


@pytest.mark.slow
def test_training_lifts_validation_iou_from_near_zero_to_half(
    chip_parts: Path, tiny_run: TrainConfig
) -> None:
    dataset = open_dataset(chip_parts)
    torch.manual_seed(0)
    untrained = UNet(tiny_run.unet())
    card = ModelCard(name="t", input={"height": SIZE, "width": SIZE})
    before = evaluate(dataset, "val", TorchPredictor(untrained), card, threshold=0.5)
    net, trained_card = load_checkpoint(tiny_run.out / "best.pt")
    after = evaluate(dataset, "val", TorchPredictor(net), trained_card)
    assert before.report.overall.iou < 0.1
    assert after.report.overall.iou >= 0.5


@pytest.mark.slow
def test_run_folder_holds_best_last_and_one_history_line_per_epoch(
    tiny_run: TrainConfig,
) -> None:
    lines = (tiny_run.out / "history.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [bool(r["val"]) for r in records] == [False, True, False, True]
    assert (tiny_run.out / "last.pt").is_file()


@pytest.mark.slow
def test_best_checkpoint_card_names_threshold_data_hash_and_command(
    tiny_run: TrainConfig, chip_parts: Path
) -> None:
    _, card = load_checkpoint(tiny_run.out / "best.pt")
    assert card.training.command == "defectd train --data parts --out run"
    assert card.training.data_hash == open_dataset(chip_parts).fingerprint("train")
    assert card.training.epochs == 4
    assert 0.0 < card.threshold < 1.0
    assert card.metrics["val_dice"] > 0.5
    assert card.input.height == SIZE
    assert card.normalisation.std[0] > 0


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint_of_a_moved_run(
    tiny_run: TrainConfig, tmp_path: Path
) -> None:
    run = tmp_path / "first"
    first = replace(tiny_run, out=run, epochs=1, val_every=1, steps_per_epoch=5)
    train(first)
    moved = run.rename(tmp_path / "moved")
    result = train(replace(first, out=moved, epochs=2), resume=True)
    state = read_checkpoint(moved / "last.pt")
    assert result.epochs == 2
    assert state["step"] == 2 * 5
    assert len((moved / "history.jsonl").read_text().splitlines()) == 2
    assert not run.exists()


@pytest.mark.slow
def test_same_seed_gives_the_same_weights(tiny_run: TrainConfig, tmp_path: Path) -> None:
    short = replace(tiny_run, epochs=1, steps_per_epoch=3, val_every=1)
    for name in ("a", "b"):
        train(replace(short, out=tmp_path / name))
    a = read_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = read_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_select_by_last_makes_the_final_epoch_best_with_a_completed_card(
    tiny_run: TrainConfig, tmp_path: Path
) -> None:
    config = replace(
        tiny_run, out=tmp_path / "run", epochs=3, steps_per_epoch=4, val_every=2, select_by="last"
    )
    train(config)
    best = read_checkpoint(config.out / "best.pt")
    last = read_checkpoint(config.out / "last.pt")
    assert best["epoch"] == last["epoch"] == 3  # epoch 3 is not on the val_every grid
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    _, card = load_checkpoint(config.out / "best.pt")
    assert 0.0 < card.threshold < 1.0
    assert "val_dice" in card.metrics
    assert card.training.epochs == 3
    # The rule itself: a later epoch wins under "last" even when its val Dice is worse.
    net, _ = load_checkpoint(config.out / "best.pt")
    ev = evaluate(open_dataset(config.data), "val", TorchPredictor(net), card)
    better, worse = replace(ev, best_dice=0.9), replace(ev, best_dice=0.1)
    assert _selection_score(worse, "last", 3) > _selection_score(better, "last", 2)
    assert _selection_score(worse, "dice", 3) < _selection_score(better, "dice", 2)


@pytest.mark.slow
def test_average_last_makes_the_final_model_the_mean_of_the_last_epochs(
    tiny_run: TrainConfig, tmp_path: Path
) -> None:
    # 4 epochs, the last half averaged: the weights after epochs 3 and 4.
    config = replace(
        tiny_run,
        out=tmp_path / "avg",
        epochs=4,
        steps_per_epoch=3,
        val_every=1,
        select_by="last",
        average_last=0.5,
    )
    trained: dict[int, dict[str, torch.Tensor]] = {}  # last.pt: the network as trained

    def keep(record: EpochRecord) -> None:
        trained[record.epoch] = read_checkpoint(config.out / "last.pt")["model"]

    train(config, on_epoch=keep)
    history = [json.loads(x) for x in (config.out / "history.jsonl").read_text().splitlines()]
    final = history[-1]["val"]
    assert final["averaged_epochs"] == 2
    assert {"last_epoch_dice", "last_epoch_auroc"} <= final.keys()
    assert "averaged_epochs" not in history[-2]["val"]

    best = read_checkpoint(config.out / "best.pt")["model"]
    params = {name for name, _ in UNet(config.unet()).named_parameters()}
    for name in params:
        mean = (trained[3][name] + trained[4][name]) / 2
        assert torch.allclose(best[name], mean, atol=1e-6), name
    assert not torch.allclose(best["head.weight"], trained[4]["head.weight"])
    # Batch norm: statistics recomputed for the mean weights, not the last epoch's.
    bn = [k for k in best if k.endswith("running_mean")]
    assert bn and any(not torch.allclose(best[k], trained[4][k]) for k in bn)
    _, card = load_checkpoint(config.out / "best.pt")
    assert 0.0 < card.threshold < 1.0 and "val_dice" in card.metrics


def stopped_then_resumed(config: TrainConfig, out: Path, *, after_epoch: int) -> None:
    """Train ``config`` into ``out``, crash it once epoch ``after_epoch`` has been saved, and
    finish it with ``resume``."""

    class CrashError(Exception):
        pass

    def crash(record: EpochRecord) -> None:
        if record.epoch == after_epoch:
            raise CrashError

    with pytest.raises(CrashError):
        train(replace(config, out=out), on_epoch=crash)
    train(replace(config, out=out), resume=True)


@pytest.mark.slow
def test_a_resumed_run_averages_the_same_weights_as_an_uninterrupted_one(
    tiny_run: TrainConfig, tmp_path: Path
) -> None:
    config = replace(
        tiny_run, epochs=4, steps_per_epoch=3, val_every=1, select_by="last", average_last=0.5
    )
    train(replace(config, out=tmp_path / "whole"))
    stopped_then_resumed(config, tmp_path / "cut", after_epoch=3)  # 3 is in the running mean
    whole = read_checkpoint(tmp_path / "whole" / "best.pt")["model"]
    resumed = read_checkpoint(tmp_path / "cut" / "best.pt")["model"]
    assert all(torch.allclose(whole[k].float(), resumed[k].float(), atol=1e-6) for k in whole)


@pytest.mark.slow
def test_a_resumed_hard_mining_run_draws_and_trains_as_an_uninterrupted_one(
    tiny_run: TrainConfig, tmp_path: Path
) -> None:
    config = replace(tiny_run, epochs=3, steps_per_epoch=3, val_every=1, hard_mining=0.8)
    train(replace(config, out=tmp_path / "whole"))
    last = read_checkpoint(tmp_path / "whole" / "last.pt")
    losses = np.asarray(last["sampler"]["losses"])
    assert np.isfinite(losses).sum() >= 3 * config.batch_size // 2  # drawn images have losses
    assert np.all(losses[np.isfinite(losses)] > 0.0)
    # Epoch 3 draws by the losses epochs 1 and 2 recorded.
    stopped_then_resumed(config, tmp_path / "cut", after_epoch=2)
    whole = read_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    resumed = read_checkpoint(tmp_path / "cut" / "last.pt")["model"]
    assert all(torch.allclose(whole[k].float(), resumed[k].float(), atol=1e-6) for k in whole)


def test_hard_mining_out_of_range_is_refused(tmp_path: Path) -> None:
    config = replace(tiny_config(tmp_path, tmp_path / "run"), hard_mining=-0.1)
    with pytest.raises(ConfigError, match=r"--hard-mining -0\.1"):
        train(config)


def test_average_last_out_of_range_is_refused(tmp_path: Path) -> None:
    config = replace(tiny_config(tmp_path, tmp_path / "run"), average_last=1.0)
    with pytest.raises(ConfigError, match=r"--average-last 1\.0"):
        config.check()


def test_weight_average_is_the_running_mean() -> None:
    nets = [UNet(UNetConfig(base=4, depth=2)) for _ in range(3)]
    average = WeightAverage()
    for net in nets:
        average.add(net)
    x = torch.rand(2, 1, 16, 16)
    mean = average.network(nets[-1], [(x, x)])
    for name, p in mean.named_parameters():
        expected = sum(dict(n.named_parameters())[name].detach() for n in nets) / 3
        assert torch.allclose(p, expected, atol=1e-6), name


def test_lr_schedule_warms_up_then_decays_to_floor() -> None:
    assert lr_factor(0.05, 0.1, 0.01) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, 0.01) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1, 0.01) == pytest.approx(0.01)
    values = [lr_factor(p / 10, 0.1, 0.01) for p in range(1, 11)]
    assert values == sorted(values, reverse=True)


def test_input_size_not_a_multiple_of_the_stride_is_refused(tmp_path: Path) -> None:
    config = replace(tiny_config(tmp_path, tmp_path / "run"), height=60)
    with pytest.raises(ConfigError, match="--height 60"):
        config.check()


def test_missing_validation_split_names_the_split(chip_parts: Path, tmp_path: Path) -> None:
    config = replace(tiny_config(chip_parts, tmp_path / "run"), val_split="holdout")
    with pytest.raises(DataError, match="holdout"):
        train(config)


@pytest.mark.slow
def test_a_refit_on_train_and_val_trains_on_both_and_says_val_was_seen(
    chip_parts: Path, tmp_path: Path
) -> None:
    config = replace(
        tiny_config(chip_parts, tmp_path / "run"),
        train_split="train+val",
        epochs=1,
        steps_per_epoch=2,
        val_every=1,
    )
    train(config)
    _, card = load_checkpoint(config.out / "best.pt")
    dataset = open_dataset(chip_parts)
    assert card.training.data_hash == dataset.fingerprint("train+val")
    assert card.training.split == "train+val"
    assert "18 of the 'val' images were trained on ('train+val')" in card.notes

    plain = replace(config, train_split="train", out=tmp_path / "plain")
    train(plain)
    assert "trained on" not in load_checkpoint(plain.out / "best.pt")[1].notes


def test_image_dice_weighs_a_missed_small_defect_like_a_missed_large_one() -> None:
    from defectd.training.losses import image_dice_loss, soft_dice_loss

    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, :8] = 1.0  # large region, found
    target[1, 0, 0, 0] = 1.0  # one pixel, missed
    prob = target.clone()
    prob[1, 0, 0, 0] = 0.0
    assert float(soft_dice_loss(prob, target, smooth=0.0)) < 0.01
    assert float(image_dice_loss(prob, target, smooth=0.0)) == pytest.approx(0.5)


def test_image_dice_is_zero_on_a_batch_of_good_parts() -> None:
    from defectd.training.losses import image_dice_loss

    prob = torch.full((2, 1, 4, 4), 0.3, requires_grad=True)
    loss = image_dice_loss(prob, torch.zeros(2, 1, 4, 4))
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_part_term_charges_a_faint_miss_and_a_bright_speck_that_pixel_terms_barely_see() -> None:
    from defectd.training.losses import PART_TOP_K, LossConfig, SegLoss, part_loss

    target = torch.zeros(2, 1, 32, 32)
    target[0, 0, 8:24, 8:24] = 1.0  # a defect the map scores faintly (logit -1: p = 0.27)
    logits = torch.full((2, 1, 32, 32), -8.0)
    logits[0, 0, 8:24, 8:24] = -1.0
    faint = part_loss(logits, target)
    logits[0, 0, 8:24, 8:24] = 4.0  # the same defect found
    found = part_loss(logits, target)
    assert float(faint) > 10 * float(found)
    # A bright speck of PART_TOP_K pixels on the good part: a reject the pixel BCE averages away.
    speck = logits.clone()
    speck[1, 0, 0, :PART_TOP_K] = 6.0
    assert float(part_loss(speck, target)) > 1.0 + float(found)
    img = SegLoss(LossConfig(kind="bce_dice_img"))
    part = SegLoss(LossConfig(kind="bce_dice_part"))
    assert float(img(speck, target)) - float(img(logits, target)) < 0.1
    assert float(part(speck, target)) == pytest.approx(
        float(img(speck, target)) + float(part_loss(speck, target))
    )
    # Per class: a two-class map scores each channel against that class's presence.
    two = torch.cat([target, torch.zeros_like(target)], 1)
    both = torch.cat([logits, torch.full_like(logits, -8.0)], 1)
    assert float(part_loss(both, two)) < 0.01


@pytest.mark.slow
def test_best_checkpoint_card_holds_the_training_images_drift_reference(
    tiny_run: TrainConfig, chip_parts: Path
) -> None:
    _, card = load_checkpoint(tiny_run.out / "best.pt")
    assert card.drift is not None
    stats = card.drift.statistics
    assert set(stats) == {"brightness", "contrast", "sharpness"}
    assert stats["brightness"].n == len(open_dataset(chip_parts).samples("train"))
    assert 0 < stats["brightness"].mean < 255 and stats["contrast"].std > 0
    assert len(stats["sharpness"].quantiles) == 64
