"""Evaluate a model on a dataset split at native resolution.

Each image is fitted to the model input (card resize policy), normalised, inferred, and the
probability map is brought back to the image's own size with ``restore_size`` before it is
thresholded, so every metric is computed on the original masks. The model is anything with
``infer((N, C, H, W) float32) -> (N, 1, H, W) float32`` probabilities: an inference engine of
``defectd.engines`` or :class:`TorchPredictor` around a U-Net being trained.

Evaluating an ONNX model needs no torch (a station install has none): torch is imported only
for ``.pt`` checkpoints and the torch-side helpers, which check for the ``train`` extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from numpy.typing import NDArray

from defectd.data.datasets import Dataset, Sample, unpack_labels
from defectd.data.metrics import (
    ClassAccumulator,
    ClassReport,
    ImageScore,
    ImageStats,
    MetricsAccumulator,
    Report,
)
from defectd.engines import open_engine
from defectd.errors import DataError, ModelError
from defectd.extras import require_extra
from defectd.model.card import ModelCard, load_card
from defectd.model.ensemble import members_of
from defectd.model.fit import FitPolicy, fit_to_input, restore_size, to_chw
from defectd.model.views import average_views, flips_of

if TYPE_CHECKING:
    from defectd.model.unet import UNet


class Predictor(Protocol):
    """``infer((N, C, H, W) float32 normalised) -> (N, K, H, W) float32 probabilities``, one
    channel per class of the card (``K = 1`` for a one-class model)."""

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]: ...


class TorchPredictor:
    """A U-Net as a :class:`Predictor` (eval mode, no gradients; ``bf16`` autocast optional).

    bf16 is for quick validation during training; reported metrics use float32.
    """

    def __init__(self, net: UNet, *, bf16: bool = False) -> None:
        self.net = net
        self.bf16 = bf16

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        import torch  # noqa: PLC0415  (a UNet exists, so torch is loaded already)

        was_training = self.net.training
        self.net.eval()
        x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
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


def trained_on(dataset: Dataset, split: str, card: ModelCard) -> int:
    """How many of ``split``'s images the model was trained on: those of its card's training
    split(s) (``train``, ``train+val``), counted only when the card's training-data hash is
    this dataset's (another or an altered data set: 0). A figure measured on them is not held
    out; eval and calibration say so."""
    if not card.training.data_hash:
        return 0
    try:
        seen = dataset.shared(card.training.split, split)
        # The hash reads every training file: only where the split names overlap at all.
        if seen and dataset.fingerprint(card.training.split) != card.training.data_hash:
            return 0
    except DataError:  # the training split is not in this data set
        return 0
    return seen


def seen_warning(count: int, split: str, card: ModelCard) -> str:
    """The line eval and calibration print when ``count`` images of ``split`` were trained on."""
    return (
        f"warning: {count} images of split {split!r} were trained on (the card's training "
        f"split is {card.training.split!r}): figures on them are not held out"
    )


@dataclass
class OpenedModel:
    """A model ready to evaluate: its predictor, card, and a name for reports."""

    predictor: Predictor
    card: ModelCard
    engine: str  # e.g. "torch-fp32", "ort-fp32", "openvino-fp32"
    close: Callable[[], None]
    precision: str = "fp32"  # what the model runs at (the engine's, not the card's)


def open_model(
    path: Path,
    *,
    backend: str = "auto",
    precision: str | None = None,
    threads: int | None = None,
    max_batch: int = 16,
) -> OpenedModel:
    """Open a ``.pt`` checkpoint or an ``.onnx`` model (with its card) for evaluation.

    A checkpoint runs on torch in float32; an ONNX model on the engine that ``backend`` names
    (``auto`` lets ``defectd.engines`` choose), at ``precision`` (default: the card's).
    ``ModelError`` / ``EngineError`` naming the file when it cannot be opened;
    ``MissingExtraError`` for a checkpoint where torch is not installed.
    """
    path = Path(path)
    if path.suffix == ".pt":
        require_extra("train", f"a .pt checkpoint ({path.name})", ("torch",))
        from defectd.model.checkpoint import load_checkpoint  # noqa: PLC0415  (loads torch)

        if backend in ("auto", "torch") and precision in (None, "fp32"):
            import torch  # noqa: PLC0415

            net, card = load_checkpoint(path)
            if threads:
                torch.set_num_threads(threads)
            return OpenedModel(TorchPredictor(channels_last(net)), card, "torch-fp32", lambda: None)
    engine = open_engine(
        path, backend=backend, precision=precision, threads=threads, max_batch=max_batch
    )
    card = load_checkpoint(path)[1] if path.suffix == ".pt" else load_card(path)
    return OpenedModel(engine, card, engine.name, engine.close, engine.precision)


def channels_last(net: UNet) -> UNet:
    """The same module with its weights in channels-last layout (oneDNN's fast path)."""
    import torch  # noqa: PLC0415  (a UNet exists, so torch is loaded already)

    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return net


def onnx_parity(
    nets: UNet | Sequence[UNet],
    card: ModelCard,
    onnx_path: Path,
    *,
    batch: int = 2,
    tolerance: float = 1e-4,
) -> float:
    """Max abs difference of probabilities, torch float32 vs ONNX Runtime, on one seeded random
    ``(batch, C, H, W)`` input; ``ModelError`` naming the file when it exceeds ``tolerance``.
    Several networks (an ensemble) are compared by the mean of their probabilities, averaged
    over the flipped views the card names (``architecture["flips"]``)."""
    spec = card.input
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch, spec.channels, spec.height, spec.width), np.uint8)
    x = card.normalisation.apply(pixels)
    flips = flips_of(card.architecture)
    expected = np.mean(
        [average_views(TorchPredictor(net.eval()).infer, x, flips) for net in members_of(nets)],
        axis=0,
    )
    runner = open_engine(onnx_path, backend="ort", precision="fp32", max_batch=max(1, batch))
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
    {0, 1}, ``prob`` (H, W) float32.

    A multi-class model's prediction also has ``probs`` (K, H, W) float32 and ``masks``
    (K, H, W) uint8 {0, 1}, one per class of the card; ``prob`` is then their maximum and
    ``mask`` their union (any defect).
    """

    sample: Sample
    image: NDArray[np.uint8]
    mask: NDArray[np.uint8]
    prob: NDArray[np.float32]
    probs: NDArray[np.float32] | None = None
    masks: NDArray[np.uint8] | None = None


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
    k = len(card.classes)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        images = [dataset.load_image(s, card.input.channels) for s in chunk]
        if k == 1:
            masks = [
                dataset.load_mask(s, img.shape[:2]) for s, img in zip(chunk, images, strict=True)
            ]
            probs = infer_images(images, predictor, card)
            for s, img, msk, p in zip(chunk, images, masks, probs, strict=True):
                yield Prediction(s, img, msk, p)
            continue
        labels = [
            unpack_labels(dataset.load_labels(s, img.shape[:2], card.classes), k).astype(np.uint8)
            for s, img in zip(chunk, images, strict=True)
        ]
        maps = infer_class_maps(images, predictor, card)
        for s, img, msk, per_class in zip(chunk, images, labels, maps, strict=True):
            yield Prediction(
                s,
                img,
                np.asarray(msk.max(axis=0), np.uint8),
                np.asarray(per_class.max(axis=0), np.float32),
                per_class,
                msk,
            )


def infer_class_maps(
    images: Sequence[NDArray[np.uint8]], predictor: Predictor, card: ModelCard
) -> list[NDArray[np.float32]]:
    """One batch: each image fitted to the input by the card's fit policy, normalised,
    inferred and brought back to its own size: ``(K, H, W)`` float32 probabilities per image,
    one channel per class of the card. ``ModelError`` when the model's output has another
    number of channels."""
    spec = card.input
    policy = fit_policy(card)
    fitted = np.stack(
        [to_chw(fit_to_input(img, None, spec.height, spec.width, policy)[0]) for img in images]
    )
    probs = predictor.infer(card.normalisation.apply(fitted))
    k = len(card.classes)
    if probs.ndim != 4 or probs.shape[1] != k:
        raise ModelError(
            f"model {card.name!r}: output {tuple(probs.shape)} has {probs.shape[1:2]} "
            f"channels but the card lists {k} classes ({', '.join(card.classes)})"
        )
    return [
        np.stack([restore_size(p[c], img.shape[:2], policy) for c in range(k)])
        for img, p in zip(images, probs, strict=True)
    ]


def infer_images(
    images: Sequence[NDArray[np.uint8]], predictor: Predictor, card: ModelCard
) -> list[NDArray[np.float32]]:
    """One batch: each image fitted to the input by the card's fit policy, normalised,
    inferred and brought back to its own size: ``(H, W)`` float32 probabilities per image
    (a multi-class model: the maximum over its classes, "any defect")."""
    if card.multiclass:
        return [
            np.asarray(m.max(axis=0), np.float32) for m in infer_class_maps(images, predictor, card)
        ]
    spec = card.input
    policy = fit_policy(card)
    fitted = np.stack(
        [to_chw(fit_to_input(img, None, spec.height, spec.width, policy)[0]) for img in images]
    )
    probs = predictor.infer(card.normalisation.apply(fitted))
    return [restore_size(p[0], img.shape[:2], policy) for img, p in zip(images, probs, strict=True)]


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one split, plus what is needed to trace and reproduce them."""

    report: Report
    stats: list[ImageStats]
    best_threshold: float  # the threshold with the highest split Dice on the grid
    best_dice: float  # multi-class: the mean over the classes of each one's best Dice
    split: str
    seconds: float
    classes: ClassReport | None = None  # per-class pixel metrics of a multi-class model

    def as_dict(self) -> dict[str, Any]:
        out = {
            **self.report.as_dict(),
            "split": self.split,
            "best_threshold": self.best_threshold,
            "best_dice": round(self.best_dice, 6),
            "seconds": round(self.seconds, 2),
        }
        if self.classes is not None:
            out["classes"] = self.classes.as_dict()
        return out


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
    tolerance_px: int | None = None,
    on_image: Callable[[Prediction, ImageStats], None] | None = None,
) -> Evaluation:
    """Evaluate ``predictor`` on ``split`` at the card's threshold and min-area (or the given
    ones); ``tolerance_px`` adds boundary-tolerant precision, recall and F1. ``on_image`` is
    called after each image (progress bars, overlay selection, mask files)."""
    samples = dataset.samples(split)
    acc = MetricsAccumulator(
        threshold=card.threshold if threshold is None else threshold,
        min_area_px=card.min_area_px if min_area_px is None else min_area_px,
        score=score,
        tolerance_px=tolerance_px,
    )
    per_class = None
    if card.multiclass:
        points = [card.point(c) for c in card.classes]
        per_class = ClassAccumulator(
            card.classes,
            tuple(p.threshold if threshold is None else threshold for p in points),
            tuple(p.min_area_px if min_area_px is None else min_area_px for p in points),
        )
    t0 = time.perf_counter()
    for pred in predict(dataset, samples, predictor, card, batch_size=batch_size):
        union = None
        if per_class is not None:
            assert pred.probs is not None and pred.masks is not None
            union = np.asarray(per_class.add(pred.probs, pred.masks).any(axis=0), bool)
        st = acc.add(pred.prob, pred.mask, stem=pred.sample.stem, cls=pred.sample.cls, binary=union)
        if on_image is not None:
            on_image(pred, st)
    best_t, best_d = acc.best_threshold()
    class_report = per_class.report() if per_class is not None else None
    if class_report is not None:
        best_d = float(np.mean([float(r["best_dice"]) for r in class_report.per_class.values()]))
    return Evaluation(
        report=acc.report(),
        stats=acc.stats,
        best_threshold=best_t,
        best_dice=best_d,
        split=split,
        seconds=time.perf_counter() - t0,
        classes=class_report,
    )
