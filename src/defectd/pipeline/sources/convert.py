"""Camera pixel formats (GenICam PFNC names) to the images a ``Frame`` carries.

Output is ``(H, W)`` for one channel — uint8, or uint16 for Mono10/12/16, which keep their
bits — or ``(H, W, 3)`` uint8 RGB for three. Every conversion writes one new array the caller
owns (the input, often a view on a driver buffer, is only read), in one pass where OpenCV can.

Bayer names follow GenICam: ``BayerRG8`` has R at pixel (0, 0). OpenCV names a pattern by the
2x2 block at (1, 1), so GenICam ``RG`` is OpenCV ``BG`` and so on.
"""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.errors import CameraError

# PFNC name -> (dtype of the raw samples, samples per pixel, significant bits)
_LAYOUT: Final[dict[str, tuple[type[np.generic], int, int]]] = {
    "Mono8": (np.uint8, 1, 8),
    "Mono10": (np.uint16, 1, 10),
    "Mono12": (np.uint16, 1, 12),
    "Mono14": (np.uint16, 1, 14),
    "Mono16": (np.uint16, 1, 16),
    "RGB8": (np.uint8, 3, 8),
    "BGR8": (np.uint8, 3, 8),
    "RGBa8": (np.uint8, 4, 8),
    "BGRa8": (np.uint8, 4, 8),
    "BayerRG8": (np.uint8, 1, 8),
    "BayerGR8": (np.uint8, 1, 8),
    "BayerGB8": (np.uint8, 1, 8),
    "BayerBG8": (np.uint8, 1, 8),
}

SUPPORTED_PIXEL_FORMATS: Final[tuple[str, ...]] = tuple(_LAYOUT)

# (PFNC name, output channels) -> OpenCV conversion code; missing pairs are handled below.
_CV_CODES: Final[dict[tuple[str, int], int]] = {
    ("Mono8", 3): cv2.COLOR_GRAY2RGB,
    ("RGB8", 1): cv2.COLOR_RGB2GRAY,
    ("BGR8", 1): cv2.COLOR_BGR2GRAY,
    ("BGR8", 3): cv2.COLOR_BGR2RGB,
    ("RGBa8", 1): cv2.COLOR_RGBA2GRAY,
    ("RGBa8", 3): cv2.COLOR_RGBA2RGB,
    ("BGRa8", 1): cv2.COLOR_BGRA2GRAY,
    ("BGRa8", 3): cv2.COLOR_BGRA2RGB,
    ("BayerRG8", 1): cv2.COLOR_BayerBG2GRAY,
    ("BayerRG8", 3): cv2.COLOR_BayerBG2RGB,
    ("BayerGR8", 1): cv2.COLOR_BayerGB2GRAY,
    ("BayerGR8", 3): cv2.COLOR_BayerGB2RGB,
    ("BayerGB8", 1): cv2.COLOR_BayerGR2GRAY,
    ("BayerGB8", 3): cv2.COLOR_BayerGR2RGB,
    ("BayerBG8", 1): cv2.COLOR_BayerRG2GRAY,
    ("BayerBG8", 3): cv2.COLOR_BayerRG2RGB,
}


def check_pixel_format(pixel_format: str, camera: str) -> None:
    """Raise ``CameraError`` when ``pixel_format`` is not one the sources convert."""
    if pixel_format not in _LAYOUT:
        raise CameraError(
            f"camera {camera!r}: PixelFormat {pixel_format!r} is not supported; "
            f"use one of {', '.join(SUPPORTED_PIXEL_FORMATS)}"
        )


def to_output(
    samples: NDArray[np.generic], height: int, width: int, pixel_format: str, channels: int
) -> NDArray[np.uint8] | NDArray[np.uint16]:
    """Convert ``samples`` (the flat or shaped raw image) to a new ``Frame`` image.

    ``samples`` holds ``height * width * samples_per_pixel`` values of the format's dtype
    (uint8, or uint16 for Mono10..16). ``channels`` is 1 (gray) or 3 (RGB). Raises
    ``ValueError`` for an unknown format or a buffer of the wrong size.
    """
    try:
        dtype, per_pixel, bits = _LAYOUT[pixel_format]
    except KeyError:
        raise ValueError(f"unsupported pixel format {pixel_format!r}") from None
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if samples.dtype != dtype or samples.size != height * width * per_pixel:
        raise ValueError(
            f"{pixel_format} {width}x{height} needs {height * width * per_pixel} {np.dtype(dtype)} "
            f"samples, buffer has {samples.size} {samples.dtype}"
        )
    shaped = samples.reshape((height, width) if per_pixel == 1 else (height, width, per_pixel))
    if dtype is np.uint16:
        mono16: NDArray[np.uint16] = shaped.astype(np.uint16, copy=False)
        if channels == 1:
            return mono16.copy()
        # Colour models take 8-bit RGB: keep the top 8 significant bits.
        mono8 = (mono16 >> (bits - 8)).astype(np.uint8)
        return np.asarray(cv2.cvtColor(mono8, cv2.COLOR_GRAY2RGB), np.uint8)
    raw8: NDArray[np.uint8] = np.asarray(shaped, np.uint8)  # a view: the dtype matches
    code = _CV_CODES.get((pixel_format, channels))
    if code is None:  # Mono8 -> 1 and RGB8 -> 3 need no conversion, only the copy
        return raw8.copy()
    return np.asarray(cv2.cvtColor(raw8, code), np.uint8)
