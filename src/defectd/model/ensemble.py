"""A seed ensemble: several checkpoints of one recipe exported as one model.

``defectd export -c A.pt -c B.pt -c C.pt`` writes one ONNX file whose output is the mean of
the members' probability maps. Runs of one recipe that differ only in their seed disagree on
the images that decide a small test set (docs/training.md, "The shipped magnetic tile model");
their mean takes the variance out of that choice for K times the inference of one member.

Members must be interchangeable inside one graph: the same architecture, input, normalisation,
classes and training data. The ensemble's card is the first member's with the architecture's
``members`` count, every member's training command, the summed training time and no metrics
(the members' are not the ensemble's: evaluate and calibrate the exported model).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from defectd.errors import ModelError
from defectd.model.card import ModelCard

if TYPE_CHECKING:
    from defectd.model.unet import UNet


def members_of(nets: UNet | Sequence[UNet]) -> list[UNet]:
    """One network or several as the list of an ensemble's members; ``ModelError`` when
    there is none. (No torch import: evaluation of ONNX models calls this module too.)"""
    members = list(nets) if isinstance(nets, Sequence) else [nets]
    if not members:
        raise ModelError("no network given")
    return members


def ensemble_card(members: Sequence[tuple[Path, ModelCard]]) -> ModelCard:
    """The card of the mean of ``members`` ((checkpoint path, card) in order); ``ModelError``
    naming the first member that does not match the first one, and on what."""
    if not members:
        raise ModelError("an ensemble needs at least one checkpoint")
    (first_path, first), rest = members[0], members[1:]
    if not rest:
        return first
    for path, card in rest:
        for field, mine, theirs in (
            ("architecture", card.architecture, first.architecture),
            ("input", card.input, first.input),
            ("normalisation", card.normalisation, first.normalisation),
            ("classes", card.classes, first.classes),
            ("training data", card.training.data_hash, first.training.data_hash),
        ):
            if mine != theirs:
                raise ModelError(
                    f"{path}: {field} differs from {first_path}'s ({mine} vs {theirs}); "
                    "an ensemble's members must match in architecture, input, normalisation, "
                    "classes and training data"
                )
    cards = [card for _, card in members]
    seeds = ", ".join(f"{path} (seed {card.training.seed})" for path, card in members)
    training = first.training.model_copy(
        update={
            "duration_s": round(sum(c.training.duration_s for c in cards), 1),
            "command": " ; ".join(c.training.command for c in cards),
        }
    )
    note = (
        f"ensemble: mean of the probability maps of {len(cards)} checkpoints: {seeds}; "
        f"threshold and min_area_px are {first_path}'s until chosen for the ensemble "
        "(defectd export --data, defectd calibrate threshold)"
    )
    return first.model_copy(
        update={
            "architecture": {**first.architecture, "members": len(cards)},
            "training": training,
            "metrics": {},
            "notes": note,
        }
    )
