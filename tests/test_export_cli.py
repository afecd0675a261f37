"""`defectd export`: ONNX beside its card, and torch vs ONNX Runtime parity through the CLI."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from defectd.cli import main
from defectd.data.synth import write_dataset
from defectd.errors import ModelError
from defectd.model.card import ModelCard, file_sha256, load_card
from defectd.model.checkpoint import save_checkpoint
from defectd.model.recover import read_onnx_init
from defectd.model.unet import UNet, UNetConfig
from defectd.model.views import average_views, check_flips


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = UNet(UNetConfig(base=4, depth=2))
    card = ModelCard(
        name="small",
        input={"height": 32, "width": 48},
        threshold=0.37,
        metrics={"val_dice": 0.81},
        training={"command": "defectd train --data d --out r", "data_hash": "ab" * 32},
    )
    path = tmp_path_factory.mktemp("run") / "best.pt"
    save_checkpoint(path, net.eval(), card)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> tuple[int, dict[str, Any], Path]:
    """``defectd export --json`` run once: exit code, its JSON summary, the ONNX path."""
    out = checkpoint.parent / "models" / "small" / "model.onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--json"])
    return rc, json.loads(stdout.getvalue()), out


def test_export_passes_parity_within_1e4(exported: tuple[int, dict[str, Any], Path]) -> None:
    rc, summary, _ = exported
    assert rc == 0
    assert summary["parity_max_abs_diff"] <= 1e-4


def test_export_writes_card_with_checkpoint_metrics(
    exported: tuple[int, dict[str, Any], Path],
) -> None:
    out = exported[2]
    card = load_card(out)
    assert card.sha256 == file_sha256(out)
    assert card.opset is not None and card.opset >= 17
    assert card.threshold == 0.37
    assert card.metrics == {"val_dice": 0.81}
    assert card.training.command == "defectd train --data d --out r"


def test_exported_model_takes_any_batch_at_the_card_size(
    exported: tuple[int, dict[str, Any], Path],
) -> None:
    out = exported[2]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        (prob,) = session.run(None, {"image": np.zeros((batch, 1, 32, 48), np.float32)})
        assert prob.shape == (batch, 1, 32, 48)
        assert prob.min() >= 0.0 and prob.max() <= 1.0


def test_export_of_a_file_that_is_no_checkpoint_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "notes.pt"
    bogus.write_text("not a checkpoint")
    rc = main(["export", "--checkpoint", str(bogus), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: {bogus}: not a defectd checkpoint")
    assert len(err.strip().splitlines()) == 1


def test_export_of_a_missing_checkpoint_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "run" / "best.pt"
    rc = main(["export", "--checkpoint", str(missing), "--out", str(tmp_path / "m.onnx")])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: checkpoint not found"


def test_a_fixed_point_for_a_multi_class_model_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _small_checkpoint(tmp_path / "s.pt", seed=1, classes=("scratch", "pit"))
    out = tmp_path / "m.onnx"
    rc = main(["export", "-c", str(ckpt), "-o", str(out), "--threshold", "0.2", "--min-area", "8"])
    assert rc == 2
    assert "a multi-class model has a point per class" in capsys.readouterr().err
    assert not out.exists()
    assert not out.with_name("m.card.json").exists()


def _small_checkpoint(
    path: Path, *, seed: int, height: int = 32, classes: tuple[str, ...] = ("defect",)
) -> Path:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(base=4, depth=2, out_channels=len(classes)))
    card = ModelCard(
        name="small",
        classes=classes,
        input={"height": height, "width": 48},
        threshold=0.37,
        metrics={"val_dice": 0.8 + seed / 100},
        training={
            "command": f"defectd train --data d --seed {seed}",
            "data_hash": "ab" * 32,
            "seed": seed,
            "duration_s": 60.0,
        },
    )
    save_checkpoint(path, net.eval(), card)
    return path


def _run(args: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(args)
    return rc, stdout.getvalue()


def _eval_val(model: Path, data: Path) -> dict[str, Any]:
    """``defectd eval --json`` of ``model`` on ``data``'s val split (ONNX Runtime, fp32)."""
    rc, text = _run(
        ["eval", "--model", str(model), "--data", str(data), "--split", "val", "--backend", "ort",
         "--precision", "fp32", "--json"]
    )  # fmt: skip
    assert rc == 0
    report: dict[str, Any] = json.loads(text)
    return report


def test_several_checkpoints_export_as_the_mean_of_their_probabilities(tmp_path: Path) -> None:
    paths = [_small_checkpoint(tmp_path / f"s{seed}.pt", seed=seed) for seed in (5, 6, 7)]
    singles = []
    for path in paths:
        out = tmp_path / f"{path.stem}.onnx"
        assert _run(["export", "-c", str(path), "-o", str(out), "--json"])[0] == 0
        singles.append(out)
    ensemble = tmp_path / "ensemble" / "model.onnx"
    rc, text = _run(
        ["export", *(a for p in paths for a in ("-c", str(p))), "-o", str(ensemble), "--json"]
    )
    assert rc == 0
    summary = json.loads(text)
    assert summary["members"] == 3
    assert summary["parity_max_abs_diff"] <= 1e-4

    x = np.random.default_rng(1).normal(size=(2, 1, 32, 48)).astype(np.float32)

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (prob,) = session.run(None, {"image": x})
        return np.asarray(prob)

    members = [run(p) for p in singles]
    assert not np.allclose(members[0], members[1], atol=1e-3)  # the seeds really differ
    np.testing.assert_allclose(run(ensemble), np.mean(members, axis=0), atol=1e-5)

    card = load_card(ensemble)
    assert card.architecture["members"] == 3
    assert card.metrics == {}  # the members' figures are not the ensemble's
    assert card.training.duration_s == 180.0
    assert card.training.command.split(" ; ") == [
        f"defectd train --data d --seed {seed}" for seed in (5, 6, 7)
    ]
    assert all(str(p) in card.notes for p in paths)
    assert card.sha256 == file_sha256(ensemble)


def test_an_ensemble_member_that_does_not_fit_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _small_checkpoint(tmp_path / "a.pt", seed=1)
    other = _small_checkpoint(tmp_path / "b.pt", seed=2, height=64)
    out = tmp_path / "m.onnx"
    rc = main(["export", "-c", str(first), "-c", str(other), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: {other}: input differs from {first}'s")
    assert not out.exists()


def test_export_with_data_chooses_the_cards_point_on_val_as_eval_measures_it(
    tmp_path: Path,
) -> None:
    data = tmp_path / "ds"
    write_dataset(data, 40, seed=3, height=32, width=48, defect_rate=0.5)
    paths = [_small_checkpoint(tmp_path / f"s{seed}.pt", seed=seed) for seed in (1, 2)]
    out = tmp_path / "m.onnx"
    args = ["export", "-c", str(paths[0]), "-c", str(paths[1]), "-o", str(out), "--json"]
    rc, text = _run([*args, "--data", str(data)])
    assert rc == 0
    summary = json.loads(text)
    card = load_card(out)
    assert summary["threshold"] == card.threshold
    assert "chosen on split 'val'" in card.notes
    assert {"val_dice", "val_auroc"} <= card.metrics.keys()
    assert card.sha256 == file_sha256(out)  # the card changed, the model did not

    report = _eval_val(out, data)
    assert report["threshold"] == card.threshold
    assert report["min_area_px"] == card.min_area_px
    assert abs(report["dice"] - card.metrics["val_dice"]) < 1e-4
    assert abs(report["auroc"] - card.metrics["val_auroc"]) < 1e-4


def _ort(path: Path) -> Any:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def infer(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {"image": x})[0])

    return infer


@pytest.mark.parametrize("flips", ["h", "v", "hv"])
def test_flipped_views_are_averaged_inside_the_exported_model(tmp_path: Path, flips: str) -> None:
    paths = [_small_checkpoint(tmp_path / f"s{seed}.pt", seed=seed) for seed in (1, 2)]
    plain = tmp_path / "plain.onnx"
    flipped = tmp_path / "flipped.onnx"
    members = [a for p in paths for a in ("-c", str(p))]
    assert _run(["export", *members, "-o", str(plain)])[0] == 0
    rc, text = _run(["export", *members, "-o", str(flipped), "--flips", flips, "--json"])
    assert rc == 0
    summary = json.loads(text)
    assert summary["flips"] == flips
    assert summary["parity_max_abs_diff"] <= 1e-4  # torch averaged the same views

    x = np.random.default_rng(3).normal(size=(3, 1, 32, 48)).astype(np.float32)
    one_view = _ort(plain)
    expected = average_views(one_view, x, check_flips(flips))
    got = _ort(flipped)(x)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, one_view(x), atol=1e-3)  # the views really differ

    card = load_card(flipped)
    assert card.architecture["flips"] == flips
    assert "flips" not in load_card(plain).architecture
    assert f"flipped views averaged in the graph ({flips}" in card.notes
    with pytest.raises(ModelError, match="flipped views averaged"):
        read_onnx_init(flipped)  # not a network to start training from


def test_a_model_with_flipped_views_evaluates_alike_on_every_cpu_engine(tmp_path: Path) -> None:
    data = tmp_path / "ds"
    write_dataset(data, 24, seed=4, height=32, width=48, defect_rate=0.5)
    out = tmp_path / "m.onnx"
    ckpt = _small_checkpoint(tmp_path / "s.pt", seed=1)
    assert _run(["export", "-c", str(ckpt), "-o", str(out), "--flips", "h", "--force"])[0] == 0
    reports = {}
    for backend in ("ort", "openvino"):
        rc, text = _run(
            ["eval", "--model", str(out), "--data", str(data), "--split", "val", "--backend",
             backend, "--precision", "fp32", "--threshold", "0.5", "--json"]
        )  # fmt: skip
        assert rc == 0
        reports[backend] = json.loads(text)
    assert reports["ort"]["auroc"] == pytest.approx(reports["openvino"]["auroc"], abs=1e-3)
    assert reports["ort"]["dice"] == pytest.approx(reports["openvino"]["dice"], abs=1e-3)


def test_unknown_flips_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = _small_checkpoint(tmp_path / "s.pt", seed=1)
    out = tmp_path / "m.onnx"
    rc = main(["export", "-c", str(ckpt), "-o", str(out), "--flips", "diagonal"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("error: flips 'diagonal': choose none, h, v, hv")
    assert not out.exists()


def test_export_with_a_fixed_point_writes_it_to_the_card_and_eval_applies_it(
    tmp_path: Path,
) -> None:
    data = tmp_path / "ds"
    write_dataset(data, 20, seed=4, height=32, width=48, defect_rate=0.5)
    ckpt = _small_checkpoint(tmp_path / "s.pt", seed=1)
    out = tmp_path / "m.onnx"
    rc, text = _run(
        ["export", "-c", str(ckpt), "-o", str(out), "--threshold", "0.01", "--min-area", "12",
         "--json"]
    )  # fmt: skip
    assert rc == 0
    summary = json.loads(text)
    card = load_card(out)
    assert (summary["threshold"], summary["min_area_px"]) == (0.01, 12)
    assert (card.threshold, card.min_area_px) == (0.01, 12)
    assert card.metrics == {}  # measured at the checkpoint's 0.37: not this point's
    assert "fixed at export" in card.notes
    assert card.sha256 == file_sha256(out)

    report = _eval_val(out, data)
    assert (report["threshold"], report["min_area_px"]) == (0.01, 12)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "0.2"], "--threshold and --min-area: give both"),
        (["--min-area", "8"], "--threshold and --min-area: give both"),
        (["--threshold", "1.5", "--min-area", "8"], "--threshold 1.5: a probability"),
        (["--threshold", "0.2", "--min-area", "-1"], "--min-area -1: a pixel count"),
        (["--threshold", "0.2", "--min-area", "8", "--data", "d"], "--threshold/--min-area fix"),
    ],
)
def test_a_bad_fixed_point_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    ckpt = _small_checkpoint(tmp_path / "s.pt", seed=1)
    out = tmp_path / "m.onnx"
    rc = main(["export", "-c", str(ckpt), "-o", str(out), *extra])
    assert rc == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not out.exists()
