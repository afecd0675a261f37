"""Training augmentation: geometric ops move image and mask together, photometric ops the image.

``Augment(config)(image, mask, rng)`` takes an ``(H, W)`` or ``(H, W, 3)`` uint8 image and an
``(H, W)`` uint8 {0, 1} mask and returns new arrays of the same shapes and dtypes; the inputs
are never modified. Geometric ops: flips, quarter turns (square images only; 180 degrees
otherwise), one affine warp for a small rotation and a zoom with crop (reflected borders; mask
nearest-neighbour, so it stays binary and on the same content). Photometric ops (image only):
brightness, contrast and gamma folded into one lookup table, Gaussian noise, Gaussian blur.
All randomness comes from the ``rng`` handed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.errors import ConfigError

# The probability of each op, by the kind of op.
_GEOMETRIC_PROBS = ("hflip", "vflip", "rot90", "rotate_p", "scale_p")
_PHOTOMETRIC_PROBS = ("brightness_p", "contrast_p", "gamma_p", "noise_p", "blur_p")
_PROBS = _GEOMETRIC_PROBS + _PHOTOMETRIC_PROBS


def _disabled(probs: tuple[str, ...]) -> dict[str, Any]:
    """``dataclasses.replace`` arguments that turn the ops of ``probs`` off."""
    return dict.fromkeys(probs, 0.0)


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (``*_p``, ``hflip``, ``vflip``, ``rot90``) and ranges of each op.

    ``rotate_deg``: rotation drawn from [-deg, +deg]; ``scale``: zoom factor range (> 1 zooms
    in and crops, < 1 zooms out with reflected borders); ``brightness``: shift as a fraction of
    255 in [-b, +b]; ``contrast``: gain in [1 - c, 1 + c] around the image mean; ``gamma``:
    exponent range; ``noise_std``: Gaussian noise sigma range in grey levels; ``blur_sigma``:
    Gaussian blur sigma range in pixels.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5
    rotate_p: float = 0.3
    rotate_deg: float = 10.0
    scale_p: float = 0.3
    scale: tuple[float, float] = (0.85, 1.2)
    brightness_p: float = 0.5
    brightness: float = 0.1
    contrast_p: float = 0.5
    contrast: float = 0.2
    gamma_p: float = 0.3
    gamma: tuple[float, float] = (0.8, 1.25)
    noise_p: float = 0.3
    noise_std: tuple[float, float] = (1.0, 6.0)
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self) -> None:
        for name in _PROBS:
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"augment.{name}: a probability within [0, 1], got {p}")
        for name in ("scale", "gamma", "noise_std", "blur_sigma"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi:
                raise ConfigError(f"augment.{name}: expected 0 <= low <= high, got ({lo}, {hi})")
        if self.scale[0] <= 0 or self.gamma[0] <= 0:
            raise ConfigError("augment.scale and augment.gamma: lower bounds must be positive")
        for name in ("rotate_deg", "brightness", "contrast"):
            if getattr(self, name) < 0:
                raise ConfigError(f"augment.{name}: must not be negative")
        if self.contrast >= 1.0:
            raise ConfigError(f"augment.contrast: must be below 1, got {self.contrast}")

    @classmethod
    def off(cls) -> AugmentConfig:
        """Every op disabled (evaluation, or a base for ``dataclasses.replace``)."""
        return replace(cls(), **_disabled(_PROBS))

    def geometric_only(self) -> AugmentConfig:
        """This config with the photometric ops disabled."""
        return replace(self, **_disabled(_PHOTOMETRIC_PROBS))

    def as_dict(self) -> dict[str, object]:
        """Plain values, for logs and the model card."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Augment:
    """Random augmentation of an image and its mask; see the module docstring."""

    def __init__(self, config: AugmentConfig | None = None) -> None:
        self.config = config if config is not None else AugmentConfig()

    def __call__(
        self, image: NDArray[np.uint8], mask: NDArray[np.uint8], rng: np.random.Generator
    ) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
        """Augmented copies: image ``(H, W)``/``(H, W, 3)`` uint8, mask ``(H, W)`` uint8 {0, 1}."""
        if image.dtype != np.uint8 or mask.dtype != np.uint8:
            raise ValueError(f"expected uint8 image and mask, got {image.dtype} and {mask.dtype}")
        if image.shape[:2] != mask.shape or mask.ndim != 2:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
        img, msk = self.geometric(image, mask, rng)
        return self.photometric(img, rng), msk

    def geometric(
        self, image: NDArray[np.uint8], mask: NDArray[np.uint8], rng: np.random.Generator
    ) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
        """Flips, quarter turns and one affine warp, applied identically to image and mask."""
        c = self.config
        img, msk = image, mask
        if rng.random() < c.hflip:
            img, msk = img[:, ::-1], msk[:, ::-1]
        if rng.random() < c.vflip:
            img, msk = img[::-1], msk[::-1]
        if rng.random() < c.rot90:
            square = img.shape[0] == img.shape[1]
            k = int(rng.integers(1, 4)) if square else 2
            img, msk = np.rot90(img, k), np.rot90(msk, k)
        angle = rng.uniform(-c.rotate_deg, c.rotate_deg) if rng.random() < c.rotate_p else 0.0
        zoom = rng.uniform(c.scale[0], c.scale[1]) if rng.random() < c.scale_p else 1.0
        h, w = img.shape[:2]
        if angle != 0.0 or zoom != 1.0:
            # A zoomed-in crop may sit anywhere the zoom leaves room for; centred otherwise.
            room_x = max(0.0, (w * zoom - w) / (2 * zoom))
            room_y = max(0.0, (h * zoom - h) / (2 * zoom))
            cx = (w - 1) / 2 + rng.uniform(-room_x, room_x)
            cy = (h - 1) / 2 + rng.uniform(-room_y, room_y)
            m = cv2.getRotationMatrix2D((cx, cy), angle, zoom)
            m[:, 2] += ((w - 1) / 2 - cx, (h - 1) / 2 - cy)
            img = _warp(img, m, (w, h), cv2.INTER_LINEAR)
            msk = _warp(msk, m, (w, h), cv2.INTER_NEAREST)
        # Never hand back (a view of) the caller's arrays.
        img = img.copy() if np.may_share_memory(img, image) else np.ascontiguousarray(img)
        msk = msk.copy() if np.may_share_memory(msk, mask) else np.ascontiguousarray(msk)
        return img, msk

    def photometric(self, image: NDArray[np.uint8], rng: np.random.Generator) -> NDArray[np.uint8]:
        """Brightness, contrast, gamma (one lookup table), noise and blur; never the mask.

        May return ``image`` itself when no op fires (``__call__`` hands in its own copy).
        """
        c = self.config
        shift = (
            rng.uniform(-c.brightness, c.brightness) * 255 if rng.random() < c.brightness_p else 0.0
        )
        gain = rng.uniform(1 - c.contrast, 1 + c.contrast) if rng.random() < c.contrast_p else 1.0
        gamma = (
            math.exp(rng.uniform(math.log(c.gamma[0]), math.log(c.gamma[1])))
            if rng.random() < c.gamma_p
            else 1.0
        )
        sigma = rng.uniform(*c.noise_std) if rng.random() < c.noise_p else 0.0
        blur = rng.uniform(*c.blur_sigma) if rng.random() < c.blur_p else 0.0
        img = image
        if shift != 0.0 or gain != 1.0 or gamma != 1.0:
            mean = float(np.mean(cv2.mean(img)[: 1 if img.ndim == 2 else 3]))
            levels = np.arange(256, dtype=np.float32)
            levels = (levels - mean) * gain + mean + shift
            levels = 255.0 * (np.clip(levels, 0.0, 255.0) / 255.0) ** gamma
            lut = np.clip(levels + 0.5, 0, 255).astype(np.uint8)
            img = np.asarray(cv2.LUT(img, lut), np.uint8)
        if sigma > 0.0:
            noise = rng.standard_normal(img.shape, dtype=np.float32)
            noise *= np.float32(sigma)
            noise += img
            img = np.clip(noise, 0, 255, out=noise).astype(np.uint8)
        if blur > 0.0:
            img = np.asarray(cv2.GaussianBlur(img, (0, 0), blur), np.uint8)
        return img


def _warp(
    a: NDArray[np.uint8], m: NDArray[Any], size: tuple[int, int], interpolation: int
) -> NDArray[np.uint8]:
    """``a`` through the 2x3 affine ``m`` into ``size`` (width, height), edges reflected."""
    warped = cv2.warpAffine(
        np.ascontiguousarray(a), m, size, flags=interpolation, borderMode=cv2.BORDER_REFLECT_101
    )
    return np.asarray(warped, np.uint8)
