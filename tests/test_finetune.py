"""``defectd train --init``: fine-tuning starts from a checkpoint's matching tensors, initialises
the rest, and the card names the checkpoint it started from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from defectd.cli import main
from defectd.data.synth import write_dataset
from defectd.errors import ConfigError
from defectd.model.card import file_sha256
from defectd.model.checkpoint import load_checkpoint, load_matching, read_checkpoint
from defectd.model.unet import UNet, UNetConfig
from defectd.training.train import TrainConfig, train


def test_a_head_for_other_classes_is_initialised_and_everything_else_loaded() -> None:
    torch.manual_seed(0)
    source = UNet(UNetConfig(base=4, depth=2, out_channels=1))
    target = UNet(UNetConfig(base=4, depth=2, out_channels=3))
    report = load_matching(target, source.state_dict())
    assert [name for name, _ in report.initialised] == ["head.weight", "head.bias"]
    assert "shape (1, 4, 1, 1) in the checkpoint, (3, 4, 1, 1) here" in report.initialised[0][1]
    assert not report.head_loaded and not report.unused
    assert len(report.loaded) == len(source.state_dict()) - 2
    for name in report.loaded:
        assert torch.equal(target.state_dict()[name], source.state_dict()[name])


def test_a_deeper_network_reports_the_layers_the_checkpoint_lacks() -> None:
    shallow = UNet(UNetConfig(base=4, depth=2))
    deep = UNet(UNetConfig(base=4, depth=3))
    report = load_matching(deep, shallow.state_dict())
    assert report.head_loaded
    assert any(why == "not in the checkpoint" for _, why in report.initialised)
    assert "loaded" in report.summary() and "initialised:" in report.summary()


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ft") / "parts"
    write_dataset(out, 24, seed=3, height=64, width=64, defect_rate=0.6)
    return out


def _config(data: Path, out: Path, init: Path | None, **kw: object) -> TrainConfig:
    values: dict[str, object] = {
        "height": 64,
        "width": 64,
        "base": 4,
        "depth": 2,
        "batch_size": 4,
        "epochs": 1,
        "steps_per_epoch": 2,
        "augment": "off",
        "threads": 1,
        "bf16": False,
    }
    values.update(kw)
    return TrainConfig(data=data, out=out, init=init, **values)  # type: ignore[arg-type]


def test_fine_tuning_starts_from_the_checkpoint_and_the_card_names_its_sha256(
    parts: Path, tiny_model: Path, tmp_path: Path
) -> None:
    init = tiny_model.with_suffix(".pt")
    # A learning rate of almost zero: what comes out is what was loaded.
    result = train(_config(parts, tmp_path / "ft", init, lr=1e-9))
    net, card = load_checkpoint(result.best)
    start = read_checkpoint(init)
    for name, tensor in start["model"].items():
        if tensor.is_floating_point() and "running" not in name:
            assert torch.allclose(net.state_dict()[name], tensor, atol=1e-6), name
    assert card.training.init is not None
    assert card.training.init.sha256 == file_sha256(init)
    assert card.training.init.loaded == len(start["model"]) and not card.training.init.initialised
    assert card.normalisation == load_checkpoint(init)[1].normalisation


def test_a_checkpoint_that_fits_no_layer_is_refused(
    parts: Path, tiny_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="no layer matches this network"):
        train(_config(parts, tmp_path / "ft", tiny_model.with_suffix(".pt"), base=8, depth=3))


def test_train_init_takes_the_checkpoints_architecture_when_none_is_given(
    parts: Path, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = tiny_model.with_suffix(".pt")
    args = ["train", "--data", str(parts), "--out", str(tmp_path / "run"), "--init", str(init)]
    args += ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--threads", "1"]
    assert main([*args, "--json", "--no-bf16", "--augment", "off", "--lr", "1e-4"]) == 0
    _, card = load_checkpoint(tmp_path / "run" / "best.pt")
    assert card.architecture["base"] == 4 and card.architecture["depth"] == 2
    assert (card.input.height, card.input.width) == (64, 64)
    assert card.training.init is not None and card.training.init.checkpoint == str(init)
