"""Seeded synthetic parts: textured surfaces with drawn defects and exact pixel masks.

A :class:`PartRenderer` renders a small bank of textures per surface once (from a fixed bank
seed, so a renderer is a pure function of its settings) and then makes each part from a random
crop / flip of a bank texture, an illumination gradient, sensor noise and zero or more drawn
defects. Everything random about a part comes from the ``rng`` handed in, so a part is a pure
function of the generator's state: the same seed gives the same part on every machine.

Surfaces: ``brushed`` (metal with streaks along one axis), ``cast`` (sand-blasted grain),
``woven`` (plain-weave fabric), ``tiled`` (tiles with grout lines).
Defects: ``scratch`` (thin, long, slightly curved line), ``crack`` (branching jagged polyline),
``pit`` (small dark round spot), ``stain`` (soft low-contrast blob), ``chip`` (missing chunk at
an edge or corner). The mask marks exactly the pixels a defect changed.

:func:`write_dataset` writes the manifest layout that :func:`defectd.data.datasets.open_dataset`
reads (``images/``, ``masks/``, ``manifest.csv``), like the shipped magnetic-tile set; with
``class_masks`` also NEU-Seg's class labels (``masks_cls/``, ``classes.txt``), so a multi-class
model (one channel per defect kind) trains on it with ``defectd train --classes auto``.

Over 600 lines because each surface and each defect kind is a short drawing routine that reads
best next to the others it must look consistent with; the renderer, the dataset writer and the
CLI's line source all build on them.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from defectd.data.datasets import (
    CLASS_INDEX_DIR,
    CLASSES_FILE,
    LABELLED_COLUMNS,
    MANIFEST_COLUMNS,
    index_cls,
    write_classes,
)
from defectd.errors import ConfigError, DataError
from defectd.log import get_logger

log = get_logger(__name__)

SURFACES: tuple[str, ...] = ("brushed", "cast", "woven", "tiled")
DEFECTS: tuple[str, ...] = ("scratch", "crack", "pit", "stain", "chip")
GOOD_CLASS = "free"  # ``cls`` of a part without defects, as in the magnetic-tile manifest
SPLITS = ("train", "val", "test")
DATASET_BANK_SIZE = 16  # textures per surface behind ``write_dataset``
LINE_BANK_SIZE = 4  # textures per surface of a camera line's renderer (the demo line's)
_WRITERS = 2  # PNG-writing threads of ``write_dataset``
SYNTH_MARKER = "synth.json"  # settings of a synthetic set; marks a folder it may rewrite

# Base colour of each surface in colour mode (multiplies the grey texture, RGB).
_TINTS: dict[str, tuple[float, float, float]] = {
    "brushed": (0.97, 1.0, 1.04),
    "cast": (1.02, 0.98, 0.9),
    "woven": (0.82, 0.92, 1.1),
    "tiled": (1.12, 0.86, 0.68),
}

Gray = NDArray[np.float32]


@dataclass(frozen=True)
class SynthPart:
    """One rendered part.

    ``image`` is ``(H, W)`` uint8 (grey) or ``(H, W, 3)`` uint8 RGB; ``mask`` is ``(H, W)``
    uint8 with 1 on every pixel a defect changed and 0 elsewhere; ``defects`` lists the kinds
    drawn in drawing order (empty for a good part); ``surface`` names the texture.
    ``labels`` is the class-index mask of the same pixels: ``DEFECTS.index(kind) + 1`` of the
    first defect that changed each one, 0 elsewhere (a multi-class model's truth).
    """

    image: NDArray[np.uint8]
    mask: NDArray[np.uint8]
    defects: tuple[str, ...]
    surface: str
    labels: NDArray[np.uint8] | None = None

    @property
    def cls(self) -> str:
        """The manifest class: the first defect kind drawn, or ``free`` for a good part."""
        return self.defects[0] if self.defects else GOOD_CLASS


# ----------------------------------------------------------------------------------- textures


def _norm(x: NDArray[Any]) -> Gray:
    """Zero mean, unit standard deviation as float32 (a flat field stays zero)."""
    a = np.asarray(x, dtype=np.float32)
    a = a - np.float32(a.mean())
    std = float(a.std())
    return a / np.float32(std) if std > 1e-6 else a


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> Gray:
    """Gaussian noise low-passed with ``sigma`` px, normalised to unit std; ``(h, w)`` float32."""
    if sigma >= 6.0:
        # Large sigmas: blur a coarse grid and upsample (same look, a fraction of the cost).
        step = sigma / 3.0
        gh, gw = max(2, math.ceil(h / step) + 2), max(2, math.ceil(w / step) + 2)
        coarse = cv2.GaussianBlur(rng.standard_normal((gh, gw), dtype=np.float32), (0, 0), 1.0)
        big = cv2.resize(coarse, (int(gw * step), int(gh * step)), interpolation=cv2.INTER_CUBIC)
        return _norm(big[:h, :w].copy())
    n = rng.standard_normal((h, w), dtype=np.float32)
    return _norm(cv2.GaussianBlur(n, (0, 0), sigma) if sigma > 0 else n)


def _brushed(rng: np.random.Generator, h: int, w: int) -> Gray:
    """Brushed metal: fine streaks along x, a few deeper grooves, broad sheen bands."""
    n = rng.standard_normal((h, w), dtype=np.float32)
    long_k = max(9, w // 6) | 1
    streaks = _norm(cv2.blur(cv2.blur(n, (long_k, 1)), (long_k, 1)))
    fine = _norm(cv2.blur(rng.standard_normal((h, w), dtype=np.float32), (max(5, w // 30), 1)))
    grooves_rows = (rng.random((h, 1)) < 0.04).astype(np.float32) * rng.normal(
        0.0, 1.0, (h, 1)
    ).astype(np.float32)
    grooves = grooves_rows * (0.6 + 0.4 * np.abs(streaks))
    bands = _smooth_noise(rng, h, 1, max(2.0, h / 12))  # brightness varies from row to row
    base = 150.0 + rng.uniform(-15, 15)
    return np.asarray(base + 9.0 * streaks + 4.0 * fine + 14.0 * grooves + 8.0 * bands, np.float32)


def _cast(rng: np.random.Generator, h: int, w: int) -> Gray:
    """Cast / sand-blasted: isotropic grain at two scales plus soft mottling."""
    fine = _smooth_noise(rng, h, w, 0.7)
    grain = _smooth_noise(rng, h, w, 1.8)
    mottle = _smooth_noise(rng, h, w, max(8.0, min(h, w) / 10))
    specks = (rng.random((h, w)) < 0.003).astype(np.float32) * 25.0
    base = 125.0 + rng.uniform(-20, 20)
    return np.asarray(base + 9.0 * fine + 8.0 * grain + 9.0 * mottle + specks, np.float32)


def _woven(rng: np.random.Generator, h: int, w: int) -> Gray:
    """Plain-weave fabric: threads alternate over and under, each shaded as a cylinder."""
    period = float(rng.uniform(9.0, 16.0))
    warp_amp = period * 0.12
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx = _smooth_noise(rng, h, w, max(10.0, period * 2)) * np.float32(warp_amp)
    dy = _smooth_noise(rng, h, w, max(10.0, period * 2)) * np.float32(warp_amp)
    u = (xx + dx) / np.float32(period)
    v = (yy + dy) / np.float32(period)
    fu, fv = u - np.floor(u), v - np.floor(v)
    over = ((np.floor(u) + np.floor(v)) % 2).astype(bool)  # which thread lies on top
    # Cylinder shading across a thread, dark gaps between threads.
    across = np.where(over, fu, fv)
    along = np.where(over, fv, fu)
    shade = np.clip(np.sin(np.pi * across), 0.0, 1.0) ** 0.6
    dip = 0.75 + 0.25 * np.sin(np.pi * along)  # a thread dives under its neighbour at the ends
    fib_x = cv2.blur(rng.standard_normal((h, w), dtype=np.float32), (1, 7))
    fib_y = cv2.blur(rng.standard_normal((h, w), dtype=np.float32), (7, 1))
    fibres = _norm(np.where(over, fib_x, fib_y).astype(np.float32))
    base = 60.0 + rng.uniform(-10, 10)
    return np.asarray(base + 120.0 * shade * dip + 6.0 * fibres, np.float32)


def _tiled(rng: np.random.Generator, h: int, w: int) -> Gray:
    """Glazed tiles on a grid (straight or running bond) separated by grout lines."""
    side = min(h, w)
    tile = int(rng.uniform(max(20, side // 7), max(28, side // 3.5)))
    grout = max(2, tile // 14)
    stagger = rng.random() < 0.5
    yy, xx = np.mgrid[0:h, 0:w]
    oy, ox = int(rng.integers(0, tile)), int(rng.integers(0, tile))
    row = (yy + oy) // tile
    shift = np.where(row % 2 == 1, tile // 2, 0) if stagger else 0
    xs = xx + ox + shift
    col = xs // tile
    ym, xm = (yy + oy) % tile, xs % tile
    levels = rng.normal(0.0, 9.0, (64, 64)).astype(np.float32)
    tone = levels[row % 64, col % 64]
    in_grout = (ym < grout) | (xm < grout)
    # Bevel: the glaze is lighter on one edge of each tile and darker on the other.
    edge = np.minimum(np.minimum(ym - grout, tile - 1 - ym), np.minimum(xm - grout, tile - 1 - xm))
    bevel = np.where(edge < 3, np.where((ym - grout) < (tile - 1 - ym), 6.0, -6.0), 0.0)
    glaze = 4.0 * _smooth_noise(rng, h, w, 0.8) + 5.0 * _smooth_noise(rng, h, w, tile / 4)
    base = 165.0 + rng.uniform(-20, 20)
    grout_level = float(rng.choice([70.0, 205.0])) + 6.0 * _smooth_noise(rng, h, w, 1.0)
    return np.asarray(np.where(in_grout, grout_level, base + tone + bevel + glaze), np.float32)


_TEXTURES: dict[str, Callable[[np.random.Generator, int, int], Gray]] = {
    "brushed": _brushed,
    "cast": _cast,
    "woven": _woven,
    "tiled": _tiled,
}


def render_texture(rng: np.random.Generator, height: int, width: int, surface: str) -> Gray:
    """One fresh ``(height, width)`` float32 texture (grey levels around 60..200), no defects.

    What the bank is made of; rendering one costs 10-100x a banked part (see bench/).
    """
    if surface not in _TEXTURES:
        raise ConfigError(f"surface: unknown {surface!r}; choose from {', '.join(SURFACES)}")
    return _TEXTURES[surface](rng, height, width)


# ------------------------------------------------------------------------------------ defects


@dataclass
class _Canvas:
    """What defect painters draw into: the grey image and the mask, full size, in place."""

    img: Gray  # (H, W) float32 grey levels
    mask: NDArray[np.uint8]  # (H, W) {0, 1}
    faint: float = 0.0  # chance that a defect's contrast comes from its range's lowest third

    @property
    def h(self) -> int:
        return int(self.img.shape[0])

    @property
    def w(self) -> int:
        return int(self.img.shape[1])


def _roi_of(points: NDArray[np.float64], pad: int, h: int, w: int) -> tuple[int, int, int, int]:
    """Clipped bounding box ``(y0, y1, x0, x1)`` of ``points`` (x, y) grown by ``pad``."""
    x0 = max(0, int(np.floor(points[:, 0].min())) - pad)
    x1 = min(w, int(np.ceil(points[:, 0].max())) + pad + 1)
    y0 = max(0, int(np.floor(points[:, 1].min())) - pad)
    y1 = min(h, int(np.ceil(points[:, 1].max())) + pad + 1)
    return y0, y1, x0, x1


def _apply(
    c: _Canvas,
    roi: tuple[int, int, int, int],
    local: NDArray[np.uint8],
    delta: NDArray[np.float32],
) -> int:
    """Add ``delta`` (ROI-sized) to the image where ``local`` is set; mark those mask pixels.

    Returns the number of pixels marked.
    """
    y0, y1, x0, x1 = roi
    sel = local > 0
    marked = int(np.count_nonzero(sel))
    if marked:
        region = c.img[y0:y1, x0:x1]
        region[sel] += delta[sel]
        c.mask[y0:y1, x0:x1] |= sel.astype(np.uint8)
    return marked


def _contrast(rng: np.random.Generator, c: _Canvas, low: float, high: float) -> float:
    """A defect's contrast, uniform on ``[low, high]``; with chance ``c.faint`` squeezed into
    the lowest third of that range. At ``faint`` 0 it draws exactly what a plain uniform draw
    would (one value), so parts rendered without it are unchanged."""
    value = float(rng.uniform(low, high))
    if c.faint > 0.0 and rng.random() < c.faint:
        value = low + (value - low) / 3.0
    return value


def _size_scale(c: _Canvas) -> float:
    """Defect sizes are tuned at 256 px; thicker lines and bigger spots on larger parts."""
    return max(0.5, min(c.h, c.w) / 256.0)


def _scratch(rng: np.random.Generator, c: _Canvas) -> int:
    side = min(c.h, c.w)
    length = rng.uniform(0.25, 0.7) * side
    theta = rng.uniform(0, np.pi)
    centre = np.array([rng.uniform(0, c.w - 1), rng.uniform(0, c.h - 1)])
    d = np.array([np.cos(theta), np.sin(theta)])
    n = np.array([-d[1], d[0]])
    p0, p2 = centre - d * length / 2, centre + d * length / 2
    p1 = centre + n * rng.uniform(-0.15, 0.15) * length
    t = np.linspace(0.0, 1.0, 32)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    pts += centre - pts[len(pts) // 2]  # the curve passes through its (in-image) centre
    thick = max(1, round(_size_scale(c) * (1 if rng.random() < 0.7 else 2)))
    roi = _roi_of(pts, thick + 1, c.h, c.w)
    y0, y1, x0, x1 = roi
    if y1 <= y0 or x1 <= x0:
        return 0
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    shifted = np.round(pts - [x0, y0]).astype(np.int32)
    cv2.polylines(local, [shifted], False, 1, thickness=thick, lineType=cv2.LINE_8)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    contrast = _contrast(rng, c, 15.0, 65.0)
    wobble = rng.uniform(0.7, 1.0, local.shape).astype(np.float32)
    return _apply(c, roi, local, (sign * contrast * wobble).astype(np.float32))


def _crack(rng: np.random.Generator, c: _Canvas) -> int:
    side = min(c.h, c.w)
    scale = _size_scale(c)
    step = rng.uniform(3.0, 6.0) * scale
    theta = rng.uniform(0, 2 * np.pi)
    start = np.array([rng.uniform(0, c.w - 1), rng.uniform(0, c.h - 1)])

    def walk(p: NDArray[np.float64], heading: float, length: float) -> NDArray[np.float64]:
        pts = [p]
        ang = heading
        for _ in range(max(2, int(length / step))):
            ang += rng.normal(0.0, 0.45) + 0.3 * (heading - ang)
            pts.append(
                pts[-1] + step * rng.uniform(0.6, 1.4) * np.array([np.cos(ang), np.sin(ang)])
            )
        return np.array(pts)

    main = walk(start, theta, rng.uniform(0.15, 0.45) * side)
    branches = [main]
    for _ in range(int(rng.integers(1, 4))):
        at = main[int(rng.integers(1, len(main)))]
        heading = theta + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
        branches.append(walk(at, heading, rng.uniform(0.25, 0.6) * len(main) * step))
    allpts = np.concatenate(branches)
    thick_main = max(1, round(scale * rng.uniform(1.0, 2.6)))
    roi = _roi_of(allpts, thick_main + 1, c.h, c.w)
    y0, y1, x0, x1 = roi
    if y1 <= y0 or x1 <= x0:
        return 0
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for i, br in enumerate(branches):
        shifted = np.round(br - [x0, y0]).astype(np.int32)
        thick = thick_main if i == 0 else max(1, thick_main - 1)
        cv2.polylines(local, [shifted], False, 1, thickness=thick, lineType=cv2.LINE_8)
    contrast = _contrast(rng, c, 25.0, 90.0)
    wobble = rng.uniform(0.75, 1.0, local.shape).astype(np.float32)
    return _apply(c, roi, local, (-contrast * wobble).astype(np.float32))


def _pit(rng: np.random.Generator, c: _Canvas) -> int:
    r = rng.uniform(1.5, 4.5) * math.sqrt(_size_scale(c))
    cx, cy = rng.uniform(0, c.w - 1), rng.uniform(0, c.h - 1)
    pts = np.array([[cx - r, cy - r], [cx + r, cy + r]])
    roi = _roi_of(pts, 2, c.h, c.w)
    y0, y1, x0, x1 = roi
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.circle(local, (round(cx) - x0, round(cy) - y0), max(1, round(r)), 1, thickness=-1)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / np.float32(max(r, 1.0))
    profile = np.clip(1.0 - 0.5 * dist, 0.4, 1.0)  # darkest in the middle
    contrast = _contrast(rng, c, 30.0, 100.0)
    return _apply(c, roi, local, (-contrast * profile).astype(np.float32))


def _stain(rng: np.random.Generator, c: _Canvas) -> int:
    side = min(c.h, c.w)
    a = rng.uniform(0.05, 0.16) * side
    b = a * rng.uniform(0.5, 1.0)
    phi = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0, c.w - 1), rng.uniform(0, c.h - 1)
    pts = np.array([[cx - a * 1.4, cy - a * 1.4], [cx + a * 1.4, cy + a * 1.4]])
    roi = _roi_of(pts, 1, c.h, c.w)
    y0, y1, x0, x1 = roi
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    cp, sp = np.float32(np.cos(phi)), np.float32(np.sin(phi))
    ru = (dx * cp + dy * sp) / np.float32(a)
    rv = (-dx * sp + dy * cp) / np.float32(b)
    wobble = cv2.resize(
        rng.standard_normal((6, 6), dtype=np.float32),
        (x1 - x0, y1 - y0),
        interpolation=cv2.INTER_CUBIC,
    )
    d = np.sqrt(ru**2 + rv**2) * (1.0 + 0.18 * wobble)
    profile = np.clip((1.0 - d) / 0.6, 0.0, 1.0)
    profile = profile * profile * (3.0 - 2.0 * profile)  # smoothstep: soft rim, flat core
    # The mask ends where the stain is still faintly visible (a quarter of its contrast) and
    # the stain stops there too, like the tide line of a dried liquid.
    local = (profile > 0.25).astype(np.uint8)
    sign = -1.0 if rng.random() < 0.7 else 1.0
    contrast = _contrast(rng, c, 12.0, 40.0)
    return _apply(c, roi, local, (sign * contrast * profile).astype(np.float32))


def _chip(rng: np.random.Generator, c: _Canvas) -> int:
    side = min(c.h, c.w)
    size = rng.uniform(0.06, 0.2) * side
    k = int(rng.integers(6, 10))
    if rng.random() < 0.4:  # a corner broken off
        corner = np.array([(c.w - 1) * rng.integers(0, 2), (c.h - 1) * rng.integers(0, 2)])
        inward = np.where(corner > 0, -1.0, 1.0)
        ang = np.linspace(0.0, np.pi / 2, k)
        rad = size * rng.uniform(0.6, 1.2, k)
        arc = np.stack([np.cos(ang) * rad * inward[0], np.sin(ang) * rad * inward[1]], 1)
        poly = np.concatenate([corner[None, :], corner + arc])
    else:  # a chunk missing from one edge
        edge = int(rng.integers(0, 4))
        along_len = c.w if edge in (0, 1) else c.h
        pos = rng.uniform(0.1, 0.9) * (along_len - 1)
        depth = size * rng.uniform(0.35, 0.8)
        ang = np.linspace(0.0, np.pi, k)
        along = pos - np.cos(ang) * size / 2
        into = np.sin(ang) * depth * rng.uniform(0.6, 1.3, k)
        into[0] = into[-1] = -2.0  # start and end just outside the part
        if edge == 0:
            poly = np.stack([along, into], 1)
        elif edge == 1:
            poly = np.stack([along, c.h - 1 - into], 1)
        elif edge == 2:
            poly = np.stack([into, along], 1)
        else:
            poly = np.stack([c.w - 1 - into, along], 1)
    roi = _roi_of(poly, 1, c.h, c.w)
    y0, y1, x0, x1 = roi
    if y1 <= y0 or x1 <= x0:
        return 0
    local = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(local, [np.round(poly - [x0, y0]).astype(np.int32)], 1, lineType=cv2.LINE_8)
    sel = local > 0
    if not sel.any():
        return 0
    here = float(c.img[y0:y1, x0:x1][sel].mean())
    # What shows through: dark background or bright fresh fracture, clearly unlike the surface.
    dark = here > 110 if rng.random() < 0.8 else here <= 110
    level = rng.uniform(5.0, 45.0) if dark else rng.uniform(200.0, 245.0)
    fracture = rng.normal(0.0, 5.0, local.shape).astype(np.float32)
    target = np.float32(level) + fracture
    delta = target - c.img[y0:y1, x0:x1]
    # A changed pixel must differ: push any that happen to match the target level.
    delta[np.abs(delta) < 1.0] = 8.0 if not dark else -8.0
    return _apply(c, roi, local, delta.astype(np.float32))


_PAINTERS: dict[str, Callable[[np.random.Generator, _Canvas], int]] = {
    "scratch": _scratch,
    "crack": _crack,
    "pit": _pit,
    "stain": _stain,
    "chip": _chip,
}


# ----------------------------------------------------------------------------------- renderer


def _check_names(values: Sequence[str], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    vals = tuple(values)
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise ConfigError(
            f"{what}: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
            f"choose from {', '.join(allowed)}"
        )
    return vals


@dataclass(eq=False)
class PartRenderer:
    """Makes synthetic parts of one size quickly from a pre-rendered texture bank.

    The bank holds ``bank_size`` textures per surface, each ``margin`` px larger than a part in
    both directions so that crops vary; it is rendered lazily per surface from ``bank_seed``
    (not from the caller's generator), so two renderers with the same settings make identical
    parts from identical generator states. Thread-safe: the bank is built under a lock and
    never changes afterwards; a part uses only the caller's generator.
    """

    height: int
    width: int
    channels: int = 1
    bank_size: int = LINE_BANK_SIZE
    bank_seed: int = 0
    _bank: dict[str, list[NDArray[np.uint8]]] = field(default_factory=dict, init=False, repr=False)
    _noise: NDArray[np.float32] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ConfigError(
                f"size: parts must be at least 8x8 px, got {self.height}x{self.width}"
            )
        if self.channels not in (1, 3):
            raise ConfigError(f"channels: must be 1 or 3, got {self.channels}")
        if self.bank_size < 1:
            raise ConfigError(f"bank_size: must be at least 1, got {self.bank_size}")

    @property
    def margin(self) -> tuple[int, int]:
        """Extra rows and columns of every bank texture (room for random crops)."""
        return max(16, self.height // 4), max(16, self.width // 4)

    def _textures(self, surface: str) -> list[NDArray[np.uint8]]:
        bank = self._bank.get(surface)
        if bank is not None:
            return bank
        with self._lock:
            if surface not in self._bank:
                t0 = time.perf_counter()
                my, mx = self.margin
                h, w = self.height + my, self.width + mx
                index = SURFACES.index(surface)
                made = []
                for k in range(self.bank_size):
                    rng = np.random.default_rng([self.bank_seed, index, k, h, w])
                    tex = _TEXTURES[surface](rng, h, w)
                    made.append(np.clip(tex + 0.5, 0, 255).astype(np.uint8))
                if self._noise is None:
                    nrng = np.random.default_rng([self.bank_seed, 99, h, w])
                    self._noise = nrng.standard_normal((h, w), dtype=np.float32)
                self._bank[surface] = made
                log.debug(
                    "synth_bank_rendered",
                    surface=surface,
                    textures=self.bank_size,
                    height=h,
                    width=w,
                    ms=round(1000 * (time.perf_counter() - t0), 1),
                )
            return self._bank[surface]

    def prepare(self, surfaces: Sequence[str] | None = None) -> None:
        """Render the banks of ``surfaces`` (all by default) now rather than on first use.

        A camera line calls this at start so that its first parts come at the line's rate.
        """
        for surface in (
            SURFACES if surfaces is None else _check_names(surfaces, SURFACES, "surfaces")
        ):
            self._textures(surface)

    def render(
        self,
        rng: np.random.Generator,
        *,
        surface: str | None = None,
        defect_prob: float = 0.3,
        kinds: Sequence[str] | None = None,
        faint: float = 0.0,
    ) -> SynthPart:
        """One part; ``surface`` and defect ``kinds`` are drawn from ``rng`` when not given.

        With probability ``defect_prob`` the part gets 1 to 3 defects of the given kinds
        (mostly one). ``faint`` (0..1) is the chance that a scratch, crack, pit or stain is
        drawn from the faintest third of its kind's contrast range (chips are unchanged): a
        training set weighted to the defects a model misses most. Raises ``ConfigError`` on an
        unknown surface or kind or a ``faint`` outside 0..1.
        """
        kinds_t = DEFECTS if kinds is None else _check_names(kinds, DEFECTS, "kinds")
        if surface is None:
            surface = SURFACES[int(rng.integers(0, len(SURFACES)))]
        elif surface not in SURFACES:
            raise ConfigError(f"surface: unknown {surface!r}; choose from {', '.join(SURFACES)}")
        if not 0.0 <= defect_prob <= 1.0:
            raise ConfigError(f"defect_prob: must be within [0, 1], got {defect_prob}")
        if not 0.0 <= faint <= 1.0:
            raise ConfigError(f"faint: must be within [0, 1], got {faint}")
        bank = self._textures(surface)
        noise_bank = self._noise
        assert noise_bank is not None  # built with the first surface
        h, w = self.height, self.width
        my, mx = self.margin

        # Texture: random crop and flips of a bank texture (views until the float copy).
        tex = bank[int(rng.integers(0, len(bank)))]
        oy, ox = int(rng.integers(0, my + 1)), int(rng.integers(0, mx + 1))
        view = tex[oy : oy + h, ox : ox + w]
        if rng.random() < 0.5:
            view = view[::-1]
        if rng.random() < 0.5:
            view = view[:, ::-1]
        img = view.astype(np.float32)
        mask = np.zeros((h, w), np.uint8)

        defective = rng.random() < defect_prob
        # Defects draw from their own generator so that the surface, light and noise of a part
        # do not depend on its defects: the same state with defect_prob=0 gives its good twin.
        defect_rng = np.random.default_rng(int(rng.integers(0, 2**63)))
        drawn: list[str] = []
        labels = np.zeros((h, w), np.uint8)
        if defective:
            count = 1 + int(defect_rng.random() < 0.25) + int(defect_rng.random() < 0.05)
            canvas = _Canvas(img, mask, faint)
            for _ in range(count):
                before = mask.copy()
                kind = kinds_t[int(defect_rng.integers(0, len(kinds_t)))]
                if _PAINTERS[kind](defect_rng, canvas) == 0:
                    # Clipped away entirely (tiny parts): a pit always lands inside.
                    _pit(defect_rng, canvas)
                    kind = "pit"
                drawn.append(kind)
                labels[(mask > before)] = DEFECTS.index(kind) + 1

        # Illumination: global gain, separable linear gradient and vignetting; then noise.
        gain = rng.uniform(0.75, 1.2)
        ty = np.linspace(-1.0, 1.0, h, dtype=np.float32)
        tx = np.linspace(-1.0, 1.0, w, dtype=np.float32)
        gy = gain * (1.0 + rng.uniform(-0.15, 0.15) * ty - rng.uniform(0.0, 0.12) * ty * ty)
        gx = 1.0 + rng.uniform(-0.15, 0.15) * tx - rng.uniform(0.0, 0.12) * tx * tx
        img *= gy.astype(np.float32)[:, None]
        img *= gx.astype(np.float32)[None, :]
        img += np.float32(rng.uniform(-12.0, 12.0))
        ny, nx = int(rng.integers(0, my + 1)), int(rng.integers(0, mx + 1))
        img += np.float32(rng.uniform(1.5, 6.0)) * noise_bank[ny : ny + h, nx : nx + w]

        grey = np.clip(img, 0, 255, out=img).astype(np.uint8)
        if self.channels == 3:
            # Colour is the grey part through a per-channel tint table (one LUT pass).
            jitter = rng.uniform(0.97, 1.03, 3).astype(np.float32)
            tint = np.asarray(_TINTS[surface], np.float32) * jitter
            levels = np.arange(256, dtype=np.float32)[:, None] * tint[None, :]
            lut = np.clip(levels + 0.5, 0, 255).astype(np.uint8).reshape(1, 256, 3)
            image = np.asarray(cv2.LUT(cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), lut), np.uint8)
        else:
            image = grey
        return SynthPart(
            image=image, mask=mask, defects=tuple(drawn), surface=surface, labels=labels
        )


@functools.lru_cache(maxsize=8)
def default_renderer(height: int, width: int, channels: int = 1) -> PartRenderer:
    """The shared renderer for a size (default bank settings); safe to use from many threads."""
    return PartRenderer(height, width, channels)


def render_part(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    surface: str | None = None,
    defect_prob: float = 0.3,
    kinds: Sequence[str] | None = None,
    channels: int = 1,
) -> SynthPart:
    """One ``height`` x ``width`` part with ``channels`` 1 (grey) or 3 (RGB); see ``PartRenderer``.

    A pure function of the generator's state: equal states give equal parts.
    """
    renderer = default_renderer(height, width, channels)
    return renderer.render(rng, surface=surface, defect_prob=defect_prob, kinds=kinds)


# ------------------------------------------------------------------------------------ dataset


@dataclass(frozen=True)
class _Row:
    stem: str
    cls: str
    has_defect: bool
    defect_fraction: float
    labels: str = ""  # manifest ``cls`` of a class-labelled set: the kinds present, a+b


def _assign_splits(
    rows: Sequence[_Row], splits: tuple[float, float, float], seed: int
) -> list[str]:
    """Exact split proportions, stratified by good/defective, shuffled with ``seed``."""
    out = [""] * len(rows)
    rng = np.random.default_rng([seed, 7])
    for flag in (False, True):
        idx = [i for i, r in enumerate(rows) if r.has_defect == flag]
        order = rng.permutation(len(idx))
        n = len(idx)
        n_train = round(n * splits[0])
        n_val = round(n * (splits[0] + splits[1])) - n_train
        for rank, j in enumerate(order):
            name = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
            out[idx[int(j)]] = name
    return out


@contextmanager
def _progress(enabled: bool, total: int, what: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr (a no-op when disabled); yields ``advance()``."""
    if not enabled:
        yield lambda: None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=total)
        yield lambda: bar.advance(task)


def write_dataset(
    out: Path,
    count: int,
    *,
    seed: int = 0,
    height: int = 256,
    width: int = 256,
    defect_rate: float = 0.3,
    surfaces: Sequence[str] | None = None,
    channels: int = 1,
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: bool = False,
    class_masks: bool = False,
    textures: int = DATASET_BANK_SIZE,
    kinds: Sequence[str] | None = None,
    faint: float = 0.0,
) -> Path:
    """Write ``count`` synthetic parts to ``out`` in the manifest layout; returns the manifest.

    Layout: ``images/<stem>.png`` (grey or RGB), ``masks/<stem>.png`` (0 good, 255 defect),
    ``manifest.csv`` with the columns of ``MANIFEST_COLUMNS``, a ``README.md`` and the settings
    in ``synth.json``. ``stem`` is ``<cls>_<index:06d>`` where ``cls`` is the first defect kind
    drawn or ``free``; every part is its own ``group``. Part ``i`` is rendered from
    ``default_rng([seed, i])``, so the images do not depend on ``count``; splits have exact
    proportions, stratified by good/defective. The same arguments give the same bytes.

    ``class_masks`` adds the class labels a multi-class model trains on, in NEU-Seg's layout:
    ``masks_cls/<stem>.png`` (0 good, value ``i`` = line ``i`` of ``classes.txt``, which lists
    ``DEFECTS`` in order: the values of ``SynthPart.labels``), the manifest column
    ``mask_classes``, and ``cls`` naming every kind present (sorted, joined by ``+``). Images,
    binary masks, stems and splits are those of the same set without it.

    ``out`` must be new, empty, or an earlier synthetic set (it has ``synth.json``), which is
    replaced. Raises ``ConfigError`` on invalid arguments and ``DataError`` for any other folder.

    ``textures`` is the bank size per surface. The default (16) is larger than a camera line's
    (``LINE_BANK_SIZE``, 4): writing a set is not latency-bound, and more textures keep a model
    from learning the bank instead of the defects. A line's bank is the first ``LINE_BANK_SIZE``
    textures of this one, so ``textures=LINE_BANK_SIZE`` renders parts exactly as the synthetic
    camera line shows them (its own parts, not the line's seed): a set to calibrate a line's
    operating point on.

    ``surfaces`` and ``kinds`` (defect kinds, default all) are drawn uniformly from the lists
    given, so a name given twice is drawn twice as often: a set weighted to what a model misses.
    ``faint`` weights it to the faintest defects of each kind (see ``PartRenderer.render``).
    """
    if count < 1:
        raise ConfigError(f"count: must be at least 1, got {count}")
    if not 0.0 <= defect_rate <= 1.0:
        raise ConfigError(f"defect_rate: must be within [0, 1], got {defect_rate}")
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1.0) > 1e-6:
        raise ConfigError(f"splits: three non-negative fractions summing to 1, got {splits}")
    if textures < 1:
        raise ConfigError(f"textures: must be at least 1, got {textures}")
    if not 0.0 <= faint <= 1.0:
        raise ConfigError(f"faint: must be within [0, 1], got {faint}")
    surf = SURFACES if surfaces is None else _check_names(surfaces, SURFACES, "surfaces")
    kinds_t = None if kinds is None else _check_names(kinds, DEFECTS, "kinds")
    renderer = PartRenderer(height, width, channels, bank_size=textures)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    marker = out / SYNTH_MARKER
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            # Never clear a folder this function did not write (a real dataset, say).
            raise DataError(
                f"{out}: folder is not empty and holds no {SYNTH_MARKER} of an earlier "
                "synthetic set; choose an empty or new folder"
            )
        marker.unlink()  # an interrupted rewrite leaves no marker: the folder is then refused
        (out / "manifest.csv").unlink(missing_ok=True)
        (out / CLASSES_FILE).unlink(missing_ok=True)
        for sub in ("images", "masks", CLASS_INDEX_DIR):
            for stale in (out / sub).glob("*.png"):
                stale.unlink()
    images, masks = out / "images", out / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    index_dir = out / CLASS_INDEX_DIR if class_masks else None
    if index_dir is not None:
        index_dir.mkdir(exist_ok=True)
        write_classes(out, DEFECTS)

    t0 = time.perf_counter()
    rows: list[_Row] = []
    # PNG encoding costs more than rendering; OpenCV releases the GIL while it encodes, so a
    # small pool writes while the next part renders. At most 2 x workers parts are in flight.
    pending: deque[Future[None]] = deque()
    with (
        ThreadPoolExecutor(max_workers=_WRITERS, thread_name_prefix="synth-writer") as pool,
        _progress(progress, count, "synth") as advance,
    ):
        for i in range(count):
            rng = np.random.default_rng([seed, i])
            part = renderer.render(
                rng,
                surface=surf[int(rng.integers(0, len(surf)))],
                defect_prob=defect_rate,
                kinds=kinds_t,
                faint=faint,
            )
            stem = f"{part.cls}_{i:06d}"
            index = None if index_dir is None else index_dir / f"{stem}.png"
            pending.append(
                pool.submit(_write_pair, images / f"{stem}.png", masks / f"{stem}.png", part, index)
            )
            labels = "" if index is None else _labels_cls(part)
            rows.append(_Row(stem, part.cls, bool(part.defects), float(part.mask.mean()), labels))
            while len(pending) > 2 * _WRITERS or (i == count - 1 and pending):
                pending.popleft().result()  # re-raises a failed write here
                advance()
    names = _assign_splits(rows, splits, seed)
    manifest = out / "manifest.csv"
    tmp = manifest.with_name("manifest.csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS if index_dir is None else LABELLED_COLUMNS)
        for r, split in zip(rows, names, strict=True):
            index_col = [] if index_dir is None else [f"{CLASS_INDEX_DIR}/{r.stem}.png"]
            writer.writerow(
                [
                    r.stem,
                    r.labels or r.cls,
                    f"images/{r.stem}.png",
                    f"masks/{r.stem}.png",
                    *index_col,
                    split,
                    width,
                    height,
                    int(r.has_defect),
                    f"{r.defect_fraction:.6f}",
                    r.stem,
                ]
            )
    tmp.replace(manifest)
    settings = {
        "count": count,
        "seed": seed,
        "height": height,
        "width": width,
        "defect_rate": defect_rate,
        "surfaces": list(surf),
        "channels": channels,
        "splits": list(splits),
    }
    if class_masks:  # only then: the settings (and README) of a binary set stay as they were
        settings["class_masks"] = True
    if textures != DATASET_BANK_SIZE:  # likewise: a default set's settings are unchanged
        settings["textures"] = textures
    if kinds_t is not None:
        settings["kinds"] = list(kinds_t)
    if faint > 0.0:
        settings["faint"] = faint
    marker.write_text(json.dumps(settings, indent=2) + "\n")
    columns = MANIFEST_COLUMNS if index_dir is None else LABELLED_COLUMNS
    classes_line = (
        ""
        if index_dir is None
        else f"- `{CLASS_INDEX_DIR}/<stem>.png`: the class of every pixel, 0 = good, "
        + ", ".join(f"{i} = {k}" for i, k in enumerate(DEFECTS, start=1))
        + f" (`{CLASSES_FILE}`); `cls` names the classes present, joined by `+`\n"
    )
    (out / "README.md").write_text(
        "# Synthetic defect parts (defectd synth)\n\n"
        "- `images/<stem>.png`, `masks/<stem>.png` (0 = good, 255 = defect; same size)\n"
        + classes_line
        + "- `manifest.csv`: "
        + ", ".join(columns)
        + "\n"
        "- settings: `" + json.dumps(settings) + "`\n"
    )
    log.info(
        "synth_dataset_written",
        out=str(out),
        count=count,
        defective=sum(r.has_defect for r in rows),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return manifest


def _labels_cls(part: SynthPart) -> str:
    """``cls`` of a part in a class-labelled set: every kind its labels hold (``free`` if none;
    a defect drawn entirely over an earlier one holds no pixel of its own)."""
    assert part.labels is not None  # every rendered part has them
    return index_cls(part.labels, DEFECTS) or GOOD_CLASS


def _write_pair(
    image_path: Path, mask_path: Path, part: SynthPart, index_path: Path | None = None
) -> None:
    """Write a part's image (RGB stored as PNG's usual BGR order), its 0/255 mask and, when
    ``index_path`` is given, its class-index mask (``part.labels``)."""
    image = part.image if part.image.ndim == 2 else part.image[:, :, ::-1]
    _imwrite(image_path, image)
    _imwrite(mask_path, part.mask * np.uint8(255))
    if index_path is not None:
        assert part.labels is not None
        _imwrite(index_path, part.labels)


def _imwrite(path: Path, image: NDArray[np.uint8]) -> None:
    # Fast settings: zlib level 1 with run-length matching is ~2x quicker than the default at a
    # similar size on noisy textures, and far smaller than uncompressed.
    params = [
        cv2.IMWRITE_PNG_COMPRESSION,
        1,
        cv2.IMWRITE_PNG_STRATEGY,
        cv2.IMWRITE_PNG_STRATEGY_RLE,
    ]
    if not cv2.imwrite(str(path), np.ascontiguousarray(image), params):
        raise DataError(f"{path}: could not write image")
