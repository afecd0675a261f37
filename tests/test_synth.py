"""Synthetic parts: seeded, with masks that mark exactly the pixels a defect changed."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import structlog

from defectd.cli import main
from defectd.data import synth
from defectd.data.synth import (
    DATASET_BANK_SIZE,
    DEFECTS,
    LINE_BANK_SIZE,
    MANIFEST_COLUMNS,
    SURFACES,
    PartRenderer,
    SynthPart,
    render_part,
    write_dataset,
)
from defectd.errors import ConfigError, DataError


def _part(seed: int, **kw: Any) -> SynthPart:
    return render_part(np.random.default_rng(seed), 64, 80, **kw)


@pytest.mark.parametrize("channels", [1, 3])
def test_same_generator_state_gives_the_same_part(channels: int) -> None:
    a = _part(11, defect_prob=0.5, channels=channels)
    b = _part(11, defect_prob=0.5, channels=channels)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.mask, b.mask)
    assert (a.defects, a.surface) == (b.defects, b.surface)


def test_a_fresh_renderer_reproduces_the_shared_one() -> None:
    fresh = PartRenderer(64, 80).render(np.random.default_rng(3), defect_prob=1.0)
    shared = _part(3, defect_prob=1.0)
    assert np.array_equal(fresh.image, shared.image)
    assert np.array_equal(fresh.mask, shared.mask)


def test_preparing_the_bank_does_not_change_the_parts() -> None:
    prepared = PartRenderer(64, 80)
    prepared.prepare(["cast"])
    lazy = PartRenderer(64, 80)
    for seed in range(3):
        a = prepared.render(np.random.default_rng(seed), surface="cast", defect_prob=1.0)
        b = lazy.render(np.random.default_rng(seed), surface="cast", defect_prob=1.0)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)


def test_different_seeds_give_different_parts() -> None:
    assert not np.array_equal(_part(1).image, _part(2).image)


def test_parts_have_the_requested_shape_and_dtype() -> None:
    grey = _part(0)
    rgb = _part(0, channels=3)
    assert grey.image.shape == (64, 80) and grey.image.dtype == np.uint8
    assert rgb.image.shape == (64, 80, 3) and rgb.image.dtype == np.uint8
    assert grey.mask.shape == (64, 80) and grey.mask.dtype == np.uint8


def test_mask_is_binary_and_non_empty_exactly_for_defective_parts() -> None:
    seen_good = seen_bad = 0
    for seed in range(40):
        part = _part(seed, defect_prob=0.5)
        assert set(np.unique(part.mask)) <= {0, 1}
        assert bool(part.mask.any()) == bool(part.defects)
        seen_bad += bool(part.defects)
        seen_good += not part.defects
    assert seen_good and seen_bad


@pytest.mark.parametrize("kind", DEFECTS)
def test_mask_marks_exactly_the_pixels_the_defect_changed(kind: str) -> None:
    # Equal generator states with and without defects give the same part apart from them.
    for seed in range(8):
        surface = SURFACES[seed % len(SURFACES)]
        bad = _part(seed, surface=surface, defect_prob=1.0, kinds=[kind])
        good = _part(seed, surface=surface, defect_prob=0.0)
        changed = bad.image != good.image
        assert not (changed & (bad.mask == 0)).any(), "a pixel outside the mask changed"
        assert changed[bad.mask == 1].mean() > 0.9, "most mask pixels must visibly change"
        assert bad.defects[0] == kind


def test_kinds_limit_the_defects_drawn() -> None:
    for seed in range(12):
        assert set(_part(seed, defect_prob=1.0, kinds=["pit", "stain"]).defects) <= {
            "pit",
            "stain",
        }


def test_surface_is_honoured() -> None:
    assert _part(0, surface="woven").surface == "woven"


def test_unknown_surface_or_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"surface: unknown 'marble'"):
        _part(0, surface="marble")
    with pytest.raises(ConfigError, match=r"kinds: unknown 'dent'"):
        _part(0, kinds=["dent"])


def _read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_dataset_writes_the_manifest_layout(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path / "ds", 20, seed=1, height=40, width=48, defect_rate=0.5)
    assert manifest == tmp_path / "ds" / "manifest.csv"
    assert tuple(manifest.read_text().splitlines()[0].split(",")) == MANIFEST_COLUMNS
    rows = _read_manifest(manifest)
    assert len(rows) == 20
    for row in rows:
        image = cv2.imread(str(tmp_path / "ds" / row["image"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(tmp_path / "ds" / row["mask"]), cv2.IMREAD_UNCHANGED)
        assert image.shape == mask.shape == (40, 48)
        assert set(np.unique(mask)) <= {0, 255}
        assert (row["cls"] == "free") == (row["has_defect"] == "0") == (not mask.any())
        assert float(row["defect_fraction"]) == pytest.approx((mask > 0).mean(), abs=1e-6)
        assert row["stem"].startswith(row["cls"] + "_") and row["group"] == row["stem"]
    assert {r["split"] for r in rows} == {"train", "val", "test"}


def test_write_dataset_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", 8, seed=4, height=32, width=32, defect_rate=0.5)
    b = write_dataset(tmp_path / "b", 8, seed=4, height=32, width=32, defect_rate=0.5)
    assert a.read_bytes() == b.read_bytes()
    for row in _read_manifest(a):
        for key in ("image", "mask"):
            assert (a.parent / row[key]).read_bytes() == (b.parent / row[key]).read_bytes()


def test_write_dataset_splits_have_the_asked_proportions(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path / "ds", 40, height=16, width=16, defect_rate=0.5)
    splits = [r["split"] for r in _read_manifest(manifest)]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (28, 6, 6)


def test_write_dataset_refuses_a_folder_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "real.png").write_bytes(b"keep me")
    with pytest.raises(DataError, match=r"not empty and holds no synth\.json"):
        write_dataset(tmp_path, 2, height=16, width=16)
    assert (tmp_path / "masks" / "real.png").read_bytes() == b"keep me"


def test_write_dataset_replaces_an_earlier_synthetic_set(tmp_path: Path) -> None:
    write_dataset(tmp_path, 6, height=16, width=16, defect_rate=1.0)
    write_dataset(tmp_path, 3, height=16, width=16, defect_rate=0.0)
    assert len(list((tmp_path / "images").iterdir())) == 3
    assert len(_read_manifest(tmp_path / "manifest.csv")) == 3


def test_the_line_bank_is_the_start_of_the_dataset_bank() -> None:
    line = PartRenderer(40, 48)
    dataset = PartRenderer(40, 48, bank_size=DATASET_BANK_SIZE)
    for surface in SURFACES:
        small, large = line._textures(surface), dataset._textures(surface)
        assert len(small) == LINE_BANK_SIZE and len(large) == DATASET_BANK_SIZE
        assert all(np.array_equal(a, b) for a, b in zip(small, large, strict=False))


def test_a_set_with_the_line_bank_holds_the_parts_the_line_renders(tmp_path: Path) -> None:
    manifest = write_dataset(
        tmp_path / "line", 6, seed=9, height=40, width=48, defect_rate=0.5, textures=4
    )
    line = PartRenderer(40, 48)  # as the synthetic camera line makes it
    for i, row in enumerate(_read_manifest(manifest)):
        rng = np.random.default_rng([9, i])
        part = line.render(
            rng, surface=SURFACES[int(rng.integers(0, len(SURFACES)))], defect_prob=0.5
        )
        image = cv2.imread(str(manifest.parent / row["image"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(image, part.image)
    settings = json.loads((manifest.parent / "synth.json").read_text())
    assert settings["textures"] == 4
    default = write_dataset(tmp_path / "default", 2, height=16, width=16)
    assert "textures" not in json.loads((default.parent / "synth.json").read_text())
    with pytest.raises(ConfigError, match="textures: must be at least 1, got 0"):
        write_dataset(tmp_path / "none", 2, height=16, width=16, textures=0)


def test_colour_dataset_is_stored_as_rgb(tmp_path: Path) -> None:
    write_dataset(tmp_path / "c", 2, height=24, width=24, surfaces=["tiled"], channels=3)
    row = _read_manifest(tmp_path / "c" / "manifest.csv")[0]
    bgr = cv2.imread(str(tmp_path / "c" / row["image"]), cv2.IMREAD_UNCHANGED)
    # Tiles are tinted terracotta: red above blue once the BGR file is read back.
    assert bgr.shape == (24, 24, 3) and bgr[..., 2].mean() > bgr[..., 0].mean()


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """The CLI points logging at the captured stderr; point it back once the test is over."""
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("cli_logging")
def test_synth_command_prints_one_json_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["synth", "--out", str(tmp_path / "s"), "--count", "6", "--size", "24x32"])
    assert code == 0
    capsys.readouterr()
    code = main(
        ["synth", "--out", str(tmp_path / "j"), "--count", "6", "--size", "24x32", "--json"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 6 and (summary["height"], summary["width"]) == (24, 32)
    assert sum(summary["splits"].values()) == 6


@pytest.mark.usefixtures("cli_logging")
def test_synth_command_names_a_bad_surface(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["synth", "--out", str(tmp_path / "x"), "--surfaces", "brushed,felt"])
    assert code == 2
    assert "error: surfaces: unknown 'felt'" in capsys.readouterr().err


def test_class_labelled_set_is_the_binary_set_plus_index_masks(tmp_path: Path) -> None:
    args: dict[str, Any] = {"seed": 3, "height": 40, "width": 48, "defect_rate": 0.8}
    plain = write_dataset(tmp_path / "plain", 16, **args)
    labelled = write_dataset(tmp_path / "labelled", 16, class_masks=True, **args)
    assert (labelled.parent / "classes.txt").read_text().split() == list(DEFECTS)
    assert not (plain.parent / "classes.txt").exists()
    assert not (plain.parent / "masks_cls").exists()
    for a, b in zip(_read_manifest(plain), _read_manifest(labelled), strict=True):
        assert (a["stem"], a["split"], a["has_defect"]) == (b["stem"], b["split"], b["has_defect"])
        for key in ("image", "mask"):
            assert (plain.parent / a[key]).read_bytes() == (labelled.parent / b[key]).read_bytes()
        index = cv2.imread(str(labelled.parent / b["mask_classes"]), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(labelled.parent / b["mask"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(index > 0, mask > 0)
        kinds = sorted(DEFECTS[v - 1] for v in np.unique(index) if v)
        assert b["cls"] == ("+".join(kinds) or "free")


def test_class_index_masks_hold_the_kind_the_renderer_drew(tmp_path: Path) -> None:
    manifest = write_dataset(tmp_path, 12, seed=5, height=48, width=48, class_masks=True)
    for i, row in enumerate(_read_manifest(manifest)):
        rng = np.random.default_rng([5, i])
        surface = SURFACES[int(rng.integers(0, len(SURFACES)))]
        part = PartRenderer(48, 48, bank_size=16).render(rng, surface=surface, defect_prob=0.3)
        index = cv2.imread(str(tmp_path / row["mask_classes"]), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(index, part.labels)


def test_class_labelled_set_gives_a_class_per_defect_kind(tmp_path: Path) -> None:
    from defectd.data.datasets import open_dataset

    write_dataset(tmp_path, 24, seed=2, height=32, width=32, defect_rate=0.9, class_masks=True)
    ds = open_dataset(tmp_path)
    assert ds.defect_classes() == DEFECTS
    for sample in ds.samples():
        labels = ds.load_labels(sample, (32, 32), DEFECTS)  # checks every mask against its cls
        assert np.array_equal(labels > 0, ds.load_mask(sample, (32, 32)) > 0)


def test_rewriting_a_class_labelled_set_as_binary_leaves_no_class_files(tmp_path: Path) -> None:
    write_dataset(tmp_path, 4, height=16, width=16, class_masks=True)
    write_dataset(tmp_path, 4, height=16, width=16)
    assert not (tmp_path / "classes.txt").exists()
    assert not any((tmp_path / "masks_cls").iterdir())
    assert "mask_classes" not in (tmp_path / "manifest.csv").read_text()


@pytest.mark.slow
@pytest.mark.usefixtures("cli_logging")
def test_a_multiclass_model_trains_on_a_class_labelled_synthetic_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from defectd.model.checkpoint import load_checkpoint

    data = tmp_path / "synth"
    synth_args = ["--out", str(data), "--count", "40", "--size", "32", "--defect-rate", "0.8"]
    assert main(["synth", *synth_args, "--classes", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["label_classes"] == list(DEFECTS)
    run = tmp_path / "run"
    train_args = ["--data", str(data), "--out", str(run), "--classes", "auto", "--size", "32"]
    tiny = ["--base", "4", "--depth", "2", "--epochs", "1", "--steps-per-epoch", "2"]
    assert main(["train", *train_args, *tiny, "--augment", "off", "--threads", "1"]) == 0
    net, card = load_checkpoint(run / "best.pt")
    assert card.classes == DEFECTS
    assert set(card.per_class) == set(DEFECTS)
    assert net.head.out_channels == len(DEFECTS)


@pytest.mark.usefixtures("cli_logging")
def test_synth_kinds_limit_and_weight_the_defects_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--count", "40", "--size", "32", "--defect-rate", "1", "--json"]
    code = main(["synth", "--out", str(tmp_path / "k"), "--kinds", "stain,pit,pit", *args])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["classes"]) <= {"stain", "pit"} and summary["defective"] == 40
    assert summary["classes"]["pit"] > summary["classes"]["stain"]  # named twice, drawn ~2x
    settings = json.loads((tmp_path / "k" / "synth.json").read_text())
    assert settings["kinds"] == ["stain", "pit", "pit"]
    # A set written without --kinds records none (its settings are as before).
    assert main(["synth", "--out", str(tmp_path / "d"), *args]) == 0
    capsys.readouterr()
    assert "kinds" not in json.loads((tmp_path / "d" / "synth.json").read_text())
    code = main(["synth", "--out", str(tmp_path / "x"), "--kinds", "dent", *args])
    assert code == 2
    assert "error: kinds: unknown 'dent'" in capsys.readouterr().err


def test_faint_draws_each_defect_no_stronger() -> None:
    renderer = PartRenderer(64, 64)
    stronger = 0
    for seed in range(16):
        plain, faint, twin = (
            renderer.render(np.random.default_rng(seed), defect_prob=p, kinds=["stain"], faint=f)
            for p, f in ((1.0, 0.0), (1.0, 1.0), (0.0, 0.0))
        )
        if len(plain.defects) > 1:
            continue  # the extra draw moves a second defect elsewhere
        # Geometry is drawn before contrast: the same stain, only fainter.
        assert np.array_equal(plain.mask, faint.mask) and plain.mask.any()
        sel = plain.mask > 0
        base = twin.image[sel].astype(np.float32)
        moved_plain = np.abs(plain.image[sel].astype(np.float32) - base).mean()
        moved_faint = np.abs(faint.image[sel].astype(np.float32) - base).mean()
        assert moved_faint <= moved_plain + 1.0  # rounding to grey levels
        stronger += int(moved_plain > moved_faint + 1.0)
    assert stronger >= 6  # a third of the range lies below most plain draws
    with pytest.raises(ConfigError, match="faint: must be within"):
        renderer.render(np.random.default_rng(5), faint=1.5)


@pytest.mark.usefixtures("cli_logging")
def test_synth_faint_is_recorded_with_the_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--count", "12", "--size", "32", "--defect-rate", "1", "--json"]
    assert main(["synth", "--out", str(tmp_path / "f"), "--faint", "0.5", *args]) == 0
    assert json.loads(capsys.readouterr().out)["faint"] == 0.5
    assert json.loads((tmp_path / "f" / "synth.json").read_text())["faint"] == 0.5
    assert main(["synth", "--out", str(tmp_path / "p"), *args]) == 0
    capsys.readouterr()
    assert "faint" not in json.loads((tmp_path / "p" / "synth.json").read_text())
    assert main(["synth", "--out", str(tmp_path / "x"), "--faint", "-0.1", *args]) == 2
    assert "faint: must be within [0, 1]" in capsys.readouterr().err


def test_faint_zero_draws_contrast_as_a_plain_uniform_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    # The renderer before --faint drew each contrast with one rng.uniform(low, high): parts at
    # faint 0 must be those, byte for byte (the line's parts and every existing set).
    renderer = PartRenderer(64, 64)
    kinds = ["scratch", "crack", "pit", "stain"]
    now = [
        renderer.render(np.random.default_rng(s), defect_prob=1.0, kinds=kinds) for s in range(8)
    ]
    monkeypatch.setattr(synth, "_contrast", lambda rng, c, low, high: rng.uniform(low, high))
    plain = [
        renderer.render(np.random.default_rng(s), defect_prob=1.0, kinds=kinds) for s in range(8)
    ]
    for a, b in zip(now, plain, strict=True):
        assert a.defects == b.defects
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
