"""``defectd card``: a card for an outside ONNX model, written and checked on ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from defectd.cli import main
from defectd.engines.card_tool import check_card, write_card
from defectd.errors import ConfigError, ModelError
from defectd.model.card import card_path, load_card


@pytest.fixture
def outside_model(tmp_path: Path, tiny_model: Path) -> Path:
    """The tiny U-Net as an outside model would come: an ONNX file without a card."""
    model = tmp_path / "unet.onnx"
    shutil.copy(tiny_model, model)
    return model


def test_write_reads_the_input_from_the_file_and_runs_the_model(outside_model: Path) -> None:
    path, result = write_card(outside_model, mean=(0.45,), std=(0.08,), fit="pad", threshold=0.4)
    card = load_card(outside_model)
    assert path == card_path(outside_model)
    assert (card.input.channels, card.input.height, card.input.width) == (1, 64, 64)
    assert card.input.resize == "pad" and card.threshold == 0.4
    assert result.output_shape == (2, 1, 64, 64)
    assert 0.0 <= result.prob_min <= result.prob_max <= 1.0
    assert check_card(outside_model).sha256_ok is True


def test_write_keeps_an_existing_card_without_force(outside_model: Path) -> None:
    write_card(outside_model, mean=(0.5,), std=(0.25,))
    with pytest.raises(ConfigError, match="exists; pass --force"):
        write_card(outside_model, mean=(0.5,), std=(0.25,))
    write_card(outside_model, mean=(0.4,), std=(0.2,), force=True)
    assert load_card(outside_model).normalisation.mean == (0.4,)


def test_size_given_for_a_fixed_input_must_match(outside_model: Path) -> None:
    with pytest.raises(ConfigError, match="--height: the model's input has height 64, not 128"):
        write_card(outside_model, mean=(0.5,), std=(0.25,), height=128)


def test_check_refuses_a_card_that_disagrees_with_the_model(outside_model: Path) -> None:
    write_card(outside_model, mean=(0.5,), std=(0.25,))
    path = card_path(outside_model)
    data = json.loads(path.read_text())
    data["input"]["height"] = 96
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="96"):
        check_card(outside_model)


def test_cli_write_then_check(outside_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["card", "write", str(outside_model), "--mean", "0.45", "--std", "0.08"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["card", "check", str(outside_model), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["input"]["height"] == 64 and summary["sha256_matches"]


def test_cli_needs_the_normalisation_when_not_on_a_terminal(
    outside_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["card", "write", str(outside_model)]) == 2
    assert "--mean/--std: give the normalisation" in capsys.readouterr().err
    assert not card_path(outside_model).exists()


def test_text_file_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_text("hello")
    assert main(["card", "write", str(fake), "--mean", "0.5", "--std", "0.25"]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err
