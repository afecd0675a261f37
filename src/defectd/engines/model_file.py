"""Checks shared by every backend: the model file, its card, and the caller's expectations.

Every failure is one ``ModelError`` (the file is bad or disagrees with its card) or
``EngineError`` (the engine cannot serve what was asked), naming the file and the mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from defectd.engines.base import BackendEngine, EngineSpec, OpenRequest
from defectd.errors import EngineError, ModelError
from defectd.model.card import ModelCard, card_path, load_card

# ONNX TensorProto element type -> numpy dtype name, for the types a model may take.
_ELEM = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}


@dataclass(frozen=True, slots=True)
class OnnxIO:
    """Name and shape of the one input and one output of an exported model.

    A dimension is an ``int`` when fixed and a ``str`` (symbolic, e.g. ``"batch"``) when not.
    """

    input_name: str
    input_shape: tuple[int | str, ...]
    input_dtype: str
    output_name: str
    output_shape: tuple[int | str, ...]


def _dims(value: onnx.ValueInfoProto) -> tuple[int | str, ...]:
    dims: list[int | str] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or "?")
    return tuple(dims)


def read_onnx_io(path: Path) -> OnnxIO:
    """Parse ``path`` (weights not loaded into memory twice) and describe its input/output.

    Raises ``ModelError`` naming the file when it is missing, not ONNX, or not a
    one-input/one-output image model.
    """
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from exc
    graph = model.graph
    initialisers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ModelError(
            f"{path}: expected one input and one output, found "
            f"{len(inputs)} input(s) and {len(graph.output)} output(s)"
        )
    inp, out = inputs[0], graph.output[0]
    shape = _dims(inp)
    if len(shape) != 4:
        raise ModelError(f"{path}: input {inp.name!r} has shape {shape}, expected (N, C, H, W)")
    return OnnxIO(
        input_name=inp.name,
        input_shape=shape,
        input_dtype=_ELEM.get(inp.type.tensor_type.elem_type, "other"),
        output_name=out.name,
        output_shape=_dims(out),
    )


def check_onnx_against_card(path: Path, io: OnnxIO, card: ModelCard) -> None:
    """The ONNX input must be float32 ``(N, C, H, W)`` with C, H, W as the card says."""
    want = (card.input.channels, card.input.height, card.input.width)
    got = io.input_shape[1:]
    if got != want:
        raise ModelError(
            f"{path}: ONNX input {io.input_name!r} is (N, {', '.join(map(str, got))}) but "
            f"{card_path(path).name} says (N, {', '.join(map(str, want))})"
        )
    if io.input_dtype != "float32":
        raise ModelError(
            f"{path}: ONNX input {io.input_name!r} is {io.input_dtype}; engines feed float32"
        )
    outputs = io.output_shape[1] if len(io.output_shape) == 4 else None
    if isinstance(outputs, int) and outputs != len(card.classes):
        raise ModelError(
            f"{path}: ONNX output {io.output_name!r} has {outputs} channel(s) but "
            f"{card_path(path).name} lists {len(card.classes)} classes "
            f"({', '.join(card.classes)})"
        )


def check_expected(path: Path, card: ModelCard, expect: tuple[int, int, int] | None) -> None:
    """``expect`` is the caller's ``(channels, height, width)`` (e.g. from the station config)."""
    if expect is None:
        return
    have = (card.input.channels, card.input.height, card.input.width)
    if tuple(expect) != have:
        names = ("channels", "height", "width")
        diff = ", ".join(
            f"{n} {w} expected but model has {h}"
            for n, w, h in zip(names, expect, have, strict=True)
            if w != h
        )
        raise ModelError(f"{path}: input does not match the configuration: {diff}")


def make_spec(
    path: Path, card: ModelCard, io: OnnxIO | None, min_batch: int, max_batch: int
) -> EngineSpec:
    """The engine's spec from the card and the requested batch range (checked)."""
    if min_batch < 1 or max_batch < min_batch:
        raise EngineError(
            f"{path}: batch range {min_batch}..{max_batch} is invalid (need 1 <= min <= max)"
        )
    if io is not None and isinstance(io.input_shape[0], int):
        fixed = io.input_shape[0]
        if not min_batch == max_batch == fixed:
            raise EngineError(
                f"{path}: model has a fixed batch of {fixed}, asked for {min_batch}..{max_batch}"
            )
    return EngineSpec(
        channels=card.input.channels,
        height=card.input.height,
        width=card.input.width,
        min_batch=min_batch,
        max_batch=max_batch,
        outputs=len(card.classes),
    )


@dataclass(frozen=True, slots=True)
class OnnxModel:
    """An ONNX model checked for one open request: the file that serves the precision asked
    for (an int8 request may pick the QDQ model beside it), its card, I/O and spec."""

    path: Path
    card: ModelCard
    io: OnnxIO
    spec: EngineSpec
    precision: str


class OnnxEngine(BackendEngine):
    """What the in-process engines of an ONNX file share: the checked model they run (its
    file, I/O names, spec and precision), kept as ``_path``, ``_io``, ``_spec``, ``_precision``."""

    def __init__(self, model: OnnxModel) -> None:
        self._model = model
        self._path = model.path
        self._io = model.io
        self._spec = model.spec
        self._precision = model.precision

    @property
    def model_file(self) -> Path:
        return self._path


def prepare_onnx(request: OpenRequest) -> OnnxModel:
    """Read and check an ONNX model and its card for ``request`` (the ONNX backends' common
    first step). Raises ``ModelError``/``EngineError`` naming the file and the mismatch."""
    path = request.model_path
    card = load_card(path)
    check_expected(path, card, request.expect)
    want = request.precision or card.precision
    request.check_precision(want)
    if want == "int8":
        path, card = int8_model(path, card, request.backend)
    elif card.precision == "int8":
        raise EngineError(
            f"{path}: is an INT8 QDQ model; open the fp32 model for {want} (card precision)"
        )
    io = read_onnx_io(path)
    check_onnx_against_card(path, io, card)
    spec = make_spec(path, card, io, request.min_batch, request.max_batch)
    return OnnxModel(path, card, io, spec, want)


def int8_model(model_path: Path, card: ModelCard, backend: str) -> tuple[Path, ModelCard]:
    """The QDQ model that serves int8: this one, or one beside it.

    CPU backends take ``<stem>.int8.onnx`` (uint8 activations, fastest there); TensorRT takes
    ``<stem>.int8-sym.onnx`` (symmetric int8, ``quantize_qdq(..., symmetric_activations=True)``)
    and falls back to ``<stem>.int8.onnx``, which it checks.
    """
    if card.precision == "int8":
        return model_path, card
    names = [".int8.onnx"] if backend != "tensorrt" else [".int8-sym.onnx", ".int8.onnx"]
    for suffix in names:
        sibling = model_path.with_name(model_path.stem + suffix)
        if sibling.is_file():
            sibling_card = load_card(sibling)
            if sibling_card.precision == "int8":
                return sibling, sibling_card
    wanted = " or ".join(model_path.stem + n for n in names)
    raise EngineError(
        f"{model_path}: precision int8 needs a QDQ model (card precision int8) or "
        f"{wanted} beside it; make one with `defectd calibrate int8`"
    )


# Fastest first: the order in which a card's lower precisions are tried as the default.
FAST_FIRST = ("int8", "fp16", "bf16")
DICE_TOLERANCE = 0.01


def fast_precision(
    model_path: Path, card: ModelCard, runnable: tuple[str, ...], backend: str = "openvino"
) -> tuple[str, str]:
    """``(precision, why)``: the default precision of a model, the fastest that this backend
    runs here (``runnable``) whose Dice the card records within ``DICE_TOLERANCE`` of the
    model's own (``metrics["val_dice_<precision>"]`` against ``metrics["val_dice"]``, both
    measured on the validation split; int8 also needs its QDQ model beside the file); else
    the card's precision. A card without such metrics keeps its own precision."""
    base = card.metrics.get("val_dice")
    if card.precision == "fp32" and base is not None:
        for precision in FAST_FIRST:
            dice = card.metrics.get(f"val_dice_{precision}")
            if precision not in runnable or dice is None or dice < base - DICE_TOLERANCE:
                continue
            if precision == "int8":
                try:
                    int8_model(model_path, card, backend)
                except EngineError:
                    continue
            return precision, (
                f"card: val Dice {dice:.4f} at {precision} vs {base:.4f} (within "
                f"{DICE_TOLERANCE}), the fastest such precision this backend runs here"
            )
    return card.precision, "the card's precision"
