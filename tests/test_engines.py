"""Every CPU backend behind one contract: parity with torch, batch range, clear errors."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from conftest import blob_batch
from defectd.engines import Engine, available_backends, open_engine
from defectd.engines.base import engine_concurrency
from defectd.engines.openvino_backend import cpu_capabilities
from defectd.errors import EngineError, ModelError
from defectd.model import ModelCard, card_path, load_card


@pytest.fixture(scope="module")
def batch(tiny_model: Path) -> np.ndarray:
    images, _ = blob_batch(np.random.default_rng(7), 4)
    return load_card(tiny_model).normalisation.apply(images)


@pytest.fixture(scope="module")
def reference(tiny_model: Path, batch: np.ndarray) -> np.ndarray:
    engine = open_engine(tiny_model.with_suffix(".pt"), backend="torch", threads=2)
    try:
        return engine.infer(batch)
    finally:
        engine.close()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def run(model: Path, backend: str, precision: str | None, batch: np.ndarray) -> np.ndarray:
    engine = open_engine(model, backend=backend, precision=precision, max_batch=8, threads=2)
    try:
        assert isinstance(engine, Engine)
        return engine.infer(batch)
    finally:
        engine.close()


def test_reference_finds_the_discs(reference: np.ndarray) -> None:
    # The fixture model is trained, so mask comparisons below compare real decisions.
    frac = float((reference > 0.5).mean())
    assert 0.01 < frac < 0.5


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_fp32_backends_agree_with_torch_within_1e4(
    tiny_model: Path, backend: str, batch: np.ndarray, reference: np.ndarray
) -> None:
    out = run(tiny_model, backend, "fp32", batch)
    assert out.shape == (4, 1, 64, 64) and out.dtype == np.float32
    diff = float(np.abs(out - reference).max())
    print(f"{backend}-fp32 max abs diff vs torch: {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.skipif("BF16" not in cpu_capabilities(), reason="CPU has no bf16 support")
def test_openvino_bf16_masks_match_torch(
    tiny_model: Path, batch: np.ndarray, reference: np.ndarray
) -> None:
    out = run(tiny_model, "openvino", "bf16", batch)
    score = iou(out > 0.5, reference > 0.5)
    print(
        f"openvino-bf16 mask IoU vs torch: {score:.4f}, "
        f"max abs diff {np.abs(out - reference).max():.3f}"
    )
    assert score >= 0.95


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_int8_masks_match_torch(
    tiny_model: Path, tiny_int8_model: Path, backend: str, batch: np.ndarray, reference: np.ndarray
) -> None:
    # precision="int8" on the fp32 model finds model.int8.onnx beside it.
    out = run(tiny_model, backend, "int8", batch)
    score = iou(out > 0.5, reference > 0.5)
    print(f"{backend}-int8 mask IoU vs torch: {score:.4f}")
    assert score >= 0.9


@pytest.mark.parametrize(
    ("backend", "precision", "name"),
    [("ort", None, "ort-fp32"), ("openvino", "fp32", "openvino-fp32"), ("ort", "int8", "ort-int8")],
)
def test_engine_name_states_backend_and_precision(
    tiny_model: Path, tiny_int8_model: Path, backend: str, precision: str | None, name: str
) -> None:
    engine = open_engine(tiny_model, backend=backend, precision=precision)
    assert engine.name == name
    assert engine.precision == name.split("-")[1]
    assert engine.version
    engine.close()


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_batch_range_is_enforced(tiny_model: Path, backend: str) -> None:
    engine = open_engine(tiny_model, backend=backend, min_batch=2, max_batch=3)
    x = np.zeros((1, 1, 64, 64), np.float32)
    assert engine.infer(np.repeat(x, 2, axis=0)).shape == (2, 1, 64, 64)
    assert engine.infer(np.repeat(x, 3, axis=0)).shape == (3, 1, 64, 64)
    with pytest.raises(ValueError, match=r"batch of 4, engine accepts 2\.\.3"):
        engine.infer(np.repeat(x, 4, axis=0))
    with pytest.raises(ValueError, match=r"batch of 1, engine accepts 2\.\.3"):
        engine.infer(x)
    engine.close()


def test_wrong_image_shape_is_refused(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, backend="ort")
    with pytest.raises(ValueError, match=r"expects \(N, 1, 64, 64\)"):
        engine.infer(np.zeros((1, 1, 32, 32), np.float32))
    engine.close()


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_each_result_is_a_new_array(tiny_model: Path, backend: str, batch: np.ndarray) -> None:
    engine = open_engine(tiny_model, backend=backend)
    first = engine.infer(batch[:2])
    kept = first.copy()
    engine.infer(batch[2:4])
    np.testing.assert_array_equal(first, kept)
    engine.close()


def test_config_expecting_other_input_is_a_model_error(tiny_model: Path) -> None:
    with pytest.raises(
        ModelError,
        match=r"model\.onnx: input does not match the configuration: "
        r"channels 3 expected but model has 1",
    ):
        open_engine(tiny_model, backend="ort", expect=(3, 64, 64))


def test_onnx_disagreeing_with_its_card_is_a_model_error(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_model, model)
    card = ModelCard.model_validate(
        {
            **load_card(tiny_model).model_dump(),
            "input": {"channels": 1, "height": 128, "width": 128},
        }
    )
    card.save(card_path(model))
    with pytest.raises(
        ModelError, match=r"is \(N, 1, 64, 64\) but model\.card\.json says \(N, 1, 128, 128\)"
    ):
        open_engine(model, backend="openvino")


def test_garbage_model_file_names_the_file(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"\x00not an onnx model at all")
    shutil.copy(card_path(tiny_model), card_path(model))
    with pytest.raises(ModelError, match=r"broken\.onnx: not a readable ONNX model"):
        open_engine(model, backend="ort")


def test_missing_model_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nothing\.onnx: model file not found"):
        open_engine(tmp_path / "nothing.onnx")


def test_int8_without_a_qdq_model_says_how_to_make_one(tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    shutil.copy(tiny_model, model)
    shutil.copy(card_path(tiny_model), card_path(model))
    with pytest.raises(EngineError, match=r"int8 needs a QDQ model .*defectd calibrate int8"):
        open_engine(model, backend="ort", precision="int8")


def test_unsupported_precision_names_what_the_backend_runs(tiny_model: Path) -> None:
    with pytest.raises(EngineError, match=r"ort runs fp32, int8; precision bf16"):
        open_engine(tiny_model, backend="ort", precision="bf16")


def test_auto_picks_openvino_on_this_cpu_and_logs_why(tiny_model: Path) -> None:
    with capture_logs() as logs:
        engine = open_engine(tiny_model)
    engine.close()
    assert engine.name == "openvino-fp32"
    (event,) = [e for e in logs if e["event"] == "engine_selected"]
    assert event["backend"] == "openvino"
    assert event["precision"] == "fp32"
    assert "no NVIDIA GPU" in event["reason"]


def test_checkpoint_opens_on_torch(tiny_model: Path) -> None:
    with capture_logs() as logs:
        engine = open_engine(tiny_model.with_suffix(".pt"))
    assert engine.name == "torch-fp32"
    assert any("checkpoint" in e.get("reason", "") for e in logs)
    engine.close()


def test_closed_engine_refuses_to_run(tiny_model: Path, batch: np.ndarray) -> None:
    engine = open_engine(tiny_model, backend="ort")
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.infer(batch[:1])


def test_backend_listing_marks_cpu_backends_available_and_tensorrt_not() -> None:
    infos = {i.name: i for i in available_backends()}
    assert infos["ort"].available and infos["openvino"].available and infos["torch"].available
    assert "fp32" in infos["openvino"].precisions
    if not infos["tensorrt"].available:
        assert (
            "no NVIDIA GPU" in infos["tensorrt"].detail or "pip install" in infos["tensorrt"].detail
        )


def test_openvino_batch_of_any_size_matches_single_images(
    tiny_model: Path, batch: np.ndarray
) -> None:
    engine = open_engine(tiny_model, backend="openvino", precision="fp32", threads=2, max_batch=4)
    assert engine.batch_sizes == (1, 2, 4)  # type: ignore[attr-defined]
    together = engine.infer(batch[:3])  # runs on the batch-4 model, zero-padded
    alone = np.concatenate([engine.infer(batch[i : i + 1]) for i in range(3)])
    engine.close()
    assert together.shape == (3, 1, *batch.shape[2:])
    assert float(np.abs(together - alone).max()) <= 1e-5


def test_openvino_throughput_mode_runs_calls_in_parallel_and_agrees_with_latency_mode(
    tiny_model: Path, batch: np.ndarray
) -> None:
    fast = open_engine(tiny_model, backend="openvino", precision="fp32", threads=2, max_batch=2)
    solo = open_engine(
        tiny_model, backend="openvino", precision="fp32", threads=2, max_batch=2, mode="latency"
    )
    assert engine_concurrency(solo) == 1
    assert engine_concurrency(fast) == fast.concurrency >= 1  # type: ignore[attr-defined]
    want = solo.infer(batch[:2])
    results: list[np.ndarray] = []
    threads = [
        threading.Thread(target=lambda: results.append(fast.infer(batch[:2])))
        for _ in range(2 * engine_concurrency(fast))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fast.close()
    solo.close()
    assert len(results) == len(threads)
    for got in results:
        assert float(np.abs(got - want).max()) <= 1e-5
    with pytest.raises(EngineError, match="closed"):
        fast.infer(batch[:1])


def _with_metrics(model: Path, where: Path, metrics: dict[str, float]) -> Path:
    """A copy of ``model`` (and its int8 sibling, if any) whose card records ``metrics``."""
    where.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "model.int8.onnx"):
        src = model.with_name(name)
        if src.is_file():
            shutil.copy(src, where / name)
            shutil.copy(card_path(src), card_path(where / name))
    card = load_card(model)
    card.model_copy(update={"metrics": {**card.metrics, **metrics}}).save(
        card_path(where / "model.onnx")
    )
    return where / "model.onnx"


def test_default_precision_is_the_fastest_whose_card_dice_is_within_a_hundredth(
    tiny_model: Path, tiny_int8_model: Path, tmp_path: Path
) -> None:
    close = _with_metrics(tiny_model, tmp_path / "a", {"val_dice": 0.80, "val_dice_int8": 0.795})
    with capture_logs() as logs:
        engine = open_engine(close, backend="openvino")
    engine.close()
    assert engine.name == "openvino-int8"
    (event,) = [e for e in logs if e["event"] == "engine_selected"]
    assert "val Dice 0.7950 at int8" in event["precision_reason"]

    far = _with_metrics(tiny_model, tmp_path / "b", {"val_dice": 0.80, "val_dice_int8": 0.78})
    engine = open_engine(far, backend="openvino")
    engine.close()
    assert engine.name == "openvino-fp32"  # int8 lost 0.02: the card's own precision
    assert open_engine(close, backend="openvino", precision="fp32").name == "openvino-fp32"


def test_a_card_without_precision_metrics_keeps_its_own_precision(tiny_model: Path) -> None:
    engine = open_engine(tiny_model, backend="openvino")
    engine.close()
    assert engine.name == "openvino-fp32"


def test_a_seed_ensemble_runs_as_one_model_on_every_backend(tmp_path: Path) -> None:
    """Two networks exported as one (mean of probabilities) agree with torch running both,
    and torch running both gives the mean of each one alone."""
    import torch

    from defectd.engines.model_file import make_spec
    from defectd.engines.torch_backend import TorchEngine
    from defectd.model import UNet, UNetConfig
    from defectd.model.ensemble import ensemble_card
    from defectd.model.export import export_onnx

    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        nets.append(UNet(UNetConfig(base=4, depth=2)).eval())
    card = ModelCard(name="pair", input={"height": 32, "width": 32})
    card = ensemble_card([(tmp_path / "a.pt", card), (tmp_path / "b.pt", card)])
    out = tmp_path / "pair.onnx"
    card = export_onnx(nets, card, out)
    spec = make_spec(out, card, None, 1, 4)
    x = card.normalisation.apply(blob_batch(np.random.default_rng(0), 3, 32)[0] * 255.0)
    both = TorchEngine(nets, card, spec).infer(x)
    alone = [TorchEngine(net, card, spec).infer(x) for net in nets]
    np.testing.assert_allclose(both, (alone[0] + alone[1]) / 2, atol=1e-6)
    for backend in ("ort", "openvino"):
        engine = open_engine(out, backend=backend, precision="fp32", max_batch=4)
        try:
            assert float(np.abs(engine.infer(x) - both).max()) <= 1e-4, backend
        finally:
            engine.close()
