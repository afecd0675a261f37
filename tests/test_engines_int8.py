"""INT8 QDQ quantisation: the written model and card, the two activation forms, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from defectd.calibration.int8 import quantize_qdq
from defectd.errors import CalibrationError, ModelError
from defectd.model import load_card


def zero_point_types(path: Path) -> set[str]:
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    return {
        str(numpy_helper.to_array(inits[n.input[2]]).dtype)
        for n in model.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits
    }


def test_qdq_model_and_int8_card_are_written(tiny_int8_model: Path, tiny_model: Path) -> None:
    card = load_card(tiny_int8_model)
    assert card.precision == "int8"
    assert card.input == load_card(tiny_model).input
    assert card.sha256 != load_card(tiny_model).sha256
    assert "minmax calibration on 32 images" in card.notes
    ops = {n.op_type for n in onnx.load(str(tiny_int8_model)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Sigmoid"} <= ops


def test_cpu_form_has_uint8_activations(tiny_int8_model: Path) -> None:
    assert zero_point_types(tiny_int8_model) == {"uint8"}


def test_tensorrt_form_has_symmetric_int8_activations(tiny_int8_trt_model: Path) -> None:
    qdq = tiny_int8_trt_model.with_name("model.int8-sym.onnx")
    assert zero_point_types(qdq) == {"int8"}
    model = onnx.load(str(qdq))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert not any(
        inits[n.input[2]].any() for n in model.graph.node if n.op_type == "QuantizeLinear"
    )


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_produce_a_runnable_model(
    tiny_model: Path, tmp_path: Path, method: str
) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(2, 1, 64, 64)).astype(np.float32) for _ in range(2)]
    out = tmp_path / f"{method}.onnx"
    card = quantize_qdq(tiny_model, out, batches, method=method)  # type: ignore[arg-type]
    assert method in card.notes
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (prob,) = session.run(None, {"image": batches[0]})
    assert prob.shape == (2, 1, 64, 64) and np.isfinite(prob).all()


def test_no_calibration_batches_is_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no calibration batches"):
        quantize_qdq(tiny_model, tmp_path / "q.onnx", [])


def test_batch_of_the_wrong_shape_names_the_batch(tiny_model: Path, tmp_path: Path) -> None:
    bad = [np.zeros((2, 3, 64, 64), np.float32)]
    with pytest.raises(
        CalibrationError, match=r"calibration batch 0: .*expected .*\(N, 1, 64, 64\)"
    ):
        quantize_qdq(tiny_model, tmp_path / "q.onnx", bad)


def test_unknown_method_lists_the_choices(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="minmax, entropy, percentile"):
        quantize_qdq(tiny_model, tmp_path / "q.onnx", [], method="kl")  # type: ignore[arg-type]


def test_quantising_an_int8_model_again_is_refused(tiny_int8_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="quantise an fp32 model"):
        quantize_qdq(tiny_int8_model, tmp_path / "q.onnx", [])
