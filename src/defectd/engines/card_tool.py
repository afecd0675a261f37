"""Cards for models trained elsewhere: write ``model.card.json`` for an outside ONNX model, or
check that a card and its model agree and run.

The card format is documented in ``docs/model-card.md``. What a card must say that the ONNX
file cannot: the normalisation the model was trained with, the fit policy (how images of
another size reach the input), the decision threshold and minimum area. What it must agree
with in the file: one ``(N, C, H, W)`` float32 input whose C/H/W are the card's ``input``, and
one output of defect probabilities ``(N, 1, H, W)`` in [0, 1] (the sigmoid is part of the
graph), which the check verifies by running the model on ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from defectd.engines.model_file import OnnxIO, check_onnx_against_card, read_onnx_io
from defectd.errors import ConfigError, ModelError
from defectd.model.card import (
    InputSpec,
    ModelCard,
    Normalisation,
    card_path,
    file_sha256,
    load_card,
)
from defectd.model.fit import FitPolicy


@dataclass(frozen=True, slots=True)
class CardCheck:
    """What ``check_card`` ran: the engine, the output shape, and the probability range seen."""

    card: ModelCard
    io: OnnxIO
    engine: str
    output_shape: tuple[int, ...]
    prob_min: float
    prob_max: float
    sha256_ok: bool | None  # None: the card names no sha256


def _fixed(io: OnnxIO, index: int, given: int | None, what: str) -> int:
    dim = io.input_shape[index]
    if isinstance(dim, int) and dim > 0:
        if given is not None and given != dim:
            raise ConfigError(f"--{what}: the model's input has {what} {dim}, not {given}")
        return dim
    if given is None:
        raise ConfigError(
            f"--{what}: the model's input {what} is dynamic ({dim!r}); give the size it was "
            f"trained at"
        )
    return given


def run_check(model: Path, card: ModelCard) -> CardCheck:
    """Open ``model`` with ``card`` on ONNX Runtime, run a batch of 2 random images through it
    and check the output: ``(2, K, H, W)`` probabilities in [0, 1], one channel per class of
    the card. ``ModelError`` if not."""
    from defectd.engines.registry import open_engine  # noqa: PLC0415

    io = read_onnx_io(model)
    check_onnx_against_card(model, io, card)
    spec = card.input
    tmp_card = card_path(model)
    if not tmp_card.is_file():
        raise ModelError(f"{tmp_card}: model card not found")
    engine = open_engine(model, backend="ort", max_batch=2, threads=1)
    try:
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (2, spec.channels, spec.height, spec.width))
        probs = engine.infer(card.normalisation.apply(pixels.astype(np.float32)))
        name = engine.name
    finally:
        engine.close()
    want = (2, len(card.classes), spec.height, spec.width)
    if probs.shape != want:
        raise ModelError(
            f"{model}: output shape {probs.shape} for a batch of 2; expected {want} (one "
            "defect-probability map per image and class)"
        )
    lo, hi = float(probs.min()), float(probs.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise ModelError(
            f"{model}: outputs range {lo:.3g}..{hi:.3g}, not probabilities in [0, 1]; export "
            "the model with its final sigmoid"
        )
    sha_ok = None if not card.sha256 else card.sha256 == file_sha256(model)
    return CardCheck(card, io, name, tuple(probs.shape), lo, hi, sha_ok)


def check_card(model: Path) -> CardCheck:
    """Check the card beside ``model`` against the file and by running it; ``ModelError`` (the
    card or model is wrong) naming the problem. A sha256 that differs is reported, not raised."""
    return run_check(model, load_card(model))


def write_card(
    model: Path,
    *,
    name: str | None = None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    scale: float = 255.0,
    fit: FitPolicy = "resize",
    threshold: float = 0.5,
    min_area_px: int = 0,
    classes: tuple[str, ...] = ("defect",),
    channels: int | None = None,
    height: int | None = None,
    width: int | None = None,
    notes: str = "",
    force: bool = False,
) -> tuple[Path, CardCheck]:
    """Write ``<model stem>.card.json`` for the ONNX ``model`` after checking it runs with it.

    Input C/H/W come from the file; dynamic ones must be given. ``mean``/``std`` are per
    channel (one value is repeated). An existing card is replaced only with ``force``.
    Raises ``ConfigError`` for missing or conflicting options, ``ModelError`` for a model the
    daemon cannot use.
    """
    model = Path(model)
    if model.suffix.lower() != ".onnx":
        raise ConfigError(f"{model}: a card is written for an .onnx model")
    target = card_path(model)
    if target.exists() and not force:
        raise ConfigError(f"{target} exists; pass --force to replace it")
    io = read_onnx_io(model)
    c = _fixed(io, 1, channels, "channels")
    if c not in (1, 3):
        raise ModelError(f"{model}: input has {c} channels; the daemon feeds 1 (grey) or 3 (RGB)")
    h = _fixed(io, 2, height, "height")
    w = _fixed(io, 3, width, "width")
    if len(mean) == 1:
        mean = mean * c
    if len(std) == 1:
        std = std * c
    if len(mean) != c or len(std) != c:
        raise ConfigError(f"--mean/--std: give 1 or {c} values (one per channel)")
    if min(std) <= 0:
        raise ConfigError("--std: must be positive")
    try:
        card = ModelCard(
            name=name or model.stem,
            input=InputSpec(channels=c, height=h, width=w, resize=fit),  # type: ignore[arg-type]
            normalisation=Normalisation(scale=scale, mean=mean, std=std),
            classes=classes,
            threshold=threshold,
            min_area_px=min_area_px,
            opset=None,
            sha256=file_sha256(model),
            notes=notes or "card written by `defectd card write` for an outside model",
        )
    except ValidationError as exc:  # threshold out of (0, 1), ...
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"card: {where}: {first['msg']}") from None
    previous = target.read_bytes() if target.is_file() else None
    card.save(target)
    try:
        result = run_check(model, card)
    except BaseException:
        # No new card for a model that does not run with it; a replaced one comes back.
        if previous is None:
            target.unlink(missing_ok=True)
        else:
            target.write_bytes(previous)
        raise
    return target, result


__all__ = ["CardCheck", "check_card", "run_check", "write_card"]
