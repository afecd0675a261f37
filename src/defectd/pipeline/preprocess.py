"""From a camera frame to normalised model-sized tiles, and the geometry to map results back.

Per frame: check the buffer, convert the pixel format to the model's channels (uint16 Mono10/12/
14/16 to 8 bit when the model reads 8-bit pixels), flat-field and undistort the full frame,
cut the region of interest, fit it to the model input by the card's fit policy
(``defectd.model.fit``: resize / pad / tile), normalise into a pooled ``(C, Hf, Wf)`` float32
buffer. ``Geometry`` remembers how the ROI maps to that buffer so post-processing can bring
the probability map back to ROI pixels (``restore``).
All array work is OpenCV/numpy on preallocated buffers; nothing loops over pixels in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.model.card import ModelCard
from defectd.model.fit import (
    FitGeometry,
    FitPolicy,
    fit_image,
    fully_convolutional,
    plan_fit,
    restore_map,
    window_size,
)
from defectd.pipeline.buffers import BufferPool, Scratch
from defectd.pipeline.cameras import CameraSetup
from defectd.pipeline.config import FitMode, PipelineConfig, StitchMode
from defectd.pipeline.failures import ErrorReason, FrameError
from defectd.pipeline.frame import Frame
from defectd.pipeline.tiling import TilePlan, plan_tiles

MAX_SIDE = 65_535
_BITS = {"Mono10": 10, "Mono12": 12, "Mono14": 14, "Mono16": 16}


@dataclass(frozen=True, slots=True, eq=False)
class Geometry:
    """How the region of interest of a frame maps onto the model input and back.

    ``roi`` is ``(x, y, width, height)`` in frame pixels. ``fit`` (the card's fit policy,
    :mod:`defectd.model.fit`) maps the ROI image onto an image of ``fitted`` = ``(Hf, Wf)``
    pixels, which ``plan`` cuts into model-sized tiles (one tile unless the policy is ``tile``).
    """

    frame_shape: tuple[int, int]
    roi: tuple[int, int, int, int]
    fit: FitGeometry
    plan: TilePlan

    @property
    def mode(self) -> FitPolicy:
        return self.fit.policy

    @property
    def fitted(self) -> tuple[int, int]:
        return self.fit.fitted

    @property
    def offsets(self) -> tuple[int, int, int, int]:
        """``(pad_top, pad_left, crop_top, crop_left)`` of the fit."""
        return self.fit.pad[0], self.fit.pad[2], self.fit.crop[0], self.fit.crop[1]

    @property
    def roi_shape(self) -> tuple[int, int]:
        return self.roi[3], self.roi[2]

    def restore(self, prob: NDArray[np.float32], out: NDArray[np.float32]) -> NDArray[np.float32]:
        """``(Hf, Wf)`` probabilities -> ``out`` ``(roi height, roi width)`` float32.

        Pixels the model never saw (centre-cropped away by ``pad``) get probability 0.
        """
        return restore_map(prob, self.fit, out=out)


@dataclass(slots=True, eq=False)
class Prepared:
    """A preprocessed frame: ``data`` ``(C, Hf, Wf)`` float32 normalised, from ``pool``."""

    data: NDArray[np.float32]
    geometry: Geometry
    pool: BufferPool

    def release(self) -> None:
        """Give ``data`` back to the pool; it must not be used afterwards."""
        self.pool.give(self.data)


def check_image(image: Any) -> None:
    """Raise ``FrameError(corrupt_frame)`` unless ``image`` is a usable frame buffer:
    ``(H, W)`` uint8/uint16 or ``(H, W, 1|3)`` uint8, non-empty."""
    if not isinstance(image, np.ndarray):
        raise FrameError(
            ErrorReason.CORRUPT_FRAME, f"image is {type(image).__name__}, not a numpy array"
        )
    if image.dtype not in (np.uint8, np.uint16):
        raise FrameError(
            ErrorReason.CORRUPT_FRAME, f"image dtype {image.dtype}, expected uint8 or uint16"
        )
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise FrameError(
            ErrorReason.CORRUPT_FRAME, f"image shape {image.shape}, expected (H, W) or (H, W, 3)"
        )
    if image.ndim == 3 and image.shape[2] == 3 and image.dtype != np.uint8:
        raise FrameError(
            ErrorReason.CORRUPT_FRAME, f"colour image dtype {image.dtype}, expected uint8"
        )
    if image.size == 0 or max(image.shape[:2]) > MAX_SIDE:
        raise FrameError(
            ErrorReason.CORRUPT_FRAME, f"image shape {image.shape} is empty or too large"
        )


def choose_fit(fit: FitMode, card_policy: FitPolicy) -> FitPolicy:
    """The fit policy for frames: the card's (``auto``), or the one the station forces.

    ``auto`` never tiles a model whose card says ``resize`` or ``pad``, however large the frame:
    the model was trained, evaluated and calibrated on whole images fitted that way.
    """
    return card_policy if fit == "auto" else fit


def make_geometry(
    frame_hw: tuple[int, int],
    roi: tuple[int, int, int, int],
    model_hw: tuple[int, int],
    mode: FitPolicy,
    *,
    overlap: int,
    stitch: StitchMode,
    window: tuple[int, int] | None = None,
) -> Geometry:
    """The geometry of a ROI of a ``frame_hw`` frame fitted to ``model_hw`` with ``mode``,
    cut into tiles of ``model_hw`` (or of ``window`` for full-frame inference: see
    ``full_frame_window``)."""
    _, _, w, h = roi
    fit = plan_fit((h, w), model_hw, mode)
    th, tw = window or model_hw
    plan = plan_tiles(fit.fitted[0], fit.fitted[1], th, tw, overlap=overlap, stitch=stitch)
    return Geometry(frame_hw, roi, fit, plan)


def full_frame_window(
    card: ModelCard,
    config: PipelineConfig,
    mode: FitPolicy,
    fitted_hw: tuple[int, int],
    *,
    at_once: int = 1,
    float32: bool = False,
) -> tuple[int, int] | None:
    """The window a ``fitted_hw`` image is inspected in when the station allows full-frame
    inference (``[pipeline] full_frame``), the policy is ``tile`` and the card's model is
    fully convolutional (``defectd.model.fit.window_size``); ``None``: model-sized tiles.
    ``at_once`` windows run in parallel (the engine's requests): they share
    ``full_frame_max_px``, so the activations held stay within the same bound. The budget
    counts pixels of 16-bit activations (bf16, fp16; int8 engines alike): an engine that
    computes in ``float32`` holds twice the bytes per pixel and gets half the pixels."""
    multiple = fully_convolutional(card.architecture)
    model_hw = (card.input.height, card.input.width)
    if not config.full_frame or mode != "tile" or multiple is None or fitted_hw == model_hw:
        return None
    if model_hw[0] % multiple or model_hw[1] % multiple:
        return None
    window = window_size(
        fitted_hw,
        model_hw,
        multiple=multiple,
        overlap=config.tile_overlap_px,
        max_pixels=max(
            config.full_frame_max_px // max(at_once, 1) // (2 if float32 else 1),
            model_hw[0] * model_hw[1],
        ),
    )
    return None if window == model_hw else window


class Preprocessor:
    """Turns frames into ``Prepared`` tiles for one model card; one instance per thread.

    Keeps its own scratch buffers and a small cache of geometries (one per frame size and ROI);
    takes the normalised output buffers from ``pool``, shared with the batcher that gives them
    back.
    """

    def __init__(
        self,
        card: ModelCard,
        config: PipelineConfig,
        pool: BufferPool,
        *,
        windows: int = 0,
        float32: bool = False,
    ) -> None:
        self.card = card
        # How many full-frame windows the engine runs at once (``at_size``); 0: it cannot.
        self._windows = windows
        self._float32 = float32  # the engine computes in float32: half the window pixels
        self.config = config
        self.pool = pool
        self._channels = card.input.channels
        self._model_hw = (card.input.height, card.input.width)
        self._eight_bit = card.normalisation.scale <= 255.0
        self._scratch = Scratch()
        self._geometries: dict[tuple[tuple[int, int], tuple[int, int, int, int]], Geometry] = {}

    def geometry(self, frame_hw: tuple[int, int], setup: CameraSetup) -> Geometry:
        """The (cached) geometry for a frame of ``frame_hw`` seen through ``setup.roi``.

        Raises ``FrameError(corrupt_frame)`` when the ROI does not lie inside the frame.
        """
        fh, fw = frame_hw
        if setup.roi is None:
            roi = (0, 0, fw, fh)
        else:
            r = setup.roi
            roi = (r.x, r.y, r.width, r.height)
            if r.x + r.width > fw or r.y + r.height > fh:
                raise FrameError(
                    ErrorReason.CORRUPT_FRAME,
                    f"ROI x={r.x} y={r.y} {r.width}x{r.height} lies outside the {fw}x{fh} frame",
                )
        key = (frame_hw, roi)
        geo = self._geometries.get(key)
        if geo is None:
            mode = choose_fit(self.config.fit, self.card.input.resize)
            window = None
            if self._windows:
                fitted = plan_fit((roi[3], roi[2]), self._model_hw, mode).fitted
                window = full_frame_window(
                    self.card,
                    self.config,
                    mode,
                    fitted,
                    at_once=self._windows,
                    float32=self._float32,
                )
            geo = make_geometry(
                frame_hw,
                roi,
                self._model_hw,
                mode,
                overlap=self.config.tile_overlap_px,
                stitch=self.config.stitch,
                window=window,
            )
            if len(self._geometries) >= 16:
                self._geometries.clear()
            self._geometries[key] = geo
        return geo

    def __call__(self, frame: Frame, setup: CameraSetup) -> Prepared:
        """Preprocess one frame. Raises ``FrameError`` (corrupt_frame, preprocess_error)."""
        image: Any = frame.image
        check_image(image)
        img = self._to_model_pixels(image, frame.pixel_format)
        img = self._correct(img, setup)
        geo = self.geometry((img.shape[0], img.shape[1]), setup)
        x, y, w, h = geo.roi
        fitted = self._fit(img[y : y + h, x : x + w], geo)
        data = self.pool.take((self._channels, *geo.fitted))
        chw = fitted[np.newaxis] if fitted.ndim == 2 else fitted.transpose(2, 0, 1)
        self.card.normalisation.apply(chw, out=data)
        return Prepared(data, geo, self.pool)

    def _to_model_pixels(self, image: NDArray[Any], pixel_format: str) -> NDArray[Any]:
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not image.flags.c_contiguous:
            image = np.ascontiguousarray(image)
        if image.dtype == np.uint16 and self._eight_bit:
            bits = _BITS.get(pixel_format, 16)
            out8 = self._scratch.get("eight_bit", image.shape, np.uint8)
            cv2.convertScaleAbs(image, dst=out8, alpha=1.0 / (1 << (bits - 8)))
            image = out8
        if image.ndim == 3 and self._channels == 1:
            gray = self._scratch.get("gray", image.shape[:2], image.dtype)
            cv2.cvtColor(image, cv2.COLOR_RGB2GRAY, dst=gray)
            return gray
        if image.ndim == 2 and self._channels == 3:
            rgb = self._scratch.get("rgb", (*image.shape, 3), image.dtype)
            cv2.cvtColor(image, cv2.COLOR_GRAY2RGB, dst=rgb)
            return rgb
        return image

    def _correct(self, img: NDArray[Any], setup: CameraSetup) -> NDArray[Any]:
        for name, correction in (("flatfield", setup.flatfield), ("undistort", setup.undistort)):
            if correction is None:
                continue
            out = self._scratch.get(name, img.shape, img.dtype)
            try:
                img = correction.apply(img, out)
            except Exception as exc:  # corrections raise cv2.error, ValueError, our errors
                raise FrameError(
                    ErrorReason.PREPROCESS,
                    f"{name} failed on a {img.shape[1]}x{img.shape[0]} frame: {exc}",
                ) from exc
        return img

    def _fit(self, roi_img: NDArray[Any], geo: Geometry) -> NDArray[Any]:
        if geo.fit.identity:
            return roi_img
        fh, fw = geo.fitted
        shape = (fh, fw) if roi_img.ndim == 2 else (fh, fw, roi_img.shape[2])
        out = self._scratch.get("fitted", shape, roi_img.dtype)
        return fit_image(roi_img, geo.fit, out=out)
