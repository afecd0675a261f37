"""The fit policy: how an image of any size reaches the model input, and the model's
probability map goes back onto the image. Defined once, here; training, evaluation, threshold
and INT8 calibration and the daemon's preprocessing all call these functions, so the model
sees on the line exactly what it saw when it was trained, evaluated and calibrated.

The model card owns the policy (``ModelCard.input.resize``):

- ``resize`` — scale the whole image to the model size (``INTER_AREA`` when shrinking both
  axes, bilinear otherwise; masks nearest-neighbour). Back: bilinear to the image size.
- ``pad`` — keep the pixel scale: reflect-pad each axis that is too small, centred, and
  centre-crop each that is too large. Back: crop the padding away; pixels cropped off were
  never inspected and get probability 0.
- ``tile`` — the model works at native scale on any part of an image: reflect-pad at the
  bottom/right an axis smaller than the model input; a larger axis stays as it is and the
  caller cuts it into overlapping model-sized tiles (``defectd.pipeline.tiling``). Back: crop
  the padding away.

A station may force a policy (``[pipeline] fit``); its default ``auto`` follows the card.

Images are ``(H, W)`` or ``(H, W, C)`` arrays (uint8 / uint16 / float32), masks ``(H, W)``
uint8, probability maps ``(H, W)`` float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

FitPolicy = Literal["resize", "pad", "tile"]
FIT_POLICIES: tuple[FitPolicy, ...] = ("resize", "pad", "tile")


@dataclass(frozen=True, slots=True)
class FitGeometry:
    """How one ``source`` = ``(H, W)`` image maps onto a ``fitted`` = ``(Hf, Wf)`` image.

    For ``pad`` and ``tile``: the source's rows ``[crop[0], crop[0] + visible[0])`` land at
    fitted rows ``[pad[0], pad[0] + visible[0])`` (columns alike with ``crop[1]``/``pad[2]``);
    ``pad`` = ``(top, bottom, left, right)`` reflect-padding. ``resize`` scales the whole image.
    """

    policy: FitPolicy
    source: tuple[int, int]
    fitted: tuple[int, int]
    pad: tuple[int, int, int, int] = (0, 0, 0, 0)
    crop: tuple[int, int] = (0, 0)

    @property
    def visible(self) -> tuple[int, int]:
        """``(rows, columns)`` of the source that reach the fitted image unscaled."""
        return min(self.source[0], self.fitted[0]), min(self.source[1], self.fitted[1])

    @property
    def identity(self) -> bool:
        """True when fitting leaves the image as it is (same size, nothing padded or cropped)."""
        return self.source == self.fitted


def _centre(length: int, target: int) -> tuple[int, int, int]:
    """``(pad before, pad after, crop start)`` that centre ``length`` pixels in ``target``."""
    if length >= target:
        return 0, 0, (length - target) // 2
    before = (target - length) // 2
    return before, target - length - before, 0


def plan_fit(
    source_hw: tuple[int, int], model_hw: tuple[int, int], policy: FitPolicy
) -> FitGeometry:
    """The :class:`FitGeometry` of a ``source_hw`` image for a ``model_hw`` input under
    ``policy``; ``ValueError`` for an unknown policy or an empty size."""
    h, w = int(source_hw[0]), int(source_hw[1])
    mh, mw = int(model_hw[0]), int(model_hw[1])
    if min(h, w, mh, mw) <= 0:
        raise ValueError(f"cannot fit a {h}x{w} image to a {mh}x{mw} model input")
    if policy == "resize":
        return FitGeometry("resize", (h, w), (mh, mw))
    if policy == "pad":
        top, bottom, crop_y = _centre(h, mh)
        left, right, crop_x = _centre(w, mw)
        return FitGeometry("pad", (h, w), (mh, mw), (top, bottom, left, right), (crop_y, crop_x))
    if policy == "tile":
        fh, fw = max(h, mh), max(w, mw)
        return FitGeometry("tile", (h, w), (fh, fw), (0, fh - h, 0, fw - w))
    raise ValueError(f"unknown fit policy {policy!r}; expected one of {', '.join(FIT_POLICIES)}")


def fit_image(
    image: NDArray[Any],
    geometry: FitGeometry,
    *,
    out: NDArray[Any] | None = None,
    nearest: bool = False,
) -> NDArray[Any]:
    """Fit ``image`` (``geometry.source`` sized, 2-D or HWC) into ``out`` (``geometry.fitted``
    sized, same dtype and channels; allocated when ``None``) and return ``out``.

    ``nearest`` scales with nearest-neighbour (label masks) instead of area/bilinear.
    ``ValueError`` when ``image`` is not the geometry's source size.
    """
    h, w = image.shape[:2]
    if (h, w) != geometry.source:
        raise ValueError(f"image of {h}x{w} px does not match the planned {geometry.source}")
    fh, fw = geometry.fitted
    if out is None:
        out = np.empty((fh, fw, *image.shape[2:]), image.dtype)
    if geometry.identity:
        np.copyto(out, image)
        return out
    if geometry.policy == "resize":
        if nearest:
            interp = cv2.INTER_NEAREST
        else:
            interp = cv2.INTER_AREA if fh <= h and fw <= w else cv2.INTER_LINEAR
        cv2.resize(image, (fw, fh), dst=out, interpolation=interp)
        return out
    vh, vw = geometry.visible
    cy, cx = geometry.crop
    src = image[cy : cy + vh, cx : cx + vw]
    top, bottom, left, right = geometry.pad
    if top == bottom == left == right == 0:
        np.copyto(out, src)
    else:
        cv2.copyMakeBorder(
            np.ascontiguousarray(src), top, bottom, left, right, cv2.BORDER_REFLECT_101, dst=out
        )
    return out


def restore_map(
    prob: NDArray[np.float32], geometry: FitGeometry, *, out: NDArray[np.float32] | None = None
) -> NDArray[np.float32]:
    """Bring a ``geometry.fitted`` ``(Hf, Wf)`` float32 map back to ``geometry.source`` size,
    into ``out`` (allocated when ``None``). Source pixels the model never saw (centre-cropped
    away by ``pad``) get 0."""
    h, w = geometry.source
    if out is None:
        out = np.empty((h, w), np.float32)
    if geometry.identity:
        np.copyto(out, prob)
        return out
    if geometry.policy == "resize":
        cv2.resize(prob, (w, h), dst=out, interpolation=cv2.INTER_LINEAR)
        return out
    vh, vw = geometry.visible
    if (vh, vw) != (h, w):
        out.fill(0.0)
    cy, cx = geometry.crop
    top, _, left, _ = geometry.pad
    out[cy : cy + vh, cx : cx + vw] = prob[top : top + vh, left : left + vw]
    return out


def fit_to_input(
    image: NDArray[np.uint8],
    mask: NDArray[np.uint8] | None,
    height: int,
    width: int,
    policy: FitPolicy,
) -> tuple[NDArray[np.uint8], NDArray[np.uint8] | None]:
    """Bring an ``(H, W)`` / ``(H, W, 3)`` image and its ``(H, W)`` mask to the model input
    ``(height, width)`` (for ``tile``: at least that size) as new arrays of the input dtypes.

    The image is fitted as the daemon fits frames; the mask alike, with nearest-neighbour
    scaling. ``ValueError`` when the mask does not match the image or the policy is unknown.
    """
    if mask is not None and mask.shape[:2] != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
    geometry = plan_fit(image.shape[:2], (height, width), policy)
    img = fit_image(image, geometry)
    msk = None if mask is None else fit_image(mask, geometry, nearest=True)
    return img, msk


def restore_size(
    prob: NDArray[np.float32], original_shape: tuple[int, int], policy: FitPolicy
) -> NDArray[np.float32]:
    """Map a model-input-sized ``(h, w)`` probability map of an image fitted with
    :func:`fit_to_input` back onto the ``original_shape`` image, as a new float32 array."""
    geometry = plan_fit(original_shape, prob.shape[:2], policy)
    if geometry.fitted != prob.shape[:2]:
        raise ValueError(
            f"a {prob.shape[0]}x{prob.shape[1]} map cannot come from fitting "
            f"{original_shape} with {policy!r}"
        )
    return restore_map(np.asarray(prob, np.float32), geometry)


def to_chw(image: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """A fitted image in the model's layout: ``(H, W)`` -> ``(1, H, W)``; ``(H, W, 3)`` ->
    ``(3, H, W)`` (a view where possible)."""
    return image[None] if image.ndim == 2 else np.transpose(image, (2, 0, 1))


# --- full-frame inference ---------------------------------------------------------------------

# Norms whose output at a pixel does not depend on the image size (batch norm in eval is a
# fixed affine map); group and instance norm average over the whole input, so a model with them
# gives other results on other sizes.
_SIZE_FREE_NORMS = ("batch", "none")


def fully_convolutional(architecture: dict[str, Any]) -> int | None:
    """The size multiple (``2 ** depth``) when a model of this card ``architecture`` computes
    each output pixel from its neighbourhood alone, so it may run on an input of any size
    that is a multiple of it (a U-Net with batch norm or none); else ``None``."""
    if architecture.get("type") != "unet":
        return None
    if architecture.get("norm", "batch") not in _SIZE_FREE_NORMS:
        return None
    return int(2 ** int(architecture.get("depth", 4)))


def _axis_window(length: int, limit: int, model: int, multiple: int, overlap: int) -> int:
    """The longest window side (a multiple of ``multiple``, at least ``model``, at most
    ``limit`` and ``length``) that covers ``length`` with the fewest windows overlapping by
    ``overlap``, the windows of one axis equal in size."""
    longest = max(model, min(limit, length) // multiple * multiple)
    if length <= longest:
        return longest
    count = -(-(length - overlap) // (longest - overlap))
    while True:
        side = -(-(length + (count - 1) * overlap) // count)  # the shortest that still covers
        side = -(-side // multiple) * multiple
        if side <= longest:
            return max(side, model)
        count += 1


def _count(length: int, side: int, overlap: int) -> int:
    """Windows of ``side`` covering ``length`` with at least ``overlap`` shared (as
    ``defectd.pipeline.tiling.axis_positions`` lays them out)."""
    return 1 if length <= side else -(-(length - side) // (side - overlap)) + 1


def window_size(
    fitted_hw: tuple[int, int],
    model_hw: tuple[int, int],
    *,
    multiple: int,
    overlap: int,
    max_pixels: int,
) -> tuple[int, int]:
    """The window a fully convolutional model (``tile`` policy) runs on for a ``fitted_hw``
    image: the whole image when it is a multiple of ``multiple`` and at most ``max_pixels``,
    else the window size, at most ``max_pixels`` and a multiple of ``multiple`` on each side
    (at least ``model_hw``), whose windows, overlapping by ``overlap`` pixels, cover the image
    with the fewest pixels in all (fewer windows on a tie).

    Fewer, larger windows repeat less of the image in overlaps than model-sized tiles (a
    2448x2048 frame in 256-px tiles with 32 px overlap is 1.29x the pixels; in 6 windows of
    704x1248 it is 1.05x); ``max_pixels`` bounds the activations one inference holds.
    """
    fh, fw = fitted_hw
    mh, mw = model_hw
    if fh < mh or fw < mw:
        raise ValueError(f"a {fh}x{fw} image is smaller than the {mh}x{mw} model input")
    best: tuple[int, int, int, int] | None = None  # (pixels, windows, h, w)
    widest = max(mw, fw // multiple * multiple)
    for columns in range(1, -(-fw // max(mw - overlap, 1)) + 2):
        w = -(-(fw + (columns - 1) * overlap) // columns)
        w = min(max(-(-w // multiple) * multiple, mw), widest)
        if w * mh > max_pixels and w > mw:
            continue
        h = _axis_window(fh, max(mh, max_pixels // w), mh, multiple, overlap)
        windows = _count(fh, h, overlap) * _count(fw, w, overlap)
        candidate = (windows * h * w, windows, h, w)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
        if w == mw:
            break
    assert best is not None
    return best[2], best[3]
