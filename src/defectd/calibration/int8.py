"""INT8 quantisation of an exported model into a QDQ ONNX (the core that calibration builds on).

``quantize_qdq`` runs ONNX Runtime's static quantisation: it feeds normalised calibration
batches through the fp32 model, records activation ranges (min/max, entropy or percentile),
and writes explicit QuantizeLinear/DequantizeLinear pairs around every quantisable operator.
Weights are signed int8, symmetric, per output channel. Activations are, by default, uint8
with a zero point (asymmetric): the form x86 int8 kernels (VNNI/AMX ``u8 x s8``) take
directly, so ONNX Runtime and OpenVINO quantise every convolution, including those after the
U-Net's skip concatenations. TensorRT accepts only symmetric int8 (zero point 0): pass
``symmetric_activations=True`` for a model meant for a TensorRT plan (it also runs on CPU,
with some convolutions left in float there). The final sigmoid stays in float so
probabilities keep their resolution near the decision threshold.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnxruntime.quantization import CalibrationMethod as OrtMethod
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from defectd.errors import CalibrationError, ModelError
from defectd.log import get_logger
from defectd.model.card import ModelCard, card_path, file_sha256, load_card

log = get_logger(__name__)

CalibrationMethod = Literal["minmax", "entropy", "percentile"]
METHODS: tuple[CalibrationMethod, ...] = ("minmax", "entropy", "percentile")


class _BatchReader:
    """Feeds calibration batches to ONNX Runtime's calibrator, checking each one's shape."""

    def __init__(
        self, input_name: str, batches: Iterable[NDArray[np.float32]], chw: tuple[int, int, int]
    ) -> None:
        self._name = input_name
        self._it: Iterator[NDArray[np.float32]] = iter(batches)
        self._chw = chw
        self.batches = 0
        self.images = 0

    def get_next(self) -> dict[str, NDArray[np.float32]] | None:
        batch = next(self._it, None)
        if batch is None:
            return None
        arr = np.asarray(batch)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype != np.float32 or arr.ndim != 4 or tuple(arr.shape[1:]) != self._chw:
            raise CalibrationError(
                f"calibration batch {self.batches}: got {arr.dtype} {tuple(arr.shape)}, "
                f"expected normalised float32 (N, {', '.join(map(str, self._chw))})"
            )
        self.batches += 1
        self.images += arr.shape[0]
        return {self._name: np.ascontiguousarray(arr)}

    def rewind(self) -> None:  # part of ORT's reader protocol; one pass is all we need
        return None


def _final_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that produce graph outputs (the sigmoid): left in float."""
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if set(n.output) & outputs]


def quantize_qdq(
    onnx_in: Path,
    onnx_out: Path,
    calibration: Iterable[NDArray[np.float32]],
    *,
    method: CalibrationMethod = "minmax",
    per_channel: bool = True,
    symmetric_activations: bool = False,
) -> ModelCard:
    """Quantise the fp32 model ``onnx_in`` into an INT8 QDQ model at ``onnx_out``.

    ``calibration`` yields normalised batches ``(N, C, H, W) float32`` (as engines take them,
    see ``Normalisation.apply``); a few dozen representative images are enough for min/max.
    Writes the card beside ``onnx_out`` (``precision="int8"``, new sha256, calibration notes)
    and returns it. ``symmetric_activations``: int8 activations with zero point 0 (TensorRT)
    instead of uint8 with a zero point (fastest on CPUs).

    Raises ``ModelError`` for an unreadable model or card and ``CalibrationError`` for a bad
    method, a batch of the wrong shape or no batches at all.
    """
    if method not in METHODS:
        raise CalibrationError(f"calibration method {method!r}: choose one of {', '.join(METHODS)}")
    card = load_card(onnx_in)
    if card.precision != "fp32":
        raise ModelError(f"{onnx_in}: card says precision {card.precision}; quantise an fp32 model")
    try:
        model = onnx.load(str(onnx_in))
    except Exception as exc:  # protobuf raises DecodeError, OSError, ...
        raise ModelError(f"{onnx_in}: not a readable ONNX model ({exc})") from exc
    input_name = model.graph.input[0].name
    chw = (card.input.channels, card.input.height, card.input.width)
    reader = _BatchReader(input_name, calibration, chw)
    ort_method = {
        "minmax": OrtMethod.MinMax,
        "entropy": OrtMethod.Entropy,
        "percentile": OrtMethod.Percentile,
    }[method]
    extra: dict[str, Any] = {
        "ActivationSymmetric": symmetric_activations,
        "WeightSymmetric": True,
    }
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="defectd-qdq-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        # Folds constants and annotates shapes so that every Conv gets its QDQ pair.
        quant_pre_process(str(onnx_in), str(pre), skip_symbolic_shape=True)
        try:
            quantize_static(
                str(pre),
                str(onnx_out),
                reader,
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                calibrate_method=ort_method,
                nodes_to_exclude=_final_nodes(model),
                extra_options=extra,
            )
        except CalibrationError:
            raise
        except Exception as exc:  # the calibrator raises ValueError/RuntimeError on empty data
            if reader.batches == 0:
                raise CalibrationError(
                    f"{onnx_in}: no calibration batches were given (need at least one)"
                ) from exc
            raise CalibrationError(f"{onnx_in}: INT8 quantisation failed: {exc}") from exc
    if reader.batches == 0:
        raise CalibrationError(f"{onnx_in}: no calibration batches were given (need at least one)")
    notes = (
        f"INT8 QDQ from {onnx_in.name} (sha256 {card.sha256[:12] or file_sha256(onnx_in)[:12]}): "
        f"{method} calibration on {reader.images} images, "
        f"{'per-channel' if per_channel else 'per-tensor'} int8 weights, "
        f"{'symmetric int8' if symmetric_activations else 'asymmetric uint8'} activations"
    )
    out_card = card.model_copy(
        update={
            "precision": "int8",
            "sha256": file_sha256(onnx_out),
            "notes": (card.notes + "\n" + notes).strip(),
        }
    )
    out_card.save(card_path(onnx_out))
    log.info(
        "quantized_int8",
        model=str(onnx_in),
        out=str(onnx_out),
        method=method,
        per_channel=per_channel,
        symmetric_activations=symmetric_activations,
        batches=reader.batches,
        images=reader.images,
    )
    return out_card
