"""What drift monitoring measures on every part, and the statistics behind its alarm threshold.

Shared by training (which stores a reference profile of the training images in the model card)
and the daemon (which watches every camera against it): no torch, no daemon.

Per part the station measures six statistics (``STATISTICS``):

- ``brightness``, ``contrast``, ``sharpness``: mean grey level, standard deviation of grey
  levels and standard deviation of the Laplacian (a focus / texture measure), all on a grid of
  at most ``GRID`` pixels per side taken from the frame by striding (``image_statistics``);
- ``score``: the part's highest defect probability (what the model says before thresholding);
- ``reject`` and ``error``: 1 for a fail (error) verdict, else 0 (their means are the rates).

Each statistic is watched by a two-sided EWMA chart of its standardised value
``z = (x - mean) / std`` (reference mean and std): ``E_t = (1 - lam) E_{t-1} + lam z_t``, alarm
when ``|E_t| >= h``. ``ewma_limit`` chooses ``h`` for a target false-alarm rate per part with
the Markov-chain method of Brook and Evans (1972), run on the statistic's own reference
distribution (not a normal one: the score is bimodal and the rates are Bernoulli), and averaged
over the uncertainty of a reference mean estimated from ``n`` parts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import cv2
import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from defectd.data.datasets import Dataset

STATISTICS: tuple[str, ...] = ("brightness", "contrast", "sharpness", "score", "reject", "error")
IMAGE_STATISTICS: tuple[str, ...] = ("brightness", "contrast", "sharpness")
RATE_STATISTICS: frozenset[str] = frozenset({"reject", "error"})
GRID = 128  # longest side of the sampled grid the image statistics are computed on
SUMMARY_POINTS = 64  # quantiles kept per statistic in a reference profile


class StatReference(BaseModel):
    """One statistic's reference: mean, standard deviation and ``SUMMARY_POINTS`` quantiles
    at probabilities ``(i + 0.5) / SUMMARY_POINTS`` (an equal-weight summary of its
    distribution), over ``n`` parts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: Annotated[int, Field(ge=1)]
    mean: float
    std: Annotated[float, Field(ge=0.0)]
    quantiles: tuple[float, ...] = ()


class DriftReference(BaseModel):
    """A reference profile: what the model saw (and said) when it was known to be right.

    Stored in the model card as ``drift`` by ``defectd train`` (image statistics of the training
    images) and learned by the station over its first parts otherwise.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    grid: int = GRID
    source: str = ""  # e.g. "train split of runs/synth256 (700 images)"
    statistics: dict[str, StatReference] = Field(default_factory=dict)


def image_statistics(image: NDArray[Any]) -> tuple[float, float, float]:
    """``(brightness, contrast, sharpness)`` of an ``(H, W)`` or ``(H, W, C)`` image.

    Computed on every ``s``-th pixel, ``s = ceil(max(H, W) / GRID)`` (so at most
    ``GRID x GRID`` pixels: a few tens of microseconds for any frame size); colour frames
    use the mean of their channels. Units are the image's own grey levels.
    """
    h, w = image.shape[:2]
    step = max(1, -(-max(h, w) // GRID))
    grid = image[::step, ::step]
    if grid.ndim == 3:
        grid = grid.mean(axis=2, dtype=np.float32)
    elif grid.dtype == np.uint8:
        grid = np.ascontiguousarray(grid)  # 8-bit stays 8-bit: OpenCV's fastest path
    else:
        grid = grid.astype(np.float32)
    mean, std = cv2.meanStdDev(grid)
    depth = cv2.CV_16S if grid.dtype == np.uint8 else cv2.CV_32F
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grid, depth, ksize=1))
    return float(mean[0, 0]), float(std[0, 0]), float(lap_std[0, 0])


def stat_reference(values: Sequence[float] | NDArray[Any]) -> StatReference:
    """The reference of one statistic from its values over the reference parts."""
    arr = np.asarray(values, np.float64)
    if arr.size == 0:
        raise ValueError("a reference needs at least one value")
    probs = (np.arange(SUMMARY_POINTS) + 0.5) / SUMMARY_POINTS
    return StatReference(
        n=int(arr.size),
        mean=float(arr.mean()),
        std=float(arr.std()),
        quantiles=tuple(round(float(q), 6) for q in np.quantile(arr, probs)),
    )


def drift_reference(
    values: Mapping[str, Sequence[float] | NDArray[Any]], source: str = ""
) -> DriftReference:
    """A profile from the values of each statistic (names from ``STATISTICS``)."""
    unknown = sorted(set(values) - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown drift statistics: {', '.join(unknown)}")
    return DriftReference(
        source=source, statistics={k: stat_reference(v) for k, v in values.items() if len(v)}
    )


# ----------------------------------------------------------------------------- the chart


class Chart:
    """A calibrated two-sided EWMA chart of one statistic: ``update(x)`` per part.

    ``level`` is ``|E| / h`` (1.0 = at the alarm limit); ``smoothed`` is the EWMA in the
    statistic's own units. Not thread-safe: its owner serialises updates.
    """

    __slots__ = ("e", "h", "inv_std", "lam", "mean", "std")

    def __init__(self, mean: float, std: float, lam: float, h: float) -> None:
        self.mean = mean
        self.std = std
        self.inv_std = 1.0 / std
        self.lam = lam
        self.h = h
        self.e = 0.0

    def update(self, x: float) -> float:
        """Add one part's value; returns the new level ``|E| / h``."""
        self.e += self.lam * ((x - self.mean) * self.inv_std - self.e)
        return abs(self.e) / self.h

    @property
    def level(self) -> float:
        return abs(self.e) / self.h

    @property
    def smoothed(self) -> float:
        """The EWMA of the statistic in its own units."""
        return self.mean + self.e * self.std


def null_distribution(
    name: str, ref: StatReference
) -> tuple[float, float, NDArray[np.float64], NDArray[np.float64]]:
    """``(mean, std, z values, weights)``: the standardised per-part distribution of statistic
    ``name`` under its reference, as the chart calibration and the chart use it.

    A rate (``reject``, ``error``) is Bernoulli with ``p = (k + 0.5) / (n + 1)``, so a rate
    that was 0 in the reference (no errors) is still a small positive rate with a finite
    standard deviation. A continuous statistic uses its stored quantiles; its std is floored
    at 1e-3 of its mean (a perfectly constant reference would make any change infinite).
    """
    if name in RATE_STATISTICS:
        p = (ref.mean * ref.n + 0.5) / (ref.n + 1)
        std = math.sqrt(p * (1.0 - p))
        z = np.array([(0.0 - p) / std, (1.0 - p) / std])
        return p, std, z, np.array([1.0 - p, p])
    std = max(ref.std, 1e-3 * max(abs(ref.mean), 1.0))
    q = np.asarray(ref.quantiles or (ref.mean,), np.float64)
    z = (q - ref.mean) / std
    return ref.mean, std, z, np.full(z.size, 1.0 / z.size)


_HERMITE = np.polynomial.hermite_e.hermegauss(7)  # nodes/weights for a standard normal


def _arl(z: NDArray[np.float64], w: NDArray[np.float64], lam: float, h: float, m: int) -> float:
    """Average run length from E = 0 of the two-sided EWMA chart with limit ``h`` for
    per-part standardised values ``z`` with probabilities ``w`` (Markov chain, ``m`` states)."""
    width = 2.0 * h / m
    centres = -h + width * (np.arange(m) + 0.5)
    nxt = (1.0 - lam) * centres[:, None] + lam * z[None, :]
    j = np.floor((nxt + h) / width).astype(np.int64)
    inside = (j >= 0) & (j < m)
    flat = (np.arange(m)[:, None] * m + j)[inside]
    weights = np.broadcast_to(w[None, :], j.shape)[inside]
    q = np.bincount(flat, weights=weights, minlength=m * m).reshape(m, m)
    try:
        arl = np.linalg.solve(np.eye(m) - q, np.ones(m))
    except np.linalg.LinAlgError:
        return math.inf
    return float(arl[m // 2])


def alarm_rate(
    z: NDArray[np.float64],
    w: NDArray[np.float64],
    lam: float,
    h: float,
    n_reference: int,
    *,
    states: int = 81,
) -> float:
    """Expected false alarms per part of the chart (1 / ARL), averaged over the error of a
    reference mean estimated from ``n_reference`` parts (a normal shift of ``1/sqrt(n)`` in
    standardised units, 7-point Gauss-Hermite)."""
    nodes, weights = _HERMITE
    sd = 1.0 / math.sqrt(max(n_reference, 1))
    total = 0.0
    for node, weight in zip(nodes, weights, strict=True):
        total += weight / _arl(z + node * sd, w, lam, h, states)
    return total / float(weights.sum())


def ewma_limit(
    z: NDArray[np.float64],
    w: NDArray[np.float64],
    lam: float,
    target_rate: float,
    n_reference: int,
) -> float:
    """The smallest limit ``h`` (standardised units) whose expected false-alarm rate per part
    is at most ``target_rate``; see ``alarm_rate``. Bisection on ``log h``."""
    sigma_e = math.sqrt(lam / (2.0 - lam))
    lo, hi = 0.5 * sigma_e, 2.0 * sigma_e
    while alarm_rate(z, w, lam, hi, n_reference) > target_rate:
        lo, hi = hi, hi * 2.0
        if hi > 1e3:
            return hi
    for _ in range(18):
        mid = math.sqrt(lo * hi)
        if alarm_rate(z, w, lam, mid, n_reference) > target_rate:
            lo = mid
        else:
            hi = mid
    return hi


def dataset_reference(dataset: Dataset, split: str, channels: int) -> DriftReference:
    """The image statistics of every image of ``split`` as a profile (what ``defectd train``
    stores in the card): the station compares its frames with what the model was trained on.

    ``DataError`` naming the file for an unreadable image; ``ValueError`` for an empty split.
    """
    values: dict[str, list[float]] = {k: [] for k in IMAGE_STATISTICS}
    samples = dataset.samples(split)
    for sample in samples:
        for key, value in zip(
            IMAGE_STATISTICS,
            image_statistics(dataset.load_image(sample, channels)),
            strict=True,
        ):
            values[key].append(value)
    if not samples:
        raise ValueError(f"split {split!r} has no images")
    return drift_reference(
        values, source=f"{split} split of {dataset.root} ({len(samples)} images)"
    )
