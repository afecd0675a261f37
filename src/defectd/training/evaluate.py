"""Evaluate a model on a dataset split at native resolution.

Each image is fitted to the model input (card resize policy), normalised, inferred, and the
probability map is brought back to the image's own size with ``restore_size`` before it is
thresholded, so every metric is computed on the original masks. The model is anything with
``infer((N, C, H, W) float32) -> (N, 1, H, W) float32`` probabilities: an inference engine of
``defectd.engines`` or :class:`TorchPredictor` around a U-Net being trained.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from defectd.errors import ModelError
from defectd.model.card import ModelCard, load_card
from defectd.model.checkpoint import load_checkpoint
from defectd.model.unet import UNet
from defectd.training.data import Dataset, FitPolicy, Sample, fit_to_input, restore_size
from defectd.training.metrics import ImageScore, ImageStats, MetricsAccumulator, Report
from defectd.training.torchdata import to_chw


class Predictor(Protocol):
    """``infer((N, C, H, W) float32 normalised) -> (N, 1, H, W) float32 probabilities``."""

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]: ...


class TorchPredictor:
    """A U-Net as a :class:`Predictor` (eval mode, no gradients; ``bf16`` autocast optional).

    bf16 is for quick validation during training; reported metrics use float32.
    """

    def __init__(self, net: UNet, *, bf16: bool = False) -> None:
        self.net = net
        self.bf16 = bf16

    @torch.no_grad()
    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        was_training = self.net.training
        self.net.eval()
        x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.net(x)
        self.net.train(was_training)
        out: NDArray[np.float32] = torch.sigmoid(logits.float()).numpy()
        return out


def fit_policy(card: ModelCard) -> FitPolicy:
    """The card's resize policy for whole-image evaluation; ``ModelError`` for ``tile``."""
    if card.input.resize == "tile":
        raise ModelError(
            f"model {card.name!r}: resize policy 'tile' is not supported by evaluation; "
            "use a model with 'resize' or 'pad'"
        )
    return card.input.resize


@dataclass
class OpenedModel:
    """A model ready to evaluate: its predictor, card, and a name for reports."""

    predictor: Predictor
    card: ModelCard
    engine: str  # e.g. "torch-fp32", "ort-fp32", "openvino-fp32"
    close: Callable[[], None]


BACKENDS = ("auto", "ort", "openvino", "torch")


def open_model(path: Path, *, backend: str = "auto", threads: int | None = None) -> OpenedModel:
    """Open a ``.pt`` checkpoint (torch, float32) or an ``.onnx`` model with its card.

    ONNX models run on the engine ``backend`` names through ``defectd.engines`` (``auto``
    lets the registry choose); ``ModelError`` naming the file when it cannot be opened.
    """
    path = Path(path)
    if backend not in BACKENDS:
        raise ModelError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    if path.suffix == ".pt":
        if backend not in ("auto", "torch"):
            raise ModelError(f"{path}: a checkpoint runs on the torch backend, not {backend!r}")
        net, card = load_checkpoint(path)
        if threads:
            torch.set_num_threads(threads)
        return OpenedModel(TorchPredictor(net), card, "torch-fp32", lambda: None)
    if path.suffix != ".onnx":
        raise ModelError(f"{path}: expected a .pt checkpoint or an .onnx model")
    card = load_card(path)
    engine = _open_engine(path, backend, threads)
    return OpenedModel(engine, card, str(engine.name), engine.close)


def _open_engine(path: Path, backend: str, threads: int | None) -> Any:
    """The engine registry when present, else ONNX Runtime on CPU directly."""
    try:
        registry = importlib.import_module("defectd.engines.registry")
    except ImportError:
        registry = None
    if registry is not None:
        return registry.open_engine(path, backend=backend, threads=threads, max_batch=64)
    if backend not in ("auto", "ort"):
        raise ModelError(f"{path}: backend {backend!r} is not available in this installation")
    return _OrtPredictor(path, threads)


class _OrtPredictor:
    """ONNX Runtime on CPU, for installations without the engine registry."""

    name = "ort-fp32"

    def __init__(self, path: Path, threads: int | None) -> None:
        import onnxruntime as ort  # noqa: PLC0415  # only when no registry is installed

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{path}: ONNX Runtime cannot load the model: {first}") from exc
        self._input = self._session.get_inputs()[0].name

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        out: NDArray[np.float32] = self._session.run(None, {self._input: batch})[0]
        return out

    def close(self) -> None:
        del self._session


def onnx_parity(
    net: UNet, card: ModelCard, onnx_path: Path, *, batch: int = 2, tolerance: float = 1e-4
) -> float:
    """Max abs difference of probabilities, torch float32 vs ONNX Runtime, on one seeded random
    ``(batch, C, H, W)`` input; ``ModelError`` naming the file when it exceeds ``tolerance``."""
    spec = card.input
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch, spec.channels, spec.height, spec.width), np.uint8)
    x = card.normalisation.apply(pixels)
    expected = TorchPredictor(net.eval()).infer(x)
    runner = _OrtPredictor(onnx_path, None)
    try:
        got = runner.infer(x)
    finally:
        runner.close()
    if got.shape != expected.shape:
        raise ModelError(f"{onnx_path}: ONNX output {got.shape} != torch output {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= tolerance:
        raise ModelError(
            f"{onnx_path}: ONNX Runtime differs from torch by {diff:.2e} (max abs), "
            f"above the {tolerance:g} tolerance"
        )
    return diff


@dataclass(frozen=True)
class Prediction:
    """One image at native resolution: ``image`` (H, W[, 3]) uint8, ``mask`` (H, W) uint8
    {0, 1}, ``prob`` (H, W) float32."""

    sample: Sample
    image: NDArray[np.uint8]
    mask: NDArray[np.uint8]
    prob: NDArray[np.float32]


def predict(
    dataset: Dataset,
    samples: Sequence[Sample],
    predictor: Predictor,
    card: ModelCard,
    *,
    batch_size: int = 8,
) -> Iterator[Prediction]:
    """Yield a native-resolution :class:`Prediction` for every sample, in order.

    ``DataError`` naming the file for an unreadable image or a mask that does not fit it.
    """
    spec = card.input
    policy = fit_policy(card)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [dataset.load_image(s, spec.channels) for s in chunk]
        masks = [dataset.load_mask(s, img.shape[:2]) for s, img in zip(chunk, images, strict=True)]
        fitted = np.stack(
            [to_chw(fit_to_input(img, None, spec.height, spec.width, policy)[0]) for img in images]
        )
        probs = predictor.infer(card.normalisation.apply(fitted))
        for s, img, msk, p in zip(chunk, images, masks, probs, strict=True):
            yield Prediction(s, img, msk, restore_size(p[0], img.shape[:2], policy))


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one split, plus what is needed to trace and reproduce them."""

    report: Report
    stats: list[ImageStats]
    best_threshold: float  # the threshold with the highest split Dice on the grid
    best_dice: float
    split: str
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.report.as_dict(),
            "split": self.split,
            "best_threshold": self.best_threshold,
            "best_dice": round(self.best_dice, 6),
            "seconds": round(self.seconds, 2),
        }


def evaluate(
    dataset: Dataset,
    split: str,
    predictor: Predictor,
    card: ModelCard,
    *,
    threshold: float | None = None,
    min_area_px: int | None = None,
    score: ImageScore = "max",
    batch_size: int = 8,
    on_image: Callable[[Prediction, ImageStats], None] | None = None,
) -> Evaluation:
    """Evaluate ``predictor`` on ``split`` at the card's threshold and min-area (or the given
    ones). ``on_image`` is called after each image (progress bars, overlay selection)."""
    samples = dataset.samples(split)
    acc = MetricsAccumulator(
        threshold=card.threshold if threshold is None else threshold,
        min_area_px=card.min_area_px if min_area_px is None else min_area_px,
        score=score,
    )
    t0 = time.perf_counter()
    for pred in predict(dataset, samples, predictor, card, batch_size=batch_size):
        st = acc.add(pred.prob, pred.mask, stem=pred.sample.stem, cls=pred.sample.cls)
        if on_image is not None:
            on_image(pred, st)
    best_t, best_d = acc.best_threshold()
    return Evaluation(
        report=acc.report(),
        stats=acc.stats,
        best_threshold=best_t,
        best_dice=best_d,
        split=split,
        seconds=time.perf_counter() - t0,
    )
