"""A simulated production line: rendered parts, some defective, with their ground truth.

Each frame carries the truth the renderer drew, so the whole daemon can be checked end to end:
``meta["truth_mask"]`` ``(H, W)`` uint8 {0, 1}, ``meta["truth_defective"]`` bool,
``meta["truth_kinds"]`` tuple of defect kinds, ``meta["truth_labels"]`` ``(H, W)`` uint8
class-index mask (``DEFECTS.index(kind) + 1``) with ``meta["truth_classes"]`` naming its
values (``DEFECTS``), ``meta["surface"]``. The line is a pure
function of ``seed``: the n-th part is the same on every run and machine.

With ``trigger = "request"`` the line renders one part per ``fire_trigger(world_key)``: the
part named ``world_key`` (its image and truth are a pure function of ``seed`` and that key,
``defectd.pipeline.parts.synthetic_part_defective``, so a simulated PLC knows the truth of
every part it sends), carried as ``meta["truth_part_id"]``; the frame's ``part_id`` is left to
the line pairing.

``drift_after`` makes the line change from that part on (dimmer lighting or a smoother
texture, ``drift_kind``/``drift_amount``/``drift_ramp``): drift monitoring's test case. The
change is a pure function of the part number, so a drifting line is as reproducible as a
stable one.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from defectd.data.synth import DEFECTS, SURFACES, PartRenderer
from defectd.errors import CameraError
from defectd.pipeline.parts import synthetic_part_defective, synthetic_part_key
from defectd.pipeline.sources.base import EventKind, SourceState, SyntheticSourceConfig
from defectd.pipeline.sources.threaded import Pacer, ThreadedSource


class SyntheticSource(ThreadedSource):
    """Renders ``config.count`` parts (or endlessly) at ``config.rate_hz`` (or unthrottled).

    Unthrottled, ``on_frame`` may block: the line then runs exactly as fast as its consumer.
    Frames are ``(H, W)`` uint8 (pixel format ``Mono8``) or ``(H, W, 3)`` uint8 RGB
    (``RGB8``); ``part_id`` is ``<camera>-<n>`` with ``n`` counting from 0.
    """

    def __init__(self, config: SyntheticSourceConfig, station: str) -> None:
        super().__init__(config.camera, station, "synthetic")
        self.config = config
        self._renderer: PartRenderer | None = None
        self._requests: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def fire_trigger(self, world_key: str | None = None) -> None:
        """Render one part (``trigger = "request"``): the part ``world_key``, or the next part
        of the seeded line when ``None``. Raises ``CameraError`` in free-run mode."""
        if self.config.trigger != "request":
            raise CameraError(f"camera {self.camera!r}: trigger is not 'request'")
        self._requests.put(world_key)

    def _wake(self) -> None:
        self._requests.put(None)

    def probe(self) -> None:
        """Check the settings as ``start`` does, without rendering; ``CameraError`` if wrong."""
        unknown = [s for s in self.config.surfaces if s not in SURFACES]
        if unknown:
            raise CameraError(
                f"camera {self.camera!r}: surfaces: unknown {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(SURFACES)}"
            )

    def _open(self) -> None:
        cfg = self.config
        self.probe()
        renderer = PartRenderer(cfg.height, cfg.width, cfg.channels)
        # Render the texture banks now, so the first parts come at the line's rate.
        warm = np.random.default_rng(0)
        for surface in cfg.surfaces or SURFACES:
            renderer.render(warm, surface=surface, defect_prob=0.0)
        self._renderer = renderer
        self._set_state(SourceState.STREAMING)

    def _run(self) -> None:
        if self.config.trigger == "request":
            self._run_on_request()
            return
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        pixel_format = "Mono8" if cfg.channels == 1 else "RGB8"
        pacer = Pacer(cfg.rate_hz, self._stopping)
        n = 0
        while cfg.count is None or n < cfg.count:
            if not pacer.wait():
                return
            image, truth = self._render(rng, cfg.defect_rate, n)
            self._emit_frame(
                image,
                t_host_ns=time.monotonic_ns(),
                t_wall=time.time(),
                pixel_format=pixel_format,
                part_id=f"{self.camera}-{n}",
                meta=truth,
            )
            n += 1
        self._set_state(SourceState.STOPPED, f"rendered {n} parts")
        self._emit_event(EventKind.END_OF_STREAM, f"rendered {n} parts", parts=n)

    def _run_on_request(self) -> None:
        cfg = self.config
        line_rng = np.random.default_rng(cfg.seed)
        pixel_format = "Mono8" if cfg.channels == 1 else "RGB8"
        n = 0
        while True:
            key = self._requests.get()
            if self._stopping.is_set():
                return
            t_host_ns = time.monotonic_ns()  # the trigger: the exposure starts now
            t_wall = time.time()
            if key is None:
                rng, prob = line_rng, cfg.defect_rate
            else:
                rng = np.random.default_rng(synthetic_part_key(cfg.seed, key))
                prob = 1.0 if synthetic_part_defective(cfg.seed, key, cfg.defect_rate) else 0.0
            image, truth = self._render(rng, prob, n)
            self._emit_frame(
                image,
                t_host_ns=t_host_ns,
                t_wall=t_wall,
                pixel_format=pixel_format,
                meta={**truth, "truth_part_id": key, "frame_id": n},
            )
            n += 1

    def _render(
        self, rng: np.random.Generator, defect_prob: float, n: int
    ) -> tuple[NDArray[np.uint8], dict[str, Any]]:
        """Part ``n`` of the line, drawn from ``rng``: its image (drifted as the line is at
        part ``n``) and the truth its frame carries (the ``meta`` keys of the module doc)."""
        cfg = self.config
        renderer = self._renderer
        assert renderer is not None
        surfaces = cfg.surfaces
        surface = surfaces[int(rng.integers(len(surfaces)))] if surfaces else None
        part = renderer.render(rng, surface=surface, defect_prob=defect_prob)
        truth = {
            "truth_mask": part.mask,
            "truth_defective": bool(part.defects),
            "truth_kinds": part.defects,
            "truth_labels": part.labels,
            "truth_classes": DEFECTS,
            "surface": part.surface,
        }
        return apply_drift(cfg, part.image, n), truth


def drift_fraction(config: SyntheticSourceConfig, n: int) -> float:
    """How far the line has drifted at part ``n`` (0 before ``drift_after``, then up to
    ``drift_amount`` over ``drift_ramp`` parts)."""
    if config.drift_after is None or n < config.drift_after:
        return 0.0
    if config.drift_ramp <= 0:
        return config.drift_amount
    return config.drift_amount * min(1.0, (n - config.drift_after + 1) / config.drift_ramp)


def apply_drift(
    config: SyntheticSourceConfig, image: NDArray[np.uint8], n: int
) -> NDArray[np.uint8]:
    """Part ``n``'s image as the drifting line shows it (a new array once it drifts)."""
    f = drift_fraction(config, n)
    if f <= 0.0:
        return image
    if config.drift_kind == "lighting":
        return np.asarray(cv2.convertScaleAbs(image, alpha=1.0 - f), np.uint8)
    blurred = cv2.GaussianBlur(image, (0, 0), 1.5)
    return np.asarray(cv2.addWeighted(image, 1.0 - f, blurred, f, 0.0), np.uint8)
