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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnxruntime.quantization import CalibrationMethod as OrtMethod
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from defectd.data.metrics import MetricsAccumulator
from defectd.errors import CalibrationError, ModelError
from defectd.log import get_logger
from defectd.model.card import PRODUCER, ModelCard, card_path, file_sha256, load_card
from defectd.model.fit import fit_to_input, to_chw

if TYPE_CHECKING:
    from defectd.data.datasets import Dataset
    from defectd.training.evaluate import Prediction

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


def float_nodes(model: onnx.ModelProto, keep: Sequence[str]) -> list[str]:
    """Node names for ``keep``: ``"first"`` / ``"last"`` name the first / last Conv of the
    graph (the input layer is the most sensitive to int8 in our U-Nets), other entries are
    node names. ``CalibrationError`` for a name that is not in the graph."""
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    names = {n.name for n in model.graph.node}
    out: list[str] = []
    for item in keep:
        if item in ("first", "last") and convs:
            out.append(convs[0] if item == "first" else convs[-1])
        elif item in names:
            out.append(item)
        else:
            raise CalibrationError(
                f"keep float {item!r}: not 'first', 'last' or a node of the model"
            )
    return out


def quantize_qdq(
    onnx_in: Path,
    onnx_out: Path,
    calibration: Iterable[NDArray[np.float32]],
    *,
    method: CalibrationMethod = "minmax",
    per_channel: bool = True,
    symmetric_activations: bool = False,
    keep_float: Sequence[str] = (),
) -> ModelCard:
    """Quantise the fp32 model ``onnx_in`` into an INT8 QDQ model at ``onnx_out``.

    ``calibration`` yields normalised batches ``(N, C, H, W) float32`` (as engines take them,
    see ``Normalisation.apply``); a few dozen representative images are enough for min/max.
    Writes the card beside ``onnx_out`` (``precision="int8"``, new sha256, calibration notes)
    and returns it. ``symmetric_activations``: int8 activations with zero point 0 (TensorRT)
    instead of uint8 with a zero point (fastest on CPUs). ``keep_float``: convolutions left in
    float besides the sigmoid, by node name or ``"first"`` / ``"last"`` (see :func:`float_nodes`).

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
    excluded = _final_nodes(model) + float_nodes(model, keep_float)
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
                nodes_to_exclude=excluded,
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
        + (f", float convolutions: {', '.join(keep_float)}" if keep_float else "")
    )
    out_card = card.model_copy(
        update={
            "producer": PRODUCER,
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


# ----------------------------------------------------------------------------- agreement
# Calibration batches from a dataset split and the fp32-vs-int8 comparison that
# ``defectd calibrate int8`` reports (one row per calibration method).


def calibration_batches(
    dataset: Dataset,
    split: str,
    card: ModelCard,
    *,
    samples: int = 128,
    batch_size: int = 8,
) -> list[NDArray[np.float32]]:
    """Normalised ``(N, C, H, W) float32`` batches of up to ``samples`` images of ``split``,
    spread evenly over the split (deterministic), fitted to the card's input.

    ``CalibrationError`` when ``samples < 1``; ``DataError`` for an empty split or bad file.
    """
    if samples < 1:
        raise CalibrationError(f"--samples {samples}: need at least one calibration image")
    # Deferred: the evaluation module is needed only for this, not to quantise.
    from defectd.training.evaluate import fit_policy  # noqa: PLC0415

    pool = dataset.samples(split)
    step = max(1, len(pool) / samples)
    chosen = [pool[int(i * step)] for i in range(min(samples, len(pool)))]
    spec = card.input
    policy = fit_policy(card)
    out: list[NDArray[np.float32]] = []
    for start in range(0, len(chosen), batch_size):
        fitted = np.stack(
            [
                to_chw(
                    fit_to_input(
                        dataset.load_image(s, spec.channels), None, spec.height, spec.width, policy
                    )[0]
                )
                for s in chosen[start : start + batch_size]
            ]
        )
        out.append(card.normalisation.apply(fitted))
    return out


@dataclass(frozen=True)
class Agreement:
    """fp32 vs int8 on one split at one threshold/min area (pooled pixel IoU and Dice).

    ``verdict_agreement``: share of images with the same pass/fail (any defect left after the
    threshold and min area); ``disagreements`` names the images that differ.
    """

    method: str
    split: str
    images: int
    threshold: float
    min_area_px: int
    fp32_iou: float
    fp32_dice: float
    int8_iou: float
    int8_dice: float
    verdict_agreement: float
    disagreements: tuple[str, ...]
    max_abs_diff: float  # largest |p_int8 - p_fp32| over every pixel

    @property
    def iou_delta(self) -> float:
        return self.int8_iou - self.fp32_iou

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "split": self.split,
            "images": self.images,
            "threshold": self.threshold,
            "min_area_px": self.min_area_px,
            "fp32": {"iou": round(self.fp32_iou, 6), "dice": round(self.fp32_dice, 6)},
            "int8": {"iou": round(self.int8_iou, 6), "dice": round(self.int8_dice, 6)},
            "iou_delta": round(self.iou_delta, 6),
            "verdict_agreement": round(self.verdict_agreement, 6),
            "disagreements": list(self.disagreements),
            "max_abs_diff": round(self.max_abs_diff, 6),
        }


def compare_predictions(
    reference: Sequence[Prediction],
    candidate: Sequence[Prediction],
    *,
    method: str,
    split: str,
    threshold: float,
    min_area_px: int,
) -> Agreement:
    """Compare int8 predictions with the fp32 ones of the same images (same order)."""
    if len(reference) != len(candidate):
        raise CalibrationError(f"{len(reference)} fp32 vs {len(candidate)} int8 predictions")
    ref = MetricsAccumulator(threshold=threshold, min_area_px=min_area_px, keep_sweep=False)
    got = MetricsAccumulator(threshold=threshold, min_area_px=min_area_px, keep_sweep=False)
    differ: list[str] = []
    worst = 0.0
    for a, b in zip(reference, candidate, strict=True):
        sa = ref.add(a.prob, a.mask, stem=a.sample.stem, cls=a.sample.cls)
        sb = got.add(b.prob, b.mask, stem=b.sample.stem, cls=b.sample.cls)
        if sa.predicted_defect != sb.predicted_defect:
            differ.append(a.sample.stem)
        worst = max(worst, float(np.max(np.abs(a.prob - b.prob))) if a.prob.size else 0.0)
    r, g = ref.report().overall, got.report().overall
    n = len(reference)
    return Agreement(
        method=method,
        split=split,
        images=n,
        threshold=threshold,
        min_area_px=min_area_px,
        fp32_iou=r.iou,
        fp32_dice=r.dice,
        int8_iou=g.iou,
        int8_dice=g.dice,
        verdict_agreement=(n - len(differ)) / n if n else 1.0,
        disagreements=tuple(differ),
        max_abs_diff=worst,
    )
