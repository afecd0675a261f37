"""The model card: the JSON file beside every exported model that makes verdicts traceable.

``models/NAME/model.onnx`` has its card at ``models/NAME/model.card.json``. The card says how
to feed the model (size, channels, normalisation, resize policy), what it was trained on
(data hash, split, command), how well it did (metrics) and, when ``defectd train`` made it, a
reference profile of the training images for the station's drift monitoring (``drift``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from defectd import __version__
from defectd.data.drift import DriftReference
from defectd.errors import ModelError
from defectd.model.fit import FitPolicy

CARD_SCHEMA_VERSION = 1
# Who made a model: the default of a new card (training, export and INT8 calibration make
# them); a card read from a file that has no producer (written before it existed) reads "".
PRODUCER = f"defectd {__version__}"

ResizePolicy = FitPolicy  # the card's name for it
Precision = Literal["fp32", "fp16", "bf16", "int8"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputSpec(_Frozen):
    """What the model takes: ``(N, channels, height, width)`` float32, NCHW."""

    channels: Literal[1, 3] = 1
    height: Annotated[int, Field(gt=0)] = 256
    width: Annotated[int, Field(gt=0)] = 256
    # The fit policy (defectd.model.fit): how images of another size reach (height, width).
    # "resize" scales the whole image, "pad" pads (or centre-crops) to size; "tile" says the
    # model works at native scale, so larger images are cut into overlapping tiles at full
    # resolution. Training, evaluation, calibration and the daemon all follow it.
    resize: ResizePolicy = "resize"


class Normalisation(_Frozen):
    """``x = (pixel / scale - mean) / std`` per channel, pixels as read (uint8 -> scale 255)."""

    scale: float = 255.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)

    def apply(
        self, image: NDArray[Any], out: NDArray[np.float32] | None = None
    ) -> NDArray[np.float32]:
        """Normalise an ``(C, H, W)`` or ``(N, C, H, W)`` array into float32 (``out`` if given)."""
        shape = (-1, 1, 1)
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        inv_std = (1.0 / np.asarray(self.std, np.float32)).reshape(shape)
        res: NDArray[np.float32] = np.multiply(
            image, np.float32(1.0 / self.scale), out=out, dtype=np.float32
        )
        res -= mean
        res *= inv_std
        return res


class InitInfo(_Frozen):
    """The checkpoint a fine-tuned model started from (``defectd train --init``)."""

    checkpoint: str  # the path as given
    sha256: str
    loaded: int = 0  # tensors taken from it
    initialised: tuple[str, ...] = ()  # tensors that did not match (name and shape) and why


class ClassPoint(_Frozen):
    """The operating point of one class of a multi-class model: pixel threshold on its
    channel and minimum region area in pixels at native resolution."""

    threshold: Annotated[float, Field(gt=0.0, lt=1.0)]
    min_area_px: Annotated[int, Field(ge=0)] = 0


class TrainingInfo(_Frozen):
    data: str = ""
    data_hash: str = ""
    split: str = "train"
    images: int = 0
    epochs: int = 0
    seed: int = 0
    duration_s: float = 0.0
    command: str = ""
    init: InitInfo | None = None  # fine-tuned from this checkpoint


class ModelCard(_Frozen):
    """``classes``: one output channel each, in order (multi-label: each channel its own
    sigmoid). ``threshold`` / ``min_area_px`` hold for every class that ``per_class`` does not
    name; a one-class model (``["defect"]``) has no ``per_class``."""

    schema_version: int = CARD_SCHEMA_VERSION
    name: str
    architecture: dict[str, Any] = Field(default_factory=dict)
    input: InputSpec = InputSpec()
    normalisation: Normalisation = Normalisation()
    classes: tuple[str, ...] = ("defect",)
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    min_area_px: Annotated[int, Field(ge=0)] = 0
    per_class: dict[str, ClassPoint] = Field(default_factory=dict)
    precision: Precision = "fp32"
    opset: int | None = None
    sha256: str = ""  # of the model file this card describes
    training: TrainingInfo = TrainingInfo()
    metrics: dict[str, float] = Field(default_factory=dict)
    created: str = ""
    notes: str = ""
    producer: str = PRODUCER  # "defectd <version>" that made the model
    # What the model saw in training (image statistics of the training split), the reference
    # of the station's drift monitoring (defectd.data.drift); None on cards made before it.
    drift: DriftReference | None = None

    @model_validator(mode="after")
    def _classes_known(self) -> ModelCard:
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct names, got {list(self.classes)}")
        unknown = sorted(set(self.per_class) - set(self.classes))
        if unknown:
            raise ValueError(
                f"per_class names {', '.join(unknown)}, not among classes "
                f"({', '.join(self.classes)})"
            )
        return self

    @property
    def multiclass(self) -> bool:
        """More than one output channel."""
        return len(self.classes) > 1

    def point(self, cls: str) -> ClassPoint:
        """The operating point of class ``cls`` (``per_class``, else the card's own)."""
        found = self.per_class.get(cls)
        if found is not None:
            return found
        return ClassPoint(threshold=self.threshold, min_area_px=self.min_area_px)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.model_dump(mode="json")
        if not data["per_class"]:  # one-class cards read as they did before per_class existed
            del data["per_class"]
        path.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """A card as stored (file or checkpoint); one without ``producer`` reads ``""``, not
        this version. ``ValidationError`` for an invalid card."""
        return cls.model_validate({"producer": "", **data})


def card_path(model_path: Path) -> Path:
    """``dir/model.onnx`` -> ``dir/model.card.json`` (also for ``.pt`` checkpoints)."""
    return model_path.with_name(model_path.stem + ".card.json")


def load_card(model_path: Path) -> ModelCard:
    """Read the card beside ``model_path``; a missing or invalid card is a ``ModelError``."""
    path = card_path(model_path)
    if not path.is_file():
        raise ModelError(f"{path}: model card not found (every model needs one beside it)")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ModelError(f"{path}: invalid model card: expected a JSON object")
        return ModelCard.from_dict(data)
    except (json.JSONDecodeError, ValidationError) as exc:
        detail = (
            str(exc).splitlines()[0]
            if isinstance(exc, json.JSONDecodeError)
            else (
                "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            )
        )
        raise ModelError(f"{path}: invalid model card: {detail}") from exc


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
