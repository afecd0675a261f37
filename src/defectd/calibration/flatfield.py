"""Flat-field correction: a per-pixel gain that evens out vignetting and uneven lighting.

The gain comes from frames of a blank reference (a plain part or a white target under the
station's own light): the frames are averaged, the average is smoothed into an illumination
field so that the reference's own texture and noise do not end up in the gain, and
``gain = mean(field) / field``, clipped. Correction is ``clip(raw * gain)`` in the frame's
own dtype. The gain is saved as a float32 ``.npy`` beside the calibration file.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.calibration.file import FlatFieldSection, atomic_write_bytes
from defectd.errors import CalibrationError, ConfigError
from defectd.log import get_logger

log = get_logger(__name__)

SmoothMethod = Literal["polynomial", "gaussian"]
ProgressFn = Callable[[int, int], None]  # (frames done, frames in total)

_FIT_SIDE = 64  # the polynomial is fitted on the average shrunk to this many pixels (long side)
_CV_DEPTH = {np.dtype(np.uint8): cv2.CV_8U, np.dtype(np.uint16): cv2.CV_16U}


@dataclass(frozen=True, slots=True)
class FlatFieldStats:
    """How the gain was made and what it does to its own reference (see :func:`uniformity`)."""

    frames: int
    reference_mean: float  # mean pixel value of the averaged reference
    gain_min: float
    gain_max: float
    uniformity_before: float
    uniformity_after: float
    method: str
    saturated_fraction: float = 0.0  # of averaged-reference pixels at the dtype's maximum


class FlatField:
    """A gain image ``(H, W)`` or ``(H, W, 3)`` float32 applied to frames of the same shape.

    Safe to share between threads: ``apply`` only reads the gain.
    """

    def __init__(self, gain: NDArray[np.float32], stats: FlatFieldStats | None = None) -> None:
        if gain.dtype != np.float32:
            raise ValueError(f"gain must be float32, got {gain.dtype}")
        if gain.ndim not in (2, 3) or (gain.ndim == 3 and gain.shape[2] != 3):
            raise ValueError(f"gain must be (H, W) or (H, W, 3), got {gain.shape}")
        if not bool(np.isfinite(gain).all()) or float(gain.min()) <= 0.0:
            raise ValueError("gain must be finite and positive everywhere")
        self._gain = np.ascontiguousarray(gain).copy()
        self._gain.flags.writeable = False
        self.stats = stats

    @property
    def gain(self) -> NDArray[np.float32]:
        """The read-only gain image."""
        return self._gain

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) of the frames this gain applies to."""
        return int(self._gain.shape[1]), int(self._gain.shape[0])

    @property
    def channels(self) -> Literal[1, 3]:
        return 1 if self._gain.ndim == 2 else 3

    def apply(self, image: NDArray[Any], out: NDArray[Any] | None = None) -> NDArray[Any]:
        """Correct ``image`` (uint8 or uint16, the gain's shape) into ``out``, rounded, saturated.

        ``out`` must match the image's shape and dtype; when given, it is filled and returned
        and nothing is allocated. Raises ``ValueError`` on a shape or dtype mismatch.
        """
        if image.shape != self._gain.shape:
            raise ValueError(f"frame is {image.shape}, flat-field gain is {self._gain.shape}")
        depth = _CV_DEPTH.get(image.dtype)
        if depth is None:
            raise ValueError(f"flat-field takes uint8 or uint16 frames, got {image.dtype}")
        if out is not None and (out.shape != image.shape or out.dtype != image.dtype):
            raise ValueError(
                f"out is {out.shape} {out.dtype}, expected {image.shape} {image.dtype}"
            )
        result: NDArray[Any] = cv2.multiply(image, self._gain, dst=out, dtype=depth)
        return result

    def save(self, path: Path) -> None:
        """Write the gain as a float32 ``.npy``, atomically."""
        buf = io.BytesIO()
        np.save(buf, self._gain, allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> FlatField:
        """Read a gain ``.npy``; a missing or malformed file is a ``ConfigError`` naming it."""
        try:
            gain = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ConfigError(f"{path}: flat-field gain file not found") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a readable .npy gain image ({exc})") from exc
        try:
            return cls(np.asarray(gain))
        except ValueError as exc:
            raise ConfigError(f"{path}: invalid flat-field gain: {exc}") from exc

    @classmethod
    def from_section(cls, section: FlatFieldSection, calibration_path: Path) -> FlatField:
        """The gain a calibration file's ``flatfield`` section points to, checked against it."""
        path = section.gain_path(calibration_path)
        flat = cls.load(path)
        if flat.image_size != tuple(section.image_size) or flat.channels != section.channels:
            raise ConfigError(
                f"{path}: gain is {flat.image_size[0]}x{flat.image_size[1]}x{flat.channels}, "
                f"flatfield.image_size in {calibration_path} says "
                f"{section.image_size[0]}x{section.image_size[1]}x{section.channels}"
            )
        return flat

    def to_section(
        self, gain_file: str, *, created: str = "", command: str = ""
    ) -> FlatFieldSection:
        """The calibration-file section for this gain saved as ``gain_file`` (relative name)."""
        if self.stats is None:
            raise ValueError("only an estimated flat-field (with stats) makes a section")
        s = self.stats
        return FlatFieldSection(
            gain_file=gain_file,
            image_size=self.image_size,
            channels=self.channels,
            frames=s.frames,
            reference_mean=s.reference_mean,
            gain_min=s.gain_min,
            gain_max=s.gain_max,
            uniformity_before=s.uniformity_before,
            uniformity_after=s.uniformity_after,
            method=s.method,
            created=created,
            command=command,
        )


def estimate_flatfield(
    frames: Sequence[NDArray[Any]],
    *,
    method: SmoothMethod = "polynomial",
    degree: int = 6,
    sigma_frac: float = 0.1,
    max_gain: float = 4.0,
    names: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
) -> FlatField:
    """Estimate a flat-field from frames of a blank reference, all one shape and dtype.

    ``frames`` are ``(H, W)`` or ``(H, W, 3)`` uint8/uint16. Smoothing: ``"polynomial"``
    fits a 2-D polynomial of total ``degree`` per channel (robust to dust: one refit without
    outliers) -- right for vignetting, exact up to the image border; ``"gaussian"`` blurs
    with sigma ``sigma_frac * min(H, W)``, which also follows lighting that is not smooth
    but bends towards flat within ~sigma of the border. Gains are clipped to
    ``[1 / max_gain, max_gain]``. Raises ``CalibrationError`` on no frames or mixed shapes.
    """
    if not frames:
        raise CalibrationError("no reference frames for the flat-field")
    labels = list(names) if names is not None else [f"frame {i}" for i in range(len(frames))]
    first = frames[0]
    if first.dtype not in _CV_DEPTH or first.ndim not in (2, 3):
        raise CalibrationError(
            f"{labels[0]}: flat-field takes (H, W) or (H, W, 3) uint8/uint16 frames, "
            f"got {first.shape} {first.dtype}"
        )
    if degree < 1 or not 0 < sigma_frac < 1 or max_gain <= 1:
        raise ConfigError("flat-field: need degree >= 1, 0 < sigma_frac < 1, max_gain > 1")
    total = np.zeros(first.shape, np.float64)
    for i, (frame, label) in enumerate(zip(frames, labels, strict=True)):
        if frame.shape != first.shape or frame.dtype != first.dtype:
            raise CalibrationError(
                f"{label}: frame is {frame.shape} {frame.dtype}, the first is "
                f"{first.shape} {first.dtype}"
            )
        np.add(total, frame, out=total)
        if progress is not None:
            progress(i + 1, len(frames))
    mean_image = (total / len(frames)).astype(np.float32)
    top = float(np.iinfo(first.dtype).max)
    saturated = float(np.mean(mean_image >= top - 0.5))
    if saturated > 0.001:
        log.warning("flatfield_reference_saturated", fraction=round(saturated, 4))
    if float(mean_image.mean()) <= 0.0:
        raise CalibrationError(f"{labels[0]}: reference frames are black")

    planes = [mean_image] if mean_image.ndim == 2 else list(np.moveaxis(mean_image, 2, 0))
    fields = [
        _fit_polynomial(p, degree) if method == "polynomial" else _blur(p, sigma_frac, degree)
        for p in planes
    ]
    field = fields[0] if len(fields) == 1 else np.stack(fields, axis=2)
    level = field.reshape(-1, len(fields)).mean(axis=0)  # per channel: no colour shift
    with np.errstate(divide="ignore"):
        gain = np.where(field > 0, level / np.maximum(field, 1e-12), max_gain)
    gain = np.clip(gain, 1.0 / max_gain, max_gain).astype(np.float32)

    stats = FlatFieldStats(
        frames=len(frames),
        reference_mean=float(mean_image.mean()),
        gain_min=float(gain.min()),
        gain_max=float(gain.max()),
        uniformity_before=uniformity(mean_image),
        uniformity_after=uniformity(mean_image * gain),
        method=f"polynomial(degree={degree})"
        if method == "polynomial"
        else f"gaussian(sigma_frac={sigma_frac})",
        saturated_fraction=saturated,
    )
    log.info(
        "flatfield_estimated",
        frames=stats.frames,
        uniformity_before=round(stats.uniformity_before, 4),
        uniformity_after=round(stats.uniformity_after, 4),
        gain_min=round(stats.gain_min, 3),
        gain_max=round(stats.gain_max, 3),
    )
    return FlatField(gain, stats)


def uniformity(image: NDArray[Any], sigma_px: float | None = None) -> float:
    """``(max - min) / mean`` of ``image`` blurred by a Gaussian, worst channel.

    The blur (sigma ``sigma_px``, by default 2% of the short side, at least 2 px) keeps
    pixel noise and fine texture out of the measure so that it reports shading; 0 is flat.
    A clean corrected blank reads about 0.01 (its residual texture sets the floor).
    """
    img = np.asarray(image, dtype=np.float32)
    sigma = sigma_px if sigma_px is not None else max(2.0, 0.02 * min(img.shape[:2]))
    blurred = cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    flat = blurred.reshape(blurred.shape[0] * blurred.shape[1], -1)
    spread = (flat.max(axis=0) - flat.min(axis=0)) / np.maximum(flat.mean(axis=0), 1e-12)
    return float(spread.max())


def _blur(plane: NDArray[np.float32], sigma_frac: float, degree: int) -> NDArray[np.float64]:
    """The polynomial field times a Gaussian blur of what it leaves unexplained.

    Blurring the raw average would flatten the falloff near the border (the mirrored
    border is brighter than the true continuation); the residual ratio is nearly flat,
    so blurring it costs nothing at the border and still follows uneven lighting.
    """
    base = _fit_polynomial(plane, degree)
    ratio = (plane / np.maximum(base, 1e-9)).astype(np.float32)
    sigma = sigma_frac * min(plane.shape)
    smooth = cv2.GaussianBlur(ratio, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    out: NDArray[np.float64] = base * smooth
    return out


def _fit_polynomial(plane: NDArray[np.float32], degree: int) -> NDArray[np.float64]:
    """Least-squares 2-D polynomial of total ``degree`` through ``plane``, evaluated on its grid."""
    height, width = plane.shape
    scale = min(1.0, _FIT_SIDE / max(height, width))
    small_w, small_h = max(degree + 2, round(width * scale)), max(degree + 2, round(height * scale))
    small = cv2.resize(plane, (small_w, small_h), interpolation=cv2.INTER_AREA).astype(np.float64)
    # Fitted in log space: shading multiplies, and log(cos^4 falloff) is far closer to a
    # low-degree polynomial than the falloff itself.
    small = np.log(np.maximum(small, 1e-3 * max(float(small.mean()), 1e-9)))
    # Centres of the shrunk pixels in full-resolution pixel coordinates.
    xs = (np.arange(small_w) + 0.5) * (width / small_w) - 0.5
    ys = (np.arange(small_h) + 0.5) * (height / small_h) - 0.5
    terms = [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]  # x^i y^j

    def basis(x: NDArray[np.float64], length: int) -> NDArray[np.float64]:
        # Legendre polynomials on [-1, 1]: nearly orthogonal, so the normal equations stay
        # well conditioned (a small solve instead of an SVD of the whole design matrix).
        u = (2.0 * x - (length - 1)) / max(length - 1, 1)
        return np.asarray(np.polynomial.legendre.legvander(u, degree), dtype=np.float64)

    bx, by = basis(xs, width), basis(ys, height)  # (small_w, d+1), (small_h, d+1)
    design = np.stack([np.outer(by[:, j], bx[:, i]).ravel() for i, j in terms], axis=1)
    target = small.ravel()
    keep = np.ones(target.shape, bool)
    for _ in range(2):  # the second pass drops outliers (dust, a stray mark on the reference)
        a = design[keep]
        coef = np.linalg.solve(a.T @ a, a.T @ target[keep])
        residual = target - design @ coef
        mad = float(np.median(np.abs(residual - np.median(residual))))
        mad = max(mad, 1e-6 * float(np.abs(target).mean()))
        inliers = np.abs(residual) <= 5.0 * 1.4826 * mad
        if inliers.sum() < 2 * len(terms):
            break
        keep = inliers
    c = np.zeros((degree + 1, degree + 1))
    for (i, j), value in zip(terms, coef, strict=True):
        c[j, i] = value
    full: NDArray[np.float64] = (
        basis(np.arange(height, dtype=np.float64), height)
        @ c
        @ basis(np.arange(width, dtype=np.float64), width).T
    )
    return np.exp(full)
