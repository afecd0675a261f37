"""Flipped views: test-time augmentation inside an exported model.

``defectd export --flips h`` writes a model whose output is the mean of the probability maps of
the image and of its left-right mirror (each mirrored back): the faint, soft-edged defects that
one view scores just under the threshold often come out in the mean, for twice the inference.
``v`` adds the up-down mirror instead, ``hv`` all four (4x). The views live in the ONNX graph,
so every engine, ``defectd eval``, calibration and the daemon run the same averaged model:
offline equals online without a switch anywhere else. The card says so in
``architecture["flips"]`` (absent: one view).

No torch import: evaluation and the benches use these definitions on NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from defectd.errors import ModelError

Flips = Literal["none", "h", "v", "hv"]
FLIPS: tuple[Flips, ...] = ("none", "h", "v", "hv")
View = tuple[int, ...]  # axes of an (N, C, H, W) batch to reverse; () is the image as it is
VIEWS: dict[Flips, tuple[View, ...]] = {
    "none": ((),),
    "h": ((), (3,)),
    "v": ((), (2,)),
    "hv": ((), (3,), (2,), (2, 3)),
}


def check_flips(flips: str) -> Flips:
    """``flips`` as a known setting; ``ModelError`` naming the choices otherwise."""
    for known in FLIPS:
        if flips == known:
            return known
    raise ModelError(f"flips {flips!r}: choose {', '.join(FLIPS)}")


def flips_of(architecture: Mapping[str, Any]) -> Flips:
    """The views a model's card says its graph averages (``none`` on cards without them)."""
    return check_flips(str(architecture.get("flips", "none")))


def average_views(
    infer: Callable[[NDArray[np.float32]], NDArray[np.float32]],
    x: NDArray[np.float32],
    flips: Flips,
) -> NDArray[np.float32]:
    """The mean over ``flips``' views of ``infer`` on the flipped ``(N, C, H, W)`` batch ``x``,
    each output flipped back: what a model exported with ``flips`` computes."""
    maps = [np.flip(infer(np.ascontiguousarray(np.flip(x, axes))), axes) for axes in VIEWS[flips]]
    return np.asarray(np.mean(maps, axis=0), dtype=np.float32)
